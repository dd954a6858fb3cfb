"""`edgellm serve`: the OpenAI-compatible API gives what the Python API gives, streamed or not, and refuses bad
requests with a 400 that names the field, without disturbing the requests that follow."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from starlette.testclient import TestClient

import edgellm
from edgellm.cli import main
from edgellm.server import create_app
from helpers import running_server

QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "When in the Course of human events"}]


@pytest.fixture(scope="module")
def served(bundle):
    """(test client, a second model on the same bundle for the expected answers)."""
    path = bundle("llama", "f32", seq_length=96)
    return TestClient(create_app(edgellm.load(path), "tiny")), edgellm.load(path)


def events(response) -> list:
    """The JSON events of a server-sent-event response; the [DONE] marker must close it."""
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_completion_is_the_generated_answer(served):
    client, model = served
    r = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    want = model.generate(QUESTION, max_new_tokens=12)
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"]["prompt_tokens"] == len(model.prompt_ids(QUESTION))
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    assert body["timings"]["ttft_ms"] > 0


def test_streamed_chat_joins_to_the_same_answer_and_reuses_the_cache(served):
    client, model = served
    request = {"messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=request)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    want = model.generate(QUESTION, max_new_tokens=12)
    assert text == want.text
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == want.finish_reason
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.token_ids)
    # The same conversation again: the engine kept it, only the last prompt token is computed.
    again = client.post("/v1/chat/completions", json=request)
    assert events(again)[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(model.prompt_ids(QUESTION)) - 1


def test_completions_sampling_and_stop_strings_follow_the_api(served):
    client, model = served
    r = client.post("/v1/completions", json={"prompt": "We hold these truths", "max_tokens": 10, "temperature": 0})
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == model.generate("We hold these truths", max_new_tokens=10, raw=True).text
    assert client.post("/v1/completions", json={"prompt": "We hold", "temperature": 0}).json()[
        "usage"]["completion_tokens"] <= 16  # OpenAI's default for completions
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 3}
    r = client.post("/v1/completions", json={"prompt": "Liberty", "max_tokens": 16, **sampled})
    assert r.json()["choices"][0]["text"] == model.generate("Liberty", max_new_tokens=16, raw=True, **sampled).text
    full = model.generate("Four score", max_new_tokens=24, raw=True, ignore_eos=True).text
    stop = full[5:8]
    streamed = client.post("/v1/completions", json={"prompt": "Four score", "max_tokens": 24, "temperature": 0,
                                                    "stop": stop, "stream": True})
    pieces = events(streamed)
    assert "".join(c["choices"][0]["text"] for c in pieces) == full[:full.index(stop)]
    assert pieces[-1]["choices"][0]["finish_reason"] == "stop"
    # max_tokens beyond the context is clamped to what fits
    long = client.post("/v1/completions", json={"prompt": "Liberty", "max_tokens": 5000, "temperature": 0}).json()
    assert long["usage"]["total_tokens"] <= model.seq_length


def _png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


BAD = [
    ("/v1/chat/completions", b"{not json", None, "not valid JSON"),
    ("/v1/chat/completions", [1, 2], None, "JSON object"),
    ("/v1/chat/completions", {}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]}, "messages", "role 'function'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages",
     "parts must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, "messages", "data: URLs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, "messages", "not valid base64"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _png()}}]}]}, "messages", "no vision graph"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, "temperature", "a number"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": 5}, "temperature", "between 0 and 2"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 0}, "max_tokens", "between 1"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 9}, "n", "'n' must be"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
    ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f",
                                                                                             "parameters": 3}}]},
     "tools", "parameters must be a JSON schema object"),
    ("/v1/chat/completions", {"messages": QUESTION, "presence_penalty": 0.5}, "presence_penalty",
     "repetition_penalty"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": [""]}, "stop", "non-empty strings"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "truths " * 200}]}, "messages",
     "holds at most 96"),
    ("/v1/completions", {"prompt": ""}, "prompt", "non-empty string"),
    ("/v1/completions", {"prompt": "Liberty", "seed": -1}, "seed", "between 0"),
    ("/v1/completions", {"prompt": "Liberty", "stream": "yes"}, "stream", "true or false"),
]


@pytest.mark.parametrize("path,body,param,message", BAD, ids=[b[3] for b in BAD])
def test_bad_requests_get_a_400_naming_the_field(served, path, body, param, message):
    client, _ = served
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]
    after = client.post("/v1/completions", json={"prompt": "We hold", "max_tokens": 2, "temperature": 0})
    assert after.status_code == 200  # the server goes on


def test_models_health_page_and_unknown_routes(served):
    client, model = served
    info = client.get("/v1/models").json()["data"]
    assert info == [{"id": "tiny", "object": "model", "created": info[0]["created"], "owned_by": "edgellm",
                     "context_length": model.seq_length, "vision": False, "chat_template": True,
                     "defaults": model.sampling_defaults(), "loaded": True, "family": "llama", "quantization": "f32",
                     "quality": model.manifest.quality}]
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<title>edgellm</title>" in page.text and "/v1/chat/completions" in page.text
    assert client.get("/v2/nothing").status_code == 404
    assert client.get("/v1/chat/completions").json()["error"]["message"].endswith("Method Not Allowed")


def test_cli_serve_builds_the_app_for_the_bundle(bundle, monkeypatch, capsys):
    import uvicorn

    started = {}

    def run(server, sockets):
        started.update(app=server.config.app, address=sockets[0].getsockname())
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    path = bundle("llama", "f32", seq_length=96)
    assert main(["serve", str(path), "--port", "0"]) == 0
    host, port = started["address"]
    assert host == "127.0.0.1" and port > 0
    assert TestClient(started["app"]).get("/v1/models").json()["data"][0]["id"] == path.name
    assert f"http://127.0.0.1:{port}/" in capsys.readouterr().err


def test_a_client_that_goes_away_stops_its_generation(bundle):
    """Over a real socket: closing a streamed response ends the generation at the next token, and the next request
    is answered at once."""
    import httpx

    model = edgellm.load(bundle("llama", "f32", seq_length=1024))
    with running_server(create_app(model, "tiny")) as url:
        request = {"prompt": "We hold these truths", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                   "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=request, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first = model.last_result
                    break
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Liberty", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200
        assert 0 < len(first.token_ids) < 1000 and first is not model.last_result


def test_an_event_stays_one_line_for_clients_that_split_as_python_does():
    """httpx (the openai client's transport) reads server-sent events with str.splitlines, which also breaks at
    U+2028, U+0085 and a few control characters: inside an event they are escaped, and the JSON says the same."""
    from edgellm.server import event_json

    text = "a\u2028b\u2029c\x85d\x0be\x1cf\u00e9g"
    line = f"data: {event_json({'content': text})}"
    assert len(line.splitlines()) == 1 and "é" in line  # (other characters stay as they are)
    assert json.loads(line[len("data: "):]) == {"content": text}


def test_tokenize_and_detokenize(served):
    client, model = served
    ids = model.tokenizer.encode("We hold these truths")
    r = client.post("/tokenize", json={"content": "We hold these truths"}).json()
    assert r == {"tokens": ids, "count": len(ids), "max_model_len": model.seq_length}
    assert client.post("/tokenize", json={"prompt": "We hold", "add_special_tokens": False}).json()["tokens"] == \
        model.tokenizer.encode("We hold", add_special_tokens=False)
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == model.prompt_ids([{"role": "user", "content": "Hi"}])
    pieces = client.post("/tokenize", json={"content": "We hold", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == model.tokenizer.encode("We hold") and all("piece" in p for p in pieces)
    text = client.post("/detokenize", json={"tokens": ids}).json()
    assert text["content"] == text["prompt"] == model.tokenizer.decode(ids, skip_special_tokens=False)
    for body, field in [({"tokens": [-1]}, "tokens"), ({"tokens": "abc"}, "tokens"), ({}, None)]:
        route = "/detokenize" if field else "/tokenize"
        bad = client.post(route, json=body)
        assert bad.status_code == 400 and bad.json()["error"]["message"]
    assert client.post("/tokenize", json={"model": "other", "content": "x"}).status_code == 404
