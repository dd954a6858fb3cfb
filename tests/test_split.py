"""Decoders written as stages (`--num-device N`): each stage a graph of contiguous layers with its own KV cache,
run in turn (each on its own session, device and threads), passing hidden states on; the same answers as the one
graph."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS


@pytest.mark.parametrize("arch,stages", [("llama", 2), ("gemma3", 2), ("olmo2", 2), ("qwen3", 2)])
def test_a_split_decoder_answers_as_the_one_graph(tiny, tmp_path, arch, stages):
    _, folder = tiny(arch)
    options = dict(quantize="f32", seq_length=96, chunk_length=16, progress=False)
    whole = edgellm.load(edgellm.convert(folder, tmp_path / "whole", **options))
    bundle = edgellm.convert(folder, tmp_path / "split", num_devices=stages, **options)
    split = edgellm.load(bundle, device=",".join(["cpu"] * stages))
    assert len(split.engine.stages) == stages
    ids = whole.tokenizer.encode(CORPUS.read_text())[:40]
    np.testing.assert_allclose(split.logits(ids), whole.logits(ids), rtol=0, atol=2e-5)
    greedy = dict(max_new_tokens=20, ignore_eos=True)
    assert split.generate("Four score and seven", **greedy).token_ids == \
        whole.generate("Four score and seven", **greedy).token_ids


def test_three_stages_of_a_deeper_model(tmp_path):
    """Five layers in three stages (2, 2, 1) against transformers itself."""
    from test_text_models import check_parity, tiny_pair

    ref_model, model = tiny_pair(tmp_path, "LlamaConfig", "LlamaForCausalLM", 31, num_hidden_layers=5)
    split = edgellm.load(edgellm.convert(tmp_path, tmp_path / "split", quantize="f32", seq_length=128,
                                         chunk_length=16, num_devices=3, progress=False), device="cpu,cpu,cpu")
    assert split.engine.stage_layers == [[0, 1], [2, 3], [4]]
    check_parity(ref_model, split)


BATCHED_PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


def check_batched_step(engine, alone) -> tuple[list[int], np.ndarray]:
    """Two prompts prefilled in `engine`'s two slots and one decode step of both together: each row is what the
    `alone` engine gives that prompt by itself. Returns (the prompts' first tokens, the rows)."""
    tokens = []
    for slot, ids in zip(engine.slots, BATCHED_PROMPTS):
        with engine.using(slot):
            tokens.append(int(np.argmax(engine.prefill(ids))))
    rows = engine.decode_batch(engine.slots, tokens)
    for ids, token, row in zip(BATCHED_PROMPTS, tokens, rows):
        alone.reset()
        alone.prefill(ids)
        np.testing.assert_allclose(row, alone.decode(token), atol=2e-5, rtol=0)
    return tokens, rows


def test_a_split_bundle_batches_and_refuses_another_device_count(tiny, tmp_path):
    _, folder = tiny("llama")
    bundle = edgellm.convert(folder, tmp_path / "split", quantize="f32", seq_length=64, num_devices=2,
                             progress=False)
    with pytest.raises(EdgeLLMError, match="split for 2 devices; give 2"):
        edgellm.load(bundle, device="cpu,cpu,cpu")
    one = edgellm.load(bundle)  # one device for every stage
    many = edgellm.load(bundle, device="cpu,cpu", slots=2)
    check_batched_step(many.engine, one.engine)
    with pytest.raises(EdgeLLMError, match="num_devices=3 is not a device count: it must be from 1 to the 2 layers"):
        edgellm.convert(folder, tmp_path / "x", num_devices=3, progress=False)


def test_prefill_chunks_are_pipelined_through_the_stages(tiny, tmp_path, monkeypatch):
    """Each chunk's stages are queued on the stages' workers (stage 2 of a chunk beside stage 1 of the next); the
    last position's logits are those of the stages run in turn."""
    from edgellm.runtime import runners

    _, folder = tiny("llama")
    split = edgellm.load(edgellm.convert(folder, tmp_path / "split", quantize="f32", seq_length=128, chunk_length=8,
                                         num_devices=2, progress=False), device="cpu,cpu")
    submitted = []
    real = runners.StagePipeline.submit
    monkeypatch.setattr(runners.StagePipeline, "submit",
                        lambda self, *args: submitted.append(1) or real(self, *args))
    ids = split.tokenizer.encode(CORPUS.read_text())[:60]
    last = split.engine.prefill(ids)
    assert len(submitted) == 8  # 60 tokens in chunks of 8
    split.engine.reset()
    np.testing.assert_allclose(last, split.logits(ids)[-1], rtol=0, atol=1e-5)
