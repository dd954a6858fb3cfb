"""The chat page in a real browser (headless Chromium through selenium, as Debian packages them): answers arrive,
the newest line stays above the input bar, "New chat" stops an answer and keeps it out of the new conversation,
and Enter that confirms an input method's composition does not send."""

from __future__ import annotations

import time

import pytest

import edgellm
from edgellm.server import create_app
from helpers import browser_on, pace_generations, running_server, wait_for

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(bundle):
    """(browser on the chat page, the model the server runs)."""
    model = edgellm.load(bundle("llama", "f32", seq_length=1024))
    model.eos_token_ids = []  # answers run to their max_tokens
    model.results = pace_generations(model)  # about 200 tokens/s, as a model of a real size
    with running_server(create_app(model, "tiny")) as url, browser_on(f"{url}/") as browser:
        wait_for(browser, lambda b: "context 1024 tokens" in b.find_element("id", "model").text)
        yield browser, model


def messages(browser, kind: str) -> list:
    return browser.find_elements("css selector", f"#log .msg.{kind}")


def send(browser, text: str, max_tokens: int = 8) -> None:
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element("id", "max_tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    browser.find_element("id", "prompt").send_keys(text, Keys.ENTER)


def answered(browser) -> bool:
    timings = browser.find_elements("css selector", "#log .msg.assistant .timing")
    return bool(timings) and len(timings) == len(messages(browser, "assistant")) \
        and browser.find_element("id", "send").is_enabled()


def test_answers_arrive_and_the_newest_stays_in_view(page):
    browser, _ = page
    browser.find_element("id", "clear").click()
    for i in range(6):  # more than the window holds
        send(browser, f"We hold these truths, number {i}", max_tokens=24)
        wait_for(browser, answered)
    last = messages(browser, "assistant")[-1]
    assert "decode" in last.find_element("css selector", ".timing").text
    bottom = browser.execute_script("return arguments[0].getBoundingClientRect().bottom", last)
    bar = browser.execute_script("return document.getElementById('form').getBoundingClientRect().top")
    assert bottom <= bar + 1  # not hidden behind the input bar


def test_new_chat_stops_the_answer_and_starts_clean(page):
    browser, model = page
    browser.find_element("id", "clear").click()
    send(browser, "Tell me a long story", max_tokens=1000)
    wait_for(browser, lambda b: messages(b, "assistant") and messages(b, "assistant")[0].text)
    story = model.results[-1]
    browser.find_element("id", "clear").click()
    assert messages(browser, "user") == [] and browser.find_element("id", "send").is_enabled()
    send(browser, "Hello")
    wait_for(browser, answered)
    timing = messages(browser, "assistant")[-1].find_element("css selector", ".timing").text
    prompt_tokens = int(timing.split("prompt ")[1].split(" ")[0])
    assert prompt_tokens == len(model.prompt_ids([{"role": "user", "content": "Hello"}]))  # the old answer is gone
    assert len(messages(browser, "user")) == 1 and len(messages(browser, "assistant")) == 1
    assert len(story.token_ids) < 1000  # the server stopped the abandoned answer


def test_enter_that_ends_an_input_method_composition_does_not_send(page):
    browser, _ = page
    browser.find_element("id", "clear").click()
    box = browser.find_element("id", "prompt")
    box.send_keys("こんにちは")
    for event in ("{key: 'Enter', isComposing: true, bubbles: true}", "{key: 'Enter', keyCode: 229, bubbles: true}"):
        browser.execute_script(f"arguments[0].dispatchEvent(new KeyboardEvent('keydown', {event}))", box)
    time.sleep(0.3)
    assert messages(browser, "user") == [] and box.get_attribute("value") == "こんにちは"
    browser.execute_script("arguments[0].dispatchEvent(new KeyboardEvent('keydown', "
                           "{key: 'Enter', bubbles: true, cancelable: true}))", box)
    wait_for(browser, answered)
    assert [m.text for m in messages(browser, "user")] == ["こんにちは"]


def test_the_system_field_and_the_stop_button(page):
    browser, model = page
    browser.find_element("id", "clear").click()
    system = browser.find_element("id", "system")
    system.send_keys("Answer in one word.")
    send(browser, "Hello")
    wait_for(browser, answered)
    timing = messages(browser, "assistant")[-1].find_element("css selector", ".timing").text
    want = model.prompt_ids([{"role": "system", "content": "Answer in one word."},
                             {"role": "user", "content": "Hello"}])
    assert int(timing.split("prompt ")[1].split(" ")[0]) == len(want)
    system.clear()
    send(browser, "Tell me a long story", max_tokens=1000)
    wait_for(browser, lambda b: b.find_element("id", "stop").is_enabled() and messages(b, "assistant")[-1].text)
    browser.find_element("id", "stop").click()
    wait_for(browser, lambda b: b.find_element("id", "send").is_enabled())
    time.sleep(0.3)
    assert len(model.results[-1].token_ids) < 1000  # the server stopped it too
    stopped = messages(browser, "assistant")[-1]
    assert "stopped" in stopped.get_attribute("class")
    assert stopped.find_element("css selector", ".timing").text.startswith("stopped · ")


def test_the_controls_sit_where_they_are_looked_for(page):
    browser, model = page
    row = browser.find_element("id", "send").find_element("xpath", "..")
    assert browser.find_element("id", "clear").find_element("xpath", "..") == row  # New chat beside Send and Stop
    temperature = browser.find_element("id", "temperature").get_attribute("placeholder")
    assert temperature == f"{model.sampling_defaults()['temperature']:g} (model's)"  # JavaScript's number


def test_a_server_of_several_models_lets_the_page_pick_one(bundle):
    from selenium.webdriver.support.ui import Select

    from edgellm.server.pool import ModelPool, ServedModel

    asked = []

    def loader(name, path):
        def load():
            model = edgellm.load(path)
            asked.append((name, pace_generations(model, 0)))
            return model, None
        return load

    paths = {"first": bundle("llama", "f32", seq_length=256), "second": bundle("qwen2", "f32", seq_length=256)}
    pool = ModelPool([ServedModel(name, loader(name, path), path=path) for name, path in paths.items()])
    with running_server(create_app(pool=pool)) as url, browser_on(f"{url}/") as browser:
        wait_for(browser, lambda b: "context 256 tokens" in b.find_element("id", "model").text)
        picker = Select(browser.find_element("id", "pick"))
        assert [o.text for o in picker.options] == ["first", "second"]
        picker.select_by_visible_text("second")
        send(browser, "Hello")
        wait_for(browser, answered)
        assert [name for name, _ in asked] == ["second"] and len(asked[0][1]) == 1  # the picked model answered
