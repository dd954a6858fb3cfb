"""Tool calls: OpenAI `tools` rendered by the model's own chat template (Qwen2.5's, a "tagged" format), the answer's
calls read back as `tool_calls`, streamed or not; `tool_choice` "required" or a named function holds the answer to a
valid call of the tools' schemas (sampled at temperature 1 too); a template without tools gets the generic format,
on the real SmolLM2 (whose template renders none) through the openai client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from edgellm.runtime.tools import Tools, tool_format
from edgellm.server import create_app
from helpers import running_server

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
pytest.importorskip("llguidance", reason="tool_choice 'required' needs the structured extra")

TEMPLATE = Path(__file__).parent / "data" / "qwen2_5_tools.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                 "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_bundle(tiny, tmp_path_factory):
    """A tiny Qwen2 model whose chat template is Qwen2.5's, tools included."""
    _, folder = tiny("qwen2")
    source = tmp_path_factory.mktemp("qwen2-tools") / "hf"
    shutil.copytree(folder, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE.read_text()
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    return edgellm.convert(source, tmp_path_factory.mktemp("bundles") / "qwen2-tools", quantize="f32",
                           progress=False, seq_length=1024, chunk_length=128)


@pytest.fixture(scope="module")
def served(tool_bundle):
    model = edgellm.load(tool_bundle, slots=2)
    with running_server(create_app(model, "tiny")) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), model


def check_call(call, tools=TOOLS) -> dict:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, schema)
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


def test_the_template_format_is_recognised():
    assert tool_format(TEMPLATE.read_text()) == "tagged"
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"
    llama3 = "{% if tools %}Given the following functions, please respond with a JSON for a function call{% endif %}"
    assert tool_format(llama3) == "json"


def test_calls_are_read_from_the_answer():
    tools = Tools("tagged", [WEATHER["function"], TIME["function"]], "auto")
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}')  # the last one unclosed
    content, calls = tools.parse(text)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": 1})]
    assert tools.parse("No tools needed.") == ("No tools needed.", [])
    assert tools.parse('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')[1] == []
    assert tools.hold_back("Sure <tool") == 5 and tools.hold_back("Sure <tool_call>{") == 12
    assert tools.hold_back("Sure.") == 0
    llama = Tools("json", [WEATHER["function"]], "auto")
    content, calls = llama.parse('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"])["city"] == "Oslo"
    assert llama.hold_back('{"name"') == 7 and llama.hold_back("Hello") == 0


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_a_required_call_is_a_valid_call_streamed_or_not(served, temperature, seed):
    client, _ = served
    answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=300, temperature=temperature, seed=seed)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=300, temperature=temperature, seed=seed, stream=True)
    chunks = list(stream)
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert check_call(calls[0]) == json.loads(choice.message.tool_calls[0].function.arguments)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # nothing of the call leaks


def test_a_named_call_and_the_conversation_after_it(served):
    client, model = served
    answer = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=300, temperature=0,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and check_call(call).keys() == {"zone"}
    follow_up = ASK + [answer.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    again = client.chat.completions.create(model="tiny", messages=follow_up, tools=TOOLS, max_tokens=5,
                                           temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_time", "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "12:00"}]
    text = model.tokenizer.decode(model.prepare(rendered, tools=model.tool_spec(TOOLS)).ids)
    assert "<tool_response>\n12:00\n</tool_response>" in text and '"name": "get_time"' in text


def test_the_python_api_returns_parsed_calls(tool_bundle):
    model = edgellm.load(tool_bundle)
    result = model.generate(ASK, max_new_tokens=300, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7)
    assert result.finish_reason == "tool_calls" and result.tool_calls
    name = result.tool_calls[0]["function"]["name"]
    jsonschema.validate(json.loads(result.tool_calls[0]["function"]["arguments"]),
                        {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name])
    with pytest.raises(EdgeLLMError, match="not among the 'tools'"):
        model.generate(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_bad_tool_requests_are_400s(served, bundle):
    client, _ = served
    for kwargs, message in [
        (dict(tools=[{"type": "function"}]), r"tools\[0\] must be"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the"),
        (dict(tool_choice="required"), "has no 'tools'"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "'tool_choice' must be"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **kwargs)
    with pytest.raises(openai.BadRequestError, match="needs /v1/chat/completions"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"tools": TOOLS})
    plain = edgellm.load(bundle("llama", "f32"))  # a ChatML template without tools: the generic format
    with running_server(create_app(plain, "plain")) as url:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="'tool_choice' must be"):
            other.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, tool_choice="sometimes",
                                          max_tokens=4)
        assert other.chat.completions.create(model="plain", messages=ASK, max_tokens=2).choices  # still serving


@pytest.mark.slow
def test_the_generic_format_on_smollm2_through_the_openai_client(tmp_path):
    """SmolLM2's template renders no tools: the tools are described in the system message and the answer is held
    to the generic JSON; "required" gives a valid call, "auto" a call or a reply, and the conversation goes on with
    the tool's result."""
    from edgellm.demo import smollm2_gguf

    model = edgellm.load(edgellm.convert(smollm2_gguf(), tmp_path / "smollm2", seq_length=1024, progress=False),
                         slots=2)
    assert model.tool_spec(TOOLS).format == "generic"
    with running_server(create_app(model, "smollm2")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        required = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                                  max_tokens=64, temperature=0)
        (call,) = required.choices[0].message.tool_calls
        assert call.function.name in ("get_weather", "get_time") and required.choices[0].finish_reason == "tool_calls"
        check_call(call)
        auto = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=64,
                                              temperature=0)
        message = auto.choices[0].message
        assert message.tool_calls or (message.content and not message.content.lstrip().startswith("{"))
        for call in message.tool_calls or []:
            check_call(call)
        follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
        after = client.chat.completions.create(model="smollm2", messages=follow, tools=TOOLS, max_tokens=48,
                                               temperature=0)
        assert after.choices[0].message.tool_calls or after.choices[0].message.content
        streamed = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER],
                                                  tool_choice="required", max_tokens=64, temperature=0, stream=True)
        calls = [c for chunk in streamed if chunk.choices for c in chunk.choices[0].delta.tool_calls or []]
        assert [c.function.name for c in calls] == ["get_weather"]
        check_call(calls[0])


def test_function_tools_through_the_responses_api(served):
    client, _ = served
    flat = [{"type": "function", **WEATHER["function"]}]
    response = client.responses.create(model="tiny", input="What is the weather in Paris?", tools=flat,
                                       tool_choice="required", max_output_tokens=256, temperature=0)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    answer = client.responses.create(model="tiny", tools=flat, max_output_tokens=8, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}])
    assert answer.status in ("completed", "incomplete") and answer.output[0].type == "message"
