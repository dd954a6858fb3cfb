"""The server's ollama routes driven by the official `ollama` Python client, over a real socket: chat and generate,
streamed (NDJSON) or not, give the Python API's answers; the model list, show, ps and version describe the served
models; errors arrive as the client's ResponseError."""

from __future__ import annotations

import base64

import httpx
import pytest

import edgellm
from edgellm.server import create_app
from helpers import running_server

ollama = pytest.importorskip("ollama", reason="the ollama client is not installed (pip install ollama)")
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When in the Course of human"}]


@pytest.fixture(scope="module")
def served(bundle):
    """(ollama client, base URL, a second model on the same bundle for the expected answers)."""
    path = bundle("llama", "f32", seq_length=256)
    with running_server(create_app(edgellm.load(path), "tiny")) as url:
        yield ollama.Client(host=url), url, edgellm.load(path)


def test_chat_streamed_or_not_is_the_python_apis_answer(served):
    client, _, model = served
    want = model.generate(QUESTION, max_new_tokens=10)
    options = {"temperature": 0, "num_predict": 10}
    answer = client.chat(model="tiny", messages=QUESTION, options=options)
    assert answer.message.content == want.text and answer.done and answer.done_reason in ("stop", "length")
    assert answer.eval_count == len(want.token_ids) and answer.prompt_eval_count == len(model.prompt_ids(QUESTION))
    assert answer.total_duration > 0 and answer.eval_duration >= 0 and answer.model == "tiny"
    parts = list(client.chat(model="tiny:latest", messages=QUESTION, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == want.text
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == len(want.token_ids)


def test_generate_with_and_without_the_template(served):
    client, _, model = served
    options = {"temperature": 0, "num_predict": 6}
    raw = client.generate(model="tiny", prompt="We hold these truths", raw=True, options=options)
    assert raw.response == model.generate("We hold these truths", 6, raw=True).text
    templated = "".join(p.response for p in client.generate(model="tiny", prompt="Hello", system="Be brief.",
                                                            options=options, stream=True))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert templated == model.generate(messages, 6).text


def test_the_model_list_show_ps_and_version(served):
    client, url, model = served
    (listed,) = client.list().models
    assert listed.model == "tiny" and listed.size > 0 and listed.details.format == "onnx"
    assert listed.details.family == model.manifest.family
    shown = client.show("tiny")
    assert shown.template == (model.bundle.path / "chat_template.jinja").read_text()
    assert "completion" in shown.capabilities and shown.modelinfo["edgellm.context_length"] == 256
    assert [m.model for m in client.ps().models] == ["tiny"]
    assert httpx.get(f"{url}/api/version").json()["version"]


def test_errors_arrive_as_the_clients_response_error(served, tmp_path):
    client, url, _ = served
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nothing-here", messages=QUESTION)
    assert e.value.status_code == 404 and "'nothing-here' is not served here" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="tiny", messages=QUESTION, options={"mirostat": 2})
    assert e.value.status_code == 400 and "option 'mirostat' is not supported" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # a text bundle given an image
        client.chat(model="tiny", messages=[{"role": "user", "content": "What is this?",
                                             "images": [base64.b64encode(b"not a picture").decode()]}])
    assert e.value.status_code == 400 and "vision" in e.value.error
    json_answer = client.chat(model="tiny", messages=QUESTION, format="json", options={"num_predict": 12})
    assert json_answer.done
