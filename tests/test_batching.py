"""Continuous batching and the prompt cache: several sequences decode in one graph call and each gets the answer it
gets alone; requests join and leave at any step, a long prompt is prefilled between decode steps; finished sequences
are kept (in memory, and on disk across restarts) and later prompts that start the same way continue from them."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import numpy as np
import pytest

import edgellm
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from edgellm.runtime.batch import Batcher
from edgellm.runtime.prompt_cache import FILE_SUFFIX, PromptCache
from edgellm.server import create_app
from helpers import running_server

PROMPTS = ["When in the Course of human events", "We hold these truths", "Liberty", "the pursuit of Happiness",
           "Governments are instituted among Men", "deriving their just powers", "from the consent of the governed",
           "That whenever any Form of Government"]


@pytest.mark.parametrize("arch,options", [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("gemma3", {}),
                                          ("minicpm3", {}), ("llama", {"kv_cache": "int8"})])
def test_a_batched_decode_step_gives_each_sequence_its_own_logits(bundle, arch, options):
    """Sequences of different lengths decode together in one call; each row is what that sequence alone gets."""
    path = bundle(arch, "f32", **options)
    alone, together = edgellm.load(path), edgellm.load(path, slots=4)
    engine = together.engine
    assert engine.batched and len(engine.slots) == 4
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 6, 2)]  # gemma3's 8-token window: some slide past it
    tokens = []
    for slot, ids in zip(engine.slots, prompts):
        with engine.using(slot):
            tokens.append(int(np.argmax(engine.prefill(ids))))
    histories = [ids + [t] for ids, t in zip(prompts, tokens)]
    for _ in range(10):
        rows = engine.decode_batch(engine.slots, tokens)
        for history, row in zip(histories, rows):
            alone.engine.reset()
            alone.engine.prefill(history[:-1])
            want = alone.engine.decode(history[-1])
            np.testing.assert_allclose(row, want, atol=2e-4 if options else 2e-5, rtol=0)
        tokens = [int(np.argmax(r)) for r in rows]
        for history, t in zip(histories, tokens):
            history.append(t)


def test_slots_are_refused_where_the_decoder_cannot_batch(bundle):
    path = bundle("llama", "f32")
    with pytest.raises(EdgeLLMError, match="must be 1 or more"):
        edgellm.load(path, slots=0)
    model = edgellm.load(path, slots=None)  # the default: as many as memory allows, at most 4
    assert 1 <= len(model.engine.slots) <= 4


def solo_answers(path, requests: list[dict]) -> list[str]:
    model = edgellm.load(path)
    return [model.generate(r["prompt"], max_new_tokens=r["max_tokens"], raw=True, ignore_eos=True).text
            for r in requests]


def stream_text(url: str, request: dict) -> tuple[str, dict]:
    text, usage = "", None
    with httpx.stream("POST", f"{url}/v1/completions", json={**request, "stream": True,
                                                               "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event["choices"]:
                    text += event["choices"][0]["text"]
                if event.get("usage"):
                    usage = event["usage"]
    return text, usage


def metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))


def test_eight_concurrent_streams_get_their_solo_answers(bundle):
    """Greedy answers through the server at --parallel 4 are token for token the ones each request gets alone;
    requests of different lengths leave at different steps and the queued ones take their places."""
    path = bundle("llama", "f32", seq_length=256)
    requests = [{"prompt": p, "max_tokens": 20 + 7 * i, "temperature": 0, "ignore_eos": True}
                for i, p in enumerate(PROMPTS)]
    want = solo_answers(path, requests)
    model = edgellm.load(path, slots=4)
    with running_server(create_app(model, "tiny")) as url:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: stream_text(url, r), requests))
        assert [text for text, _ in got] == want
        assert [usage["completion_tokens"] for _, usage in got] == [r["max_tokens"] for r in requests]
        assert metric(url, "edgellm_batch_mean") > 1  # they did decode together (how much: the host's timing)
        assert metric(url, "edgellm_running") == 0 and metric(url, "edgellm_queue_length") == 0


class Recorder:
    """Records what the engine runs: ("prefill", slot index) per chunk, ("decode", batch size) per step."""

    def __init__(self, engine):
        self.events, forward, decode_batch = [], engine.forward, engine.decode_batch

        def recorded_forward(embeds, *args, **kwargs):
            if len(embeds) > 1:
                self.events.append(("prefill", engine.slot.index))
            return forward(embeds, *args, **kwargs)

        def recorded_decode(slots, tokens):
            self.events.append(("decode", len(slots)))
            return decode_batch(slots, tokens)

        engine.forward, engine.decode_batch = recorded_forward, recorded_decode


def run_batcher(model, prompts_and_limits, cache=None):
    """Answers through a Batcher directly: [(text, result)] in submission order."""
    batcher = Batcher(model, cache)
    done, out = threading.Event(), {}
    left = [len(prompts_and_limits)]
    lock = threading.Lock()

    def deliver_for(i):
        def deliver(kind, value):
            with lock:
                if kind == "piece":
                    out.setdefault(i, ["", None])[0] += value
                else:
                    out.setdefault(i, ["", None])[1] = value
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return deliver

    # every answer made ready first, then submitted back to back: what the Batcher does with them then does not
    # depend on how long preparing the later prompts took (a busy machine once let the first answer finish first)
    answers = [model.start(prompt, max_new_tokens=limit, raw=True, ignore_eos=True)
               for prompt, limit in prompts_and_limits]
    for i, answer in enumerate(answers):
        batcher.submit(answer, deliver_for(i))
    assert done.wait(120)
    batcher.close()
    return [tuple(out[i]) for i in range(len(prompts_and_limits))]


def test_a_long_prompt_is_prefilled_between_decode_steps(bundle):
    """A prompt of many chunks never holds the running answers up for more than one chunk."""
    path = bundle("llama", "f32", seq_length=512, chunk_length=16)
    model = edgellm.load(path, slots=2)
    recorder = Recorder(model.engine)
    long_prompt = " ".join(PROMPTS * 3)
    assert len(model.prompt_ids(long_prompt, raw=True)) > 8 * 16
    results = run_batcher(model, [("Liberty", 60), (long_prompt, 5)])
    events = recorder.events
    chunks = [i for i, e in enumerate(events) if e[0] == "prefill" and i > 2]
    assert len(chunks) >= 8
    for a, b in zip(chunks, chunks[1:]):  # a decode step between any two chunks of the long prompt
        assert any(e[0] == "decode" for e in events[a + 1:b])
    assert ("decode", 2) in events  # then it joined the running one
    alone = edgellm.load(path)
    assert results[1][0] == alone.generate(long_prompt, max_new_tokens=5, raw=True, ignore_eos=True).text
    assert results[0][0] == alone.generate("Liberty", max_new_tokens=60, raw=True, ignore_eos=True).text


def test_an_error_in_one_request_leaves_the_others_running(bundle):
    path = bundle("llama", "f32", seq_length=64)
    model = edgellm.load(path, slots=2)
    batcher = Batcher(model)
    got = {}
    finished = threading.Event()

    def deliver(name):
        def to(kind, value):
            got.setdefault(name, []).append(kind)
            if name == "good" and kind in ("done", "error"):
                finished.set()
        return to

    good = model.start("We hold these truths", max_new_tokens=40, raw=True, ignore_eos=True)
    bad = model.start("Liberty", max_new_tokens=5, raw=True)
    bad.prompt.ids.extend([5] * 80)  # longer than the bundle after it was checked: the prefill refuses it
    batcher.submit(good, deliver("good"))
    batcher.submit(bad, deliver("bad"))
    assert finished.wait(60)
    batcher.close()
    assert got["bad"] == ["error"] and got["good"][-1] == "done"
    assert len(good.result.token_ids) == 40


def test_a_shared_system_prompt_is_computed_once(bundle):
    """Conversations with one system prompt start from each other's positions, reported as cached_tokens, and get
    the answers they get with nothing cached; a conversation whose slot another one took continues from the prompt
    cache."""
    path = bundle("llama", "f32", seq_length=256)
    system = {"role": "system", "content": " ".join(PROMPTS)}
    first = [system, {"role": "user", "content": "Liberty"}]
    second = [system, {"role": "user", "content": "the pursuit of Happiness"}]
    model = edgellm.load(path, slots=1)
    model.prompt_cache = PromptCache(64, model.bundle)
    alone = edgellm.load(path)
    shared = len(model.system_prefix(system["content"]))
    with running_server(create_app(model, "tiny", prompt_cache=model.prompt_cache)) as url:
        cached = []
        for messages in (first, second, first):  # answers long enough to be worth keeping when overwritten
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 70,
                                                               "temperature": 0, "ignore_eos": True}, timeout=60)
            body = r.json()
            alone.engine.reset()
            want = alone.generate(messages, max_new_tokens=70, ignore_eos=True).text
            assert body["choices"][0]["message"]["content"] == want
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[0] == 0 and shared <= cached[1] < body["usage"]["prompt_tokens"] - 1
        assert cached[2] == body["usage"]["prompt_tokens"] - 1  # all but the last token, from the prompt cache
        # every request that started from cached positions counts, a slot's own as well as the prompt cache's
        assert metric(url, "edgellm_prompt_cache_hits") == 2 and metric(url, "edgellm_prompt_cache_entries") >= 1


def test_a_server_keeps_its_prompt_cache_across_a_restart(bundle, tmp_path):
    path = bundle("llama", "f32", seq_length=256)
    request = {"prompt": " ".join(PROMPTS), "max_tokens": 4, "temperature": 0}
    usages = []
    for _ in range(2):
        model = edgellm.load(path, slots=2)
        cache = PromptCache(64, model.bundle, tmp_path / "cache")
        with running_server(create_app(model, "tiny", prompt_cache=cache)) as url:
            usages.append(httpx.post(f"{url}/v1/completions", json=request, timeout=60).json()["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == usages[1]["prompt_tokens"] - 1


def test_the_prompt_cache_survives_a_restart_and_refuses_other_bundles(bundle, tmp_path):
    path = bundle("llama", "f32", seq_length=256)
    other = bundle("qwen2", "f32", seq_length=256)
    folder = tmp_path / "cache"
    model = edgellm.load(path)
    model.prompt_cache = PromptCache(64, model.bundle, folder)
    first = model.generate("We hold these truths to be self-evident", max_new_tokens=6, raw=True)
    model.prompt_cache.flush()
    assert len(list(folder.glob(f"*{FILE_SUFFIX}"))) == 1

    again = edgellm.load(path)  # a new process, in effect: an empty KV cache
    again.prompt_cache = PromptCache(64, again.bundle, folder)
    assert len(again.prompt_cache) == 1 and not again.prompt_cache.refused
    result = again.generate("We hold these truths to be self-evident", max_new_tokens=6, raw=True)
    assert result.text == first.text and result.reused_tokens == result.prompt_tokens - 1

    foreign = edgellm.load(other)
    cache = PromptCache(64, foreign.bundle, folder)
    assert len(cache) == 0 and "computed with another bundle" in cache.refused[0]

    (folder / f"truncated{FILE_SUFFIX}").write_bytes(next(folder.glob(f"*{FILE_SUFFIX}")).read_bytes()[:500])
    cache = PromptCache(64, again.bundle, folder)
    assert len(cache) == 1 and "truncated or damaged" in cache.refused[0]


def test_the_cache_is_bounded_and_keeps_a_pinned_prompt(bundle):
    path = bundle("llama", "f32", seq_length=256)
    model = edgellm.load(path)
    model.generate("Liberty", max_new_tokens=1, raw=True)
    per_token = model.engine.snapshot().kv.nbytes // model.engine.length
    model.prompt_cache = cache = PromptCache(60 * per_token / (1 << 20), model.bundle)
    model.cache_prompt(" ".join(PROMPTS[:2]), raw=True)
    for p in PROMPTS[2:]:
        model.generate(p, max_new_tokens=12, raw=True, ignore_eos=True)
        assert cache.nbytes <= cache.limit
    assert any(e.pinned for e in cache.entries.values())
    assert len(cache) < len(PROMPTS) - 1  # the oldest answers went


def test_cache_prompt_precomputes_a_system_prompt_for_run(bundle, tmp_path, capsys):
    path = bundle("llama", "f32", seq_length=256)
    system = tmp_path / "system.txt"
    system.write_text(" ".join(PROMPTS), encoding="utf-8")
    folder = tmp_path / "shared"
    assert main(["cache-prompt", str(path), "--file", str(system), "-o", str(folder)]) == 0
    assert "cached" in capsys.readouterr().err
    argv = ["run", str(path), "Liberty", "--system", system.read_text(), "-n", "6", "--temperature", "0"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert main(argv + ["--prompt-cache", str(folder)]) == 0
    cached = capsys.readouterr()
    assert cached.out == plain.out
    assert "(0 cached)" in plain.err and "(0 cached)" not in cached.err

    (tmp_path / "empty.txt").write_text("  ")
    assert main(["cache-prompt", str(path), "--file", str(tmp_path / "empty.txt"), "-o", str(folder)]) == 2
    assert "the text is empty" in capsys.readouterr().err


def test_run_skips_a_damaged_prompt_cache_file_with_a_warning(bundle, tmp_path, capsys):
    path = bundle("llama", "f32", seq_length=256)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / f"broken{FILE_SUFFIX}").write_bytes(b"PK\x03\x04 not a whole file")
    assert main(["run", str(path), "Liberty", "-n", "2", "--prompt-cache", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "truncated or damaged" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(path), "--parallel", "0"])
    assert exit_.value.code == 2 and "must be 1 or more, got 0" in capsys.readouterr().err
