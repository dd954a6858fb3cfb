"""A decoder written as stages (convert --num-device) with each stage in a Ray actor, on a local Ray of the machine's
2 CPUs: the same logits and tokens as the one graph, prefill chunks pipelined through the actors, batched decoding,
slots moved and the prompt cache restored through the actors' caches; placement it cannot meet and a lost actor are
one clear error."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'edgellm[ray]')")

pytestmark = pytest.mark.slow
GREEDY = dict(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def split(tiny, tmp_path_factory):
    """(the one-graph model, the two-stage bundle), chunks of 8 so that a prompt is several."""
    _, folder = tiny("llama")
    out = tmp_path_factory.mktemp("ray-stages")
    options = dict(quantize="f32", seq_length=128, chunk_length=8, progress=False)
    whole = edgellm.load(edgellm.convert(folder, out / "whole", **options))
    return whole, edgellm.convert(folder, out / "split", num_devices=2, **options)


def test_two_stage_actors_answer_as_the_one_graph(local_ray, split, monkeypatch):
    whole, bundle = split
    model = edgellm.load(bundle, stage_placement="spread")
    assert "stages on Ray nodes" in model.engine.describe() and model.engine.stage_layers == [[0], [1]]
    ids = whole.tokenizer.encode(CORPUS.read_text())[:40]
    np.testing.assert_allclose(model.logits(ids), whole.logits(ids), rtol=0, atol=2e-5)
    # a prompt of five chunks, each chunk's second stage queued behind its first on the actors
    from edgellm.runtime.ray_stages import RayStagedRunner

    submitted = []
    real = RayStagedRunner.submit
    monkeypatch.setattr(RayStagedRunner, "submit", lambda self, *a: submitted.append(1) or real(self, *a))
    model.engine.reset()
    last = model.engine.prefill(ids)
    assert len(submitted) == 5
    np.testing.assert_allclose(last, whole.logits(ids)[-1], rtol=0, atol=2e-5)
    for prompt in ("Four score and seven", [{"role": "user", "content": "We hold these truths"}]):
        assert model.generate(prompt, **GREEDY).token_ids == whole.generate(prompt, **GREEDY).token_ids
    model.close()


def test_batched_decoding_and_the_prompt_cache_go_through_the_actors(local_ray, split):
    from test_batching import run_batcher
    from test_split import BATCHED_PROMPTS, check_batched_step

    from edgellm.runtime.prompt_cache import PromptCache

    whole, bundle = split
    model = edgellm.load(bundle, stage_placement="pack", slots=2)
    engine = model.engine
    tokens, rows = check_batched_step(engine, whole.engine)
    prompts = BATCHED_PROMPTS
    # a sequence moved to another slot, and one restored from a snapshot, continue as they were
    first, second = engine.slots
    kept = engine.snapshot(first)
    assert kept.kv.shape[:2] == (2, 2) and kept.kv.shape[3] == len(first)
    engine.move(first, second)
    with engine.using(second):
        engine.reset()
    with engine.using(first):
        np.testing.assert_allclose(engine.decode(int(np.argmax(rows[0]))), engine_decoded(whole, prompts[0],
                                   [tokens[0], int(np.argmax(rows[0]))]), rtol=0, atol=2e-5)
    with engine.using(second):
        engine.restore(kept, len(prompts[0]) + 1)
        np.testing.assert_allclose(engine.decode(int(np.argmax(rows[0]))), engine_decoded(whole, prompts[0],
                                   [tokens[0], int(np.argmax(rows[0]))]), rtol=0, atol=2e-5)
    # the server's batcher with a prompt cache: two answers together, then one that starts from the first's positions
    cache = PromptCache(16, model.bundle)
    asked = [("When in the Course of human events", 12), ("We hold these truths", 12)]
    answers = run_batcher(model, asked, cache)
    again = run_batcher(model, [(asked[0][0] + answers[0][0], 6)], cache)[0]
    assert again[1].reused_tokens > 0
    for (prompt, limit), (text, _) in zip(asked + [(asked[0][0] + answers[0][0], 6)], answers + [again]):
        assert text == whole.generate(prompt, max_new_tokens=limit, raw=True, ignore_eos=True).text
    model.close()


def engine_decoded(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The logits after `prompt` and then `tokens`, on the one graph."""
    model.engine.reset()
    model.engine.prefill(prompt + tokens[:-1])
    return model.engine.decode(tokens[-1])


def test_what_the_cluster_cannot_do_is_one_clear_error(local_ray, split, bundle, monkeypatch):
    from edgellm.cli import PLACEMENT_CHOICES
    from edgellm.runtime import ray_stages

    assert set(PLACEMENT_CHOICES) == set(ray_stages.PLACEMENTS)
    _, staged = split
    monkeypatch.setattr(ray_stages, "PLACEMENT_WAIT_S", 3.0)
    with pytest.raises(EdgeLLMError, match=r"no room for 2 stages .*strict-spread.* 1 node\(s\).*place them with "
                                           "spread"):
        edgellm.load(staged, stage_placement="strict-spread")
    with pytest.raises(EdgeLLMError, match="its decoder is one graph; stages on Ray need one written as stages"):
        edgellm.load(bundle("llama", "f32"), stage_placement="spread")
    with pytest.raises(EdgeLLMError, match="unknown stage placement 'far'"):
        edgellm.load(staged, stage_placement="far")
    with pytest.raises(EdgeLLMError, match=r"node .* has no bundle at /nowhere: every node that runs a stage"):
        ray_stages.StageWorker("/nowhere", 0, "cpu", 1, None)
    # a stage whose actor (or node) is lost: the next call says so, and the model loads again
    model = edgellm.load(staged, stage_placement="spread")
    ray.kill(model.engine.remote.actors[1])
    with pytest.raises(EdgeLLMError, match="a stage's actor is gone .*load the model again"):
        model.generate("Liberty", max_new_tokens=3)
    model.close()  # (its placement group holds the CPUs until then, or until it is collected)
    assert edgellm.load(staged, stage_placement="spread").generate("Liberty", max_new_tokens=3).token_ids


def test_the_cli_runs_the_stages_on_ray(local_ray, split, capsys):
    from edgellm.cli import main

    whole, bundle = split
    assert main(["run", str(bundle), "--ray-stages", "-p", "Liberty", "-n", "8", "--temperature", "0",
                 "--no-loop-stop"]) == 0
    out, err = capsys.readouterr()
    assert "stages on Ray nodes" in err
    assert whole.generate("Liberty", max_new_tokens=8, temperature=0, stop_loops=False).text in out


def test_a_ray_serve_replica_answers_from_stage_actors(local_ray, split, tmp_path):
    """`edgellm serve STAGED --ray --ray-stages --prompt-cache DIR`: the replica's model runs its stages in actors
    of their own; a stage whose process dies fails the answer in flight and the next request loads the model again;
    when Serve stops the replica, its answered conversations are in the prompt cache's folder."""
    openai = pytest.importorskip("openai")
    from ray import serve
    from test_ray_serve import QUESTION, free_port

    from edgellm.server.replicas import APP_NAME, ReplicaSettings, application

    whole, bundle = split
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = ReplicaSettings(ray_stages="spread", threads=1, parallel=2, cache_mib=16,
                                   prompt_cache=str(tmp_path / "kept"))
        serve.run(application([("tiny", str(bundle))], settings, replicas=1, cpus_per_replica=0), name=APP_NAME,
                  route_prefix="/", blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0)
        want = whole.generate(QUESTION, max_new_tokens=10).text
        assert answer.choices[0].message.content == want
        # a stage's process dies (its node failed): the answer in flight fails, and the model is loaded again
        import os
        import signal
        from pathlib import Path

        def title(process: Path) -> bytes:
            try:
                return (process / "cmdline").read_bytes()
            except OSError:  # (it ended meanwhile)
                return b""

        stages = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                  and title(p).startswith(b"ray::StageWorker")]
        assert stages
        for pid in stages:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0)
        again = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=10, temperature=0)
        assert again.choices[0].message.content == want
    finally:
        serve.shutdown()
    from edgellm.runtime.prompt_cache import FILE_SUFFIX

    assert list((tmp_path / "kept").glob(f"*{FILE_SUFFIX}"))


def test_lora_adapters_reach_every_stage(local_ray, tiny, tmp_path):
    """A bundle with LoRA slots and two stages on Ray: each adapter goes to both actors, answers with it are the
    one graph's with it, and two slots with different adapters decode together."""
    pytest.importorskip("peft")
    from test_lora import adapter

    ref_model, folder = tiny("qwen2")
    adapter(ref_model, tmp_path / "a", 5)
    adapter(ref_model, tmp_path / "b", 6, r=2, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    options = dict(quantize="f32", seq_length=64, chunk_length=8, lora_slots=2, lora_max_rank=4, progress=False)
    whole = edgellm.load(edgellm.convert(folder, tmp_path / "whole", **options))
    model = edgellm.load(edgellm.convert(folder, tmp_path / "split", num_devices=2, **options),
                         stage_placement="spread", slots=2)
    for one in (whole, model):
        one.load_adapter(tmp_path / "a", "a")
        one.load_adapter(tmp_path / "b", "b")
    ids = whole.tokenizer.encode(CORPUS.read_text())[:20]
    for name in (None, "a", "b"):
        np.testing.assert_allclose(model.logits(ids, adapter=name), whole.logits(ids, adapter=name), rtol=0,
                                   atol=2e-5)
    assert np.abs(model.logits(ids, adapter="a") - model.logits(ids)).max() > 1e-2  # (the adapter changes them)
    engine = model.engine
    for slot, name in zip(engine.slots, ("a", "b")):
        with engine.using(slot):
            engine.set_adapter(name)
            engine.prefill(ids[:10])
    together = engine.decode_batch(engine.slots, [ids[10], ids[10]])
    for row, name in zip(together, ("a", "b")):
        np.testing.assert_allclose(row, whole.logits(ids[:11], adapter=name)[-1], rtol=0, atol=2e-5)
    model.close()
