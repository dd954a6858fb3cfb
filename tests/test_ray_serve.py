"""`edgellm serve --ray`: the server's application in Ray Serve replicas on a local Ray (the machine's 2 CPUs), driven
by the openai client: two replicas answer, streamed or not, with the greedy text `edgellm serve` gives. The front
listens itself here, as the CLI runs it; test_ray_stages serves through Ray Serve's HTTP proxy, as a Serve config
does."""

from __future__ import annotations

import socket

import pytest

import edgellm

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'edgellm[ray]')")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "When in the Course of human"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def replicas(bundle):
    from edgellm.server.replicas import APP_NAME, ReplicaSettings, application

    path = bundle("llama", "f32", seq_length=256)
    long = bundle("llama", "f32", seq_length=1024)  # for an answer long enough to be cut
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"location": "NoServer"})  # as `edgellm serve --ray`: the front listens itself
        settings = ReplicaSettings(threads=1, parallel=2, cache_mib=16)
        models = [("tiny", str(path)), ("tiny-long", str(long))]
        serve.run(application(models, settings, replicas=2, cpus_per_replica=0.5, listen=("127.0.0.1", port)),
                  name=APP_NAME, route_prefix=None, blocking=False)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0), path
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_as_the_server_does(replicas):
    client, path = replicas
    status = serve.status().applications["edgellm"].deployments["EdgeLLMReplica"]
    assert status.replica_states.get("RUNNING") == 2
    want = edgellm.load(path).generate(QUESTION, max_new_tokens=10)
    for _ in range(4):  # spread over both replicas
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == want.text
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-long"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=QUESTION, max_tokens=2)


def test_a_conversations_next_turn_finds_its_prefix_on_its_replica(replicas):
    """Conversations opened at once spread over both replicas; every next turn is routed to the replica that
    answered the turn before, whose prompt cache holds the conversation (cached_tokens), where Ray Serve's default
    router sends about half of them to the other replica."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    client, _ = replicas
    url = f"{client.base_url}chat/completions".replace("/v1/chat", "/v1/chat")
    history = {i: [{"role": "user", "content": f"Conversation {i}: we hold these truths, number {i}."}]
               for i in range(8)}

    def turn(i):
        r = httpx.post(url, json={"model": "tiny", "messages": history[i], "max_tokens": 6, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-edgellm-replica"], r.json()

    with ThreadPoolExecutor(4) as pool:  # opened together: the load spreads them
        first = list(pool.map(turn, history))
    assert len({replica for replica, _ in first}) == 2, first
    for i, (_, body) in enumerate(first):
        history[i] += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                       {"role": "user", "content": "And then?"}]
    for i, (replica, _) in enumerate(first):  # the next turns, one at a time
        answered_by, body = turn(i)
        assert answered_by == replica and body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, (i, body)


def test_a_client_that_leaves_stops_its_answer_and_metrics_add_up_over_replicas(replicas):
    """A streamed answer whose client leaves after a few pieces stops on its replica (counted "stopped" there);
    /metrics sums every replica's figures, /metrics/replicas gives each one's under its name."""
    import time

    import httpx

    client, _ = replicas
    base = str(client.base_url).removesuffix("/v1/")
    request = {"model": "tiny-long", "messages": [{"role": "user", "content": "Tell me everything."}],
               "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=request, timeout=60) as r:
        pieces = 0
        for line in r.iter_lines():
            pieces += line.startswith("data:")
            if pieces == 3:
                break  # leaving: the connection closes here

    def figures(text: str) -> dict[str, float]:
        return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                if line and not line.startswith("#")}

    for _ in range(60):
        total = figures(httpx.get(f"{base}/metrics", timeout=30).text)
        if total.get('edgellm_requests_total{outcome="stopped"}', 0) >= 1:
            break
        time.sleep(0.5)
    assert total.get('edgellm_requests_total{outcome="stopped"}', 0) >= 1, total
    assert total["edgellm_replicas"] == 2
    each = figures(httpx.get(f"{base}/metrics/replicas", timeout=30).text)
    names = {key.split('replica="')[1].split('"')[0] for key in each if 'replica="' in key}
    assert len(names) == 2
    for kind in ("prompt", "completion"):
        assert sum(v for k, v in each.items() if k.startswith("edgellm_tokens_total") and f'kind="{kind}"' in k) \
            == total[f'edgellm_tokens_total{{kind="{kind}"}}']
    # the stopped answer is far from its 900 tokens: its completion tokens are few
    assert total['edgellm_tokens_total{kind="completion"}'] < 900


def test_a_replica_killed_mid_answer_is_an_error_and_the_other_answers(replicas):
    """The replica holding a stream is killed: the stream ends (an error or a cut answer, never a hang), and the
    next requests are answered while Ray Serve starts a replacement."""
    import threading

    import httpx

    client, _ = replicas
    url = f"{client.base_url}chat/completions"
    request = {"model": "tiny-long", "messages": [{"role": "user", "content": "Tell me everything."}],
               "max_tokens": 1000,
               "ignore_eos": True, "temperature": 0, "stream": True}
    seen: dict = {"replica": None, "lines": [], "error": None}
    started = threading.Event()

    def read():
        try:
            with httpx.stream("POST", url, json=request, timeout=60) as r:
                seen["replica"] = r.headers["x-edgellm-replica"]
                for line in r.iter_lines():
                    seen["lines"].append(line)
                    started.set()
        except httpx.HTTPError as e:  # the connection cut: what a client sees of a dead replica
            seen["error"] = e
        finally:
            started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    killed = False
    for name in ray.util.list_named_actors(all_namespaces=True):
        actor = ray.get_actor(name["name"], namespace=name["namespace"])
        if "EdgeLLMReplica" in name["name"] and name["name"].endswith(f"#{seen['replica']}"):
            ray.kill(actor, no_restart=False)
            killed = True
    assert killed
    reader.join(60)
    assert not reader.is_alive()  # the stream ended rather than hung
    done = "data: [DONE]" in seen["lines"]
    assert seen["error"] is not None or not done, seen["lines"][-3:]  # cut short: the client can tell
    for _ in range(3):
        r = httpx.post(url.replace("chat/completions", "completions"), json={
            "model": "tiny", "prompt": "We hold", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200


def test_a_serve_config_builds_the_application(tmp_path):
    """What docs/ray.md's Serve config names: the builder takes the config's args, and refuses unknown ones."""
    from edgellm.errors import EdgeLLMError
    from edgellm.server.replicas import build

    app = build({"models": [["tiny", str(tmp_path)]], "replicas": 2, "threads": 1, "parallel": 2})
    assert type(app).__name__ == "Application"
    with pytest.raises(EdgeLLMError, match="unknown args in the Serve config: colour"):
        build({"models": {"tiny": str(tmp_path)}, "colour": "blue"})
    with pytest.raises(EdgeLLMError, match="need 'models'"):
        build({})
