"""`edgellm serve BUNDLE --ray --replicas 2` as a user runs it: a local Ray started by the command, the front
listening on --port, the openai client answered with edgellm's greedy text, and SIGTERM (as Ctrl-C) stopping the
application cleanly, with no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import edgellm

pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'edgellm[ray]')")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow


def test_the_command_serves_from_two_replicas_and_stops_cleanly(bundle, tmp_path):
    from test_ray_serve import QUESTION, free_port

    path = bundle("llama", "f32", seq_length=256)
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "edgellm", "serve", str(path), "--ray", "--replicas", "2", "--port", str(port),
               "-t", "1", "--parallel", "1"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log.read_text()
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model=client.models.list().data[0].id, messages=QUESTION,
                                                max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == edgellm.load(path).generate(QUESTION, max_new_tokens=10).text
        server.send_signal(signal.SIGTERM)
        assert server.wait(90) == 0
    finally:
        if server.poll() is None:
            server.kill()
    output = log.read_text()
    assert "(2 replica(s))" in output and "stopping the Ray Serve application" in output
    assert "Traceback" not in output, output


def test_a_replica_that_cannot_load_is_one_clear_error(bundle, tmp_path):
    """The replicas cannot load the bundle (a file cut short after the command checked the folder): the command
    says the replicas' own reason, exits 2, and shows no traceback."""
    import shutil

    from test_ray_serve import free_port

    damaged = tmp_path / "damaged"
    shutil.copytree(bundle("llama", "f32", seq_length=256), damaged)
    largest = max(damaged.iterdir(), key=lambda f: f.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(100)
    done = subprocess.run([sys.executable, "-m", "edgellm", "serve", str(damaged), "--ray", "--port",
                           str(free_port()), "-t", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: the Ray Serve application did not start: " in done.stderr and "truncated" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
