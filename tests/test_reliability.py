"""What a new user broke (issue 24): each case gives one clear error, loses nothing, and the next request or message
is served as if nothing had happened."""

from __future__ import annotations

import inspect
import io
import socket
import threading
import time

import pytest
from starlette.testclient import TestClient

import edgellm
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from edgellm.server import create_app
from helpers import pace_generations, running_server

QUESTION = [{"role": "user", "content": "When in the Course of human events"}]


@pytest.fixture(scope="module")
def small(bundle):
    """A float bundle of 96 positions and the model on it."""
    path = bundle("llama", "f32", seq_length=96)
    return path, edgellm.load(path)


# --- text that is not valid Unicode --------------------------------------------------------------------------------

def test_a_lone_surrogate_is_one_clear_error_everywhere(small, monkeypatch, capsys):
    path, model = small
    for prompt in ("Liberty \ud800", [{"role": "user", "content": "x\udcff"}],
                   [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]):
        with pytest.raises(EdgeLLMError, match="not valid Unicode"):
            model.generate(prompt, max_new_tokens=2)
    assert model.generate("Liberty", max_new_tokens=2).token_ids  # nothing was left half-done
    # undecodable command-line bytes reach Python as lone surrogates (surrogateescape)
    assert main(["run", str(path), "Liberty \udcff", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "not valid Unicode" in err and "Traceback" not in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Liberty \xff\xfe")))
    assert main(["run", str(path), "-", "-n", "2"]) == 2
    assert "standard input is not UTF-8 text (byte 0xff at offset 8)" in capsys.readouterr().err
    client = TestClient(create_app(model, "tiny"))
    r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "a\\ud800"}]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "prompt is not valid Unicode text" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


def test_chat_skips_a_line_that_is_not_utf8(small, monkeypatch, capsys):
    path, _ = small
    lines = iter([UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "Liberty", "/quit"])

    def typed(prompt=""):
        line = next(lines)
        if isinstance(line, Exception):
            raise line
        return line

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", str(path), "-n", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and err.count("TTFT") == 1


def test_a_stream_cut_inside_a_character_drops_its_incomplete_tail(small):
    from edgellm.runtime.tokenizer import StreamDecoder

    _, model = small
    ids = model.tokenizer.encode("ok 😀")
    assert len(ids) > 3  # the emoji is several byte tokens in this small vocabulary
    decoder = StreamDecoder(model.tokenizer)
    text = "".join(decoder.push(i) for i in ids[:-1]) + decoder.flush()
    assert text == "ok " and "\ufffd" not in text


# --- sizes -----------------------------------------------------------------------------------------------------------

def test_a_huge_prompt_is_refused_before_it_is_tokenized(small, monkeypatch):
    _, model = small
    calls = []
    encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode",
                        lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k))
    huge = "truths " * 1_500_000  # 10 MB
    for prompt in (huge, [{"role": "user", "content": huge}]):
        with pytest.raises(EdgeLLMError, match=r"the prompt is 10,500,000 bytes: more than this bundle's 96 tokens"):
            model.generate(prompt, max_new_tokens=2)
    assert calls == []
    # a prompt just over the bundle is tokenized and refused with both lengths, as before
    with pytest.raises(EdgeLLMError, match="holds at most 96"):
        model.generate("truths " * 120, max_new_tokens=2)


def test_request_bodies_over_the_limit_get_a_413(small):
    _, model = small
    client = TestClient(create_app(model, "tiny", max_request_bytes=4096))
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "at most 4,096" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 4,096 bytes" in r.json()["error"]["message"]
    deep = "[" * 100_000 + "]" * 100_000
    r = TestClient(create_app(model, "tiny")).post("/v1/completions", content=deep.encode())
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "We hold", "max_tokens": 2}).status_code == 200


# --- the server -------------------------------------------------------------------------------------------------------

def test_models_by_id_unknown_models_and_unexpected_errors(small, monkeypatch):
    _, model = small
    client = TestClient(create_app(model, "tiny"), raise_server_exceptions=False)
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    r = client.get("/v1/models/gpt-4o")
    assert r.status_code == 404
    assert "'gpt-4o' is not served here; this server serves 'tiny'" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": QUESTION})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": QUESTION,
                                                     "max_tokens": 2}).status_code == 200

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(model, "prepare", broken)
    r = client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal error: RuntimeError: a bug",
                                                          "type": "server_error", "param": None, "code": None}


def test_a_client_that_times_out_stops_its_unstreamed_generation(bundle):
    """The openai client retries a timed-out request: each abandoned answer must stop, not run to its end."""
    import httpx

    model = edgellm.load(bundle("llama", "f32", seq_length=1024))
    results = pace_generations(model)  # a model of a real size: 1,000 tokens take seconds
    with running_server(create_app(model, "tiny")) as url:
        request = {"prompt": "We hold these truths", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=request, timeout=0.5)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Liberty", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200
        assert answer.json()["usage"]["completion_tokens"] == 3
        abandoned = results[0]
        assert 0 < len(abandoned.token_ids) < 1000 and abandoned is not results[-1]


# --- the command line -------------------------------------------------------------------------------------------------

def test_run_takes_its_options_before_or_after_the_prompt(small, capsys):
    path, _ = small
    assert main(["run", str(path), "-n", "3", "--temperature", "0", "Say hi"]) == 0
    first = capsys.readouterr().out
    assert main(["run", str(path), "Say hi", "-n", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first
    assert main(["run", str(path), "--raw", "Say hi", "-n", "2"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["run", "B", "-t", "-2", "x"], "must be 1 or more, got -2"),
    (["run", "B", "-n", "-1", "x"], "must be 0 or more, got -1"),
    (["serve", "B", "--port", "99999"], "a port is 0-65535, got 99999"),
    (["convert", "-m", "M", "-o", "O", "-s", "0"], "must be 2 or more, got 0"),
    (["convert", "-m", "M", "-o", "O", "-g", "8"], "must be 16 or more, got 8"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_version(capsys):
    """--version names edgellm's and ONNX Runtime's versions and the kernels sessions run their matmuls with."""
    import onnxruntime

    from edgellm.kernels import status

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == (f"edgellm {edgellm.__version__} (onnxruntime {onnxruntime.__version__}; "
                                               f"matmuls: {status().describe()})")


def test_a_taken_port_is_one_clear_error_before_loading(small, capsys, monkeypatch):
    path, _ = small
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    loaded = []
    monkeypatch.setattr("edgellm.load", lambda *a, **k: loaded.append(1))
    try:
        assert main(["serve", str(path), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1:" in err and "choose another --port" in err and "Traceback" not in err
    assert not loaded and "serving" not in err


def test_chat_commands_interrupts_and_dropped_turns(small, monkeypatch, capsys):
    path, model = small
    lines = iter(["/foo", "/image nothing.png", "//slash", "again " * 15, "and more " * 10, "stop me", "Liberty",
                  "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    from edgellm.runtime.conversation import Conversation

    stream = Conversation.stream

    def interrupted(self, text, *args, **kwargs):  # Ctrl-C arrives while "stop me" is answered
        pieces = stream(self, text, *args, **kwargs)
        try:
            for i, piece in enumerate(pieces):
                if text == "stop me" and i == 1:
                    raise KeyboardInterrupt
                yield piece
        finally:
            pieces.close()

    monkeypatch.setattr(Conversation, "stream", interrupted)
    assert main(["chat", str(path), "-n", "8", "--temperature", "0", "--repetition-penalty", "1"]) == 0
    err = capsys.readouterr().err
    assert "unknown command /foo" in err
    assert "this bundle has no vision graph" in err  # at /image, not at the next message
    assert "answer stopped" in err
    assert "turn(s) were dropped to fit the 96-token context" in err
    assert err.count("TTFT") == 4  # //slash, the two long turns, Liberty: the session went on after Ctrl-C


# --- the converter and the Python API ---------------------------------------------------------------------------------

def test_convert_documents_its_keywords_and_writes_nothing_to_stdout(tiny, tmp_path, capsys):
    parameters = inspect.signature(edgellm.convert).parameters
    assert {"quantize", "group_size", "seq_length", "kv_cache", "reblock", "force"} <= set(parameters)
    assert "kv_cache" in edgellm.convert.__doc__
    _, folder = tiny("llama")
    edgellm.convert(folder, tmp_path / "b", seq_length=64)
    out = capsys.readouterr()
    assert out.out == "" and "wrote" in out.err
    with pytest.raises(EdgeLLMError, match=r"already exists; .*force=True in Python"):
        edgellm.convert(folder, tmp_path / "b", progress=False)
    with pytest.raises(EdgeLLMError, match="seq_length=5000 is more than the 1024 positions"):
        edgellm.convert(folder, tmp_path / "c", seq_length=5000, progress=False)
    with pytest.raises(EdgeLLMError, match="seq_length=0 is too short: a KV cache holds at least 2 positions"):
        edgellm.convert(folder, tmp_path / "c", seq_length=0, progress=False)
    assert not (tmp_path / "c").exists()


def test_the_readme_python_snippet_runs_as_written(tiny, tmp_path, monkeypatch):
    """The first example of the README's Python API section, run on a tiny model's Hugging Face folder and on a GGUF
    of it: every name is defined before it is used, and the options it writes out apply to both."""
    from pathlib import Path

    import gguf
    from test_gguf import write_gguf

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    model, folder = tiny("llama")
    monkeypatch.chdir(tmp_path)
    q4 = tmp_path / "model.gguf"
    write_gguf(model, folder, q4, "llama", gguf.GGMLQuantizationType.Q4_0)
    for source in (folder, q4):
        out = tmp_path / f"bundle-{source.suffix or 'folder'}"
        # the tiny model is trained for 1,024 positions
        run = code.replace('"qwen2.5-0.5b"', repr(str(source))).replace('"qwen-w4"', repr(str(out)))
        exec(compile(run.replace("seq_length=2048", "seq_length=256"), "README.md", "exec"), {})
        assert (out / "manifest.json").exists()


def test_interleaved_conversations_never_see_each_others_cache(bundle):
    """Two users' conversations alternate on one model: each gets the answers it gets alone, and the cache it
    reuses is never more than the token prefix it shares with what the cache held."""
    path = bundle("llama", "f32", seq_length=512)
    shared, alone = edgellm.load(path), {name: edgellm.load(path) for name in "ab"}
    turns = {"a": ["We hold these truths", "that all men are created equal", "Liberty"],
             "b": ["When in the Course of human events", "it becomes necessary", "Liberty"]}
    histories = {"a": [], "b": []}
    solo = {}
    for name, model in alone.items():  # each conversation on a model of its own
        chat = model.chat(max_new_tokens=8)
        solo[name] = [chat.send(text) for text in turns[name]]
    cached_before: list[int] = []
    for i in range(3):
        for name in "ab":
            histories[name].append({"role": "user", "content": turns[name][i]})
            ids = shared.prompt_ids(histories[name])
            result = shared.generate(histories[name], max_new_tokens=8)
            common = next((k for k, (x, y) in enumerate(zip(ids, cached_before)) if x != y),
                          min(len(ids), len(cached_before)))
            assert result.reused_tokens <= common
            assert result.text == solo[name][i]
            histories[name].append({"role": "assistant", "content": result.text})
            cached_before = ids + result.token_ids


def test_a_full_queue_answers_503_with_retry_after(bundle):
    import httpx

    model = edgellm.load(bundle("llama", "f32", seq_length=1024))
    decode = model.engine.decode

    def paced(token):  # a model of a real size: the first answer holds the model for seconds
        time.sleep(0.005)
        return decode(token)

    model.engine.decode = paced
    long = {"prompt": "We hold these truths", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with running_server(create_app(model, "tiny", max_queue=1)) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as first:
            lines = first.iter_lines()  # (kept: a dropped iterator would close the stream)
            next(lines)  # generating
            waiting = {}
            queued = threading.Thread(target=lambda: waiting.update(r=httpx.post(
                f"{url}/v1/completions", json={"prompt": "Liberty", "max_tokens": 2}, timeout=60)))
            queued.start()
            deadline = time.monotonic() + 20
            while "edgellm_queue_length 1" not in httpx.get(f"{url}/metrics").text:  # the second waits its turn
                assert time.monotonic() < deadline and not waiting
                time.sleep(0.02)
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Liberty", "max_tokens": 2}, timeout=60)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert "the server is busy" in refused.json()["error"]["message"]
        queued.join(30)  # closing the first stream frees the model for the one that waited
        assert waiting["r"].status_code == 200
