"""Every case of the bad-input corpus (tests/bad_inputs/corpus.py): the expected exit code or HTTP status, one
message that says what to do, no traceback, and a server that answers the next good request."""

from __future__ import annotations

import builtins
import io
from types import SimpleNamespace

import gguf
import pytest
from bad_inputs.corpus import CASES
from starlette.testclient import TestClient
from test_gguf import write_gguf

import edgellm
from edgellm.cli import main
from edgellm.server import create_app


@pytest.fixture(scope="module")
def env(tiny, bundle, tmp_path_factory):
    model, folder = tiny("llama")
    path = tmp_path_factory.mktemp("corpus") / "q4.gguf"
    write_gguf(model, folder, path, "llama", gguf.GGMLQuantizationType.Q4_0)
    return SimpleNamespace(folder=folder, bundle=bundle("llama", "f32", seq_length=96), gguf=path, tmp=None)


@pytest.fixture(scope="module")
def client(env):
    return TestClient(create_app(edgellm.load(env.bundle), "tiny"), raise_server_exceptions=False)


def test_the_corpus_is_broad():
    surfaces = {case.name.split(":")[0] for case in CASES}
    assert len(CASES) >= 40 and surfaces == {"convert", "load", "run", "chat", "serve"}
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, env, client, tmp_path, monkeypatch, capsys):
    env.tmp = tmp_path
    if case.surface == "http":
        method, path, options = case.make(env)
        r = client.request(method, path, **options)
        assert r.status_code == case.code, r.text[:300]
        if case.message:
            body = r.json()
            assert case.message in body["error"]["message"] and set(body["error"]) == {"message", "type", "param",
                                                                                       "code"}
        good = client.post("/v1/completions", json={"prompt": "We hold", "max_tokens": 2})
        assert good.status_code == 200  # the server goes on
        return
    argv = case.make(env)
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(case.stdin)))
    if case.lines:
        lines = iter(case.lines)

        def typed(prompt=""):
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr(builtins, "input", typed)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    captured = capsys.readouterr()
    assert code == case.code, captured.err[-600:]
    assert case.message in captured.err, captured.err[-600:]
    assert "Traceback" not in captured.err + captured.out
    if case.name.startswith("convert"):
        assert not (tmp_path / "out").exists()  # a refused conversion writes nothing
        assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_reader_that_goes_away_gets_no_traceback():
    """`edgellm convert --list | head -1`: the pipe closes under the printing; the command stops quietly."""
    import subprocess
    import sys

    code = "import sys; from edgellm.cli import main; sys.exit(main(['convert', '--list']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the table is printed: its first write fails
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and proc.returncode in (0, 141), err
