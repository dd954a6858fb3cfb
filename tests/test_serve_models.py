"""Several models per server (server/pool.py): `serve a.gguf folder bundle` offers each, a request's "model" picks
one, loaded when first asked for; with --max-models the least recently used idle one is unloaded, never one that
is answering; each has its own batch and prompt cache."""

from __future__ import annotations

import gguf
import httpx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient
from test_gguf import write_gguf

import edgellm
from edgellm.cli import main
from edgellm.server import create_app
from edgellm.server.pool import ModelPool, ServedModel
from helpers import pace_generations, running_server

pytestmark = pytest.mark.slow


def served(name, path, loads, paced=False):
    def load():
        loads.append(name)
        model = edgellm.load(path)
        if paced:
            pace_generations(model, 0.02)  # a real model's pace: an answer of 200 tokens takes seconds
        return model, None
    return ServedModel(name, load, path=path)


@pytest.fixture
def two(bundle):
    return {"llama": bundle("llama", "f32", seq_length=256), "qwen2": bundle("qwen2", "f32", seq_length=256)}


def test_a_request_picks_its_model_and_each_answers_as_alone(two):
    loads: list[str] = []
    pool = ModelPool([served(name, path, loads) for name, path in two.items()])
    with running_server(create_app(pool=pool)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        listed = {m.id for m in client.models.list().data}
        assert listed == {"llama", "qwen2"} and loads == []  # listed from their manifests, none loaded yet
        for name, path in two.items():
            got = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=6, temperature=0)
            want = edgellm.load(path).generate([{"role": "user", "content": "Hello"}], 6)
            assert got.model == name and got.choices[0].message.content == want.text
        assert loads == ["llama", "qwen2"]  # each loaded once, on its first request
        r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404 and "'llama', 'qwen2'" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["loaded"] == ["llama", "qwen2"]


def test_max_models_unloads_the_least_recently_used_idle_one(two):
    loads: list[str] = []
    pool = ModelPool([served(name, path, loads) for name, path in two.items()], max_models=1)
    client = TestClient(create_app(pool=pool))
    for name in ("llama", "qwen2", "qwen2", "llama"):
        r = client.post("/v1/completions", json={"model": name, "prompt": "We hold", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name
        assert [m.name for m in pool.loaded()] == [name]
    assert loads == ["llama", "qwen2", "llama"]
    assert "edgellm_models_loaded 1" in client.get("/metrics").text


def test_a_model_that_is_answering_is_never_unloaded(two):
    loads: list[str] = []
    pool = ModelPool([served(name, path, loads, paced=True) for name, path in two.items()], max_models=1)
    with running_server(create_app(pool=pool)) as url:
        long = {"model": "llama", "prompt": "We hold", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()  # held: a closed iterator closes the stream, which stops the answer
            while not next(lines).startswith("data: "):  # llama is answering
                pass
            other = httpx.post(f"{url}/v1/completions", json={"model": "qwen2", "prompt": "x", "max_tokens": 2})
            assert other.status_code == 503 and "all answering" in other.json()["error"]["message"]
            assert other.headers["Retry-After"]
        r = httpx.post(f"{url}/v1/completions", json={"model": "qwen2", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and loads == ["llama", "qwen2"]


def test_the_command_line_serves_a_gguf_a_folder_and_a_bundle(tiny, bundle, tmp_path, monkeypatch, capsys):
    import uvicorn

    started = {}

    def run(server, sockets):
        started.update(app=server.config.app)
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    model, folder = tiny("llama")
    q8 = tmp_path / "tiny-q8.gguf"
    write_gguf(model, folder, q8, "llama", gguf.GGMLQuantizationType.Q8_0)
    path = bundle("qwen2", "f32", seq_length=96)
    assert main(["serve", str(q8), str(folder), str(path), "--port", "0", "--max-models", "2"]) == 0
    err = capsys.readouterr().err
    assert f"serving tiny-q8, {folder.name}, {path.name}" in err and "--max-models 2" in err
    client = TestClient(started["app"])
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-q8", folder.name, path.name]
    r = client.post("/v1/completions", json={"model": path.name, "prompt": "We hold", "max_tokens": 3,
                                             "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == edgellm.load(path).generate("We hold", 3, raw=True).text
    assert main(["serve", str(q8), str(path), "--name", "x", "--port", "0"]) == 2
    assert "--name and --adapter apply to a server of one model" in capsys.readouterr().err
    assert main(["serve", str(path), "--replicas", "2", "--port", "0"]) == 2
    assert "--replicas and --autoscale are Ray Serve's: add --ray" in capsys.readouterr().err
