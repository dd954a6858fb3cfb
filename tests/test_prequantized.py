"""GPTQ, AWQ and compressed-tensors checkpoints kept at their precision: a tiny model packed here in each published
layout (AutoGPTQ's "gptq" and GPTQModel's "gptq_v2", 4 and 8 bits, symmetric and not, with and without desc_act's
reordered groups; AutoAWQ's GEMM; llm-compressor's pack-quantized W4A16 / W8A16 by group or channel, with and
without activation ordering) converts to a bundle whose logits at float activations are the dequantized model's to
1e-5."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS, reference_logits, relative_error

GROUP = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def words(values: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """32 / bits values per int32 along `axis`, the first in the lowest bits."""
    per_word = 32 // bits
    v = np.moveaxis(values.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    packed = sum(v[..., i] << (bits * i) for i in range(per_word))
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis)).astype(np.uint32).view(np.int32)


def quantize_groups(w: np.ndarray, group_of: np.ndarray, groups: int, symmetric: bool, rng, bits: int = 4):
    """Codes [K, N], zeros and float16 scales [G, N] of w [N, K] by column group, and the dequantized w."""
    n, k = w.shape
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    codes, zeros, scales = np.zeros((k, n), np.uint8), np.zeros((groups, n), np.int64), np.zeros((groups, n))
    for g in range(groups):
        cols = np.flatnonzero(group_of == g)
        block = w[:, cols]
        if symmetric:
            scale, zero = np.abs(block).max(1) / (mid - 0.5), np.full(n, mid)
        else:
            low, high = block.min(1), block.max(1)
            scale = (high - low) / top
            zero = np.clip(np.round(-low / scale), 0, top).astype(np.int64)
        scale = scale.astype(np.float16).astype(np.float64)
        codes[cols] = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, top).T
        zeros[g], scales[g] = zero, scale
    dequantized = np.zeros_like(w)
    for g in range(groups):
        cols = np.flatnonzero(group_of == g)
        dequantized[:, cols] = (codes[cols].T.astype(np.float64) - zeros[g][:, None]) * scales[g][:, None]
    return codes, zeros, scales.astype(np.float16), dequantized.astype(np.float32)


def pack(layout: str, w: np.ndarray, rng) -> tuple[dict, np.ndarray]:
    n, k = w.shape
    group = k if "channel" in layout else GROUP
    groups, bits = k // group, 8 if "8bit" in layout else 4
    group_of = np.arange(k) // group
    if "desc_act" in layout or "actorder" in layout:  # columns quantized in an order of their own; groups follow it
        order = rng.permutation(k)
        group_of = np.empty(k, np.int64)
        group_of[order] = np.arange(k) // group
    if layout.startswith("gptq"):
        codes, zeros, scales, dequantized = quantize_groups(w, group_of, groups, "-sym" in layout, rng, bits)
        stored = zeros - (0 if "v2" in layout else 1)  # AutoGPTQ's format stores zero points minus one
        return {"qweight": words(codes, 0, bits), "qzeros": words(stored, 1, bits), "scales": scales,
                "g_idx": group_of.astype(np.int32)}, dequantized
    if layout.startswith("compressed"):  # codes and zero points are stored as unsigned: the signed value + 2^(b-1)
        codes, zeros, scales, dequantized = quantize_groups(w, group_of, groups, "-sym" in layout, rng, bits)
        parts = {"weight_packed": words(codes.T, 1, bits), "weight_scale": np.ascontiguousarray(scales.T),
                 "weight_shape": np.array([n, k], np.int32)}
        if "-sym" not in layout:
            parts["weight_zero_point"] = words(zeros.T, 0, bits)
        if "actorder" in layout:
            parts["weight_g_idx"] = group_of.astype(np.int32)
        return parts, dequantized
    codes, zeros, scales, dequantized = quantize_groups(w, np.arange(k) // GROUP, groups, False, rng)
    order = np.concatenate([np.array(AWQ_ORDER) + c for c in range(0, n, 8)])
    return {"qweight": words(codes[:, order], 1), "qzeros": words(zeros[:, order], 1), "scales": scales}, dequantized


def compressed_tensors(bits: int, strategy: str, symmetric: bool, actorder: str | None = None) -> dict:
    """The quantization_config llm-compressor writes for a W{bits}A16 scheme."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": GROUP if strategy == "group" else None, "actorder": actorder, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}}}


LAYOUTS = {
    "gptq-sym": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False},
    "gptq-asym": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False, "desc_act": False},
    "gptq-asym-desc_act": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False, "desc_act": True},
    "gptq-sym-desc_act-v2": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": True,
                             "checkpoint_format": "gptq_v2"},
    "gptq-asym-8bit": {"quant_method": "gptq", "bits": 8, "group_size": GROUP, "sym": False, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True},
    "compressed-sym": compressed_tensors(4, "group", True),
    "compressed-asym-actorder": compressed_tensors(4, "group", False, "group"),
    "compressed-sym-channel": compressed_tensors(4, "channel", True),
    "compressed-asym-8bit": compressed_tensors(8, "group", False),
}


def packed_checkpoint(tiny, tmp_path, layout: str):
    """(the checkpoint folder in `layout`, the transformers model holding its dequantized weights)."""
    import copy

    import torch
    from safetensors.numpy import load_file, save_file

    ref_model, folder = tiny("qwen2")  # biased q/k/v: the biases stay float beside the blocks
    out = tmp_path / layout
    shutil.copytree(folder, out)
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(file))
        file.unlink()
    dequantized_model = copy.deepcopy(ref_model)
    rng = np.random.default_rng(3)
    state = dict(dequantized_model.named_parameters())
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in PROJECTIONS and n.endswith(".weight")]:
        parts, dequantized = pack(layout, tensors.pop(name).astype(np.float32), rng)
        prefix = name[: -len(".weight")]
        tensors.update({f"{prefix}.{p}": v for p, v in parts.items()})
        with torch.no_grad():
            state[name].copy_(torch.from_numpy(dequantized))
    with torch.no_grad():  # the bundle keeps its float embedding table in float16
        emb = dequantized_model.model.embed_tokens.weight
        emb.copy_(emb.half().float())
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = LAYOUTS[layout]
    (out / "config.json").write_text(json.dumps(config))
    return out, dequantized_model


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_checkpoints_convert_exactly(tiny, tmp_path, layout):
    folder, dequantized_model = packed_checkpoint(tiny, tmp_path, layout)
    bundle = edgellm.convert(folder, tmp_path / "bundle", progress=False, seq_length=128, chunk_length=16,
                             lm_head="f32", accuracy_level=0)
    model = edgellm.load(bundle)
    assert model.manifest.quantization.group_size == 128  # -g applies to float weights; the blocks keep 32
    ids = model.tokenizer.encode(CORPUS.read_text())[:40]
    err = relative_error(model.logits(ids), reference_logits(dequantized_model, ids))
    assert err < 1e-5, f"{layout}: {err:.2e} against the dequantized checkpoint"
    fast = edgellm.load(edgellm.convert(folder, tmp_path / "int8", progress=False, seq_length=128, chunk_length=16))
    assert relative_error(fast.logits(ids), reference_logits(dequantized_model, ids)) < 5e-2  # int8 activations


def test_other_quantization_methods_are_refused(tiny, tmp_path):
    _, folder = tiny("qwen2")
    out = tmp_path / "bnb"
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match="quantized with 'bitsandbytes'; edgellm reads float, GPTQ, AWQ"):
        edgellm.convert(out, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    w8a8 = compressed_tensors(8, "channel", True)
    w8a8["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "dynamic": True}
    config["quantization_config"] = w8a8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match="with quantized activations"):
        edgellm.convert(out, tmp_path / "b", progress=False)


def test_q_auto_keeps_the_sources_precision(tiny, tmp_path):
    """-q auto: a 4-bit checkpoint's blocks as they are (w4), an 8-bit one's with its float tensors at w8, a float
    checkpoint in float16."""
    from edgellm.format import Manifest

    def read_manifest(bundle):
        return Manifest.from_json(json.loads((bundle / "manifest.json").read_text()))

    for layout, want in (("gptq-sym", "w4"), ("compressed-asym-8bit", "w8")):
        folder, _ = packed_checkpoint(tiny, tmp_path, layout)
        manifest = read_manifest(edgellm.convert(folder, tmp_path / f"{layout}-auto", quantize="auto",
                                                 progress=False, seq_length=64))
        assert manifest.quantization.mode == want, layout
    _, folder = tiny("qwen2")
    bundle = edgellm.convert(folder, tmp_path / "float-auto", quantize="auto", progress=False, seq_length=64)
    assert read_manifest(bundle).quantization.mode == "f16"


def test_a_channel_group_that_is_no_power_of_two_is_cut_into_blocks():
    """Per-channel scales over 96 inputs: blocks of 32, each with its channel's scale and zero point."""
    from edgellm.convert.prequantized import blocks

    rng = np.random.default_rng(0)
    codes, zeros = rng.integers(0, 16, (96, 8)).astype(np.uint8), rng.integers(0, 16, (1, 8)).astype(np.uint8)
    scales = rng.random((1, 8)).astype(np.float32)
    w = blocks("x", codes, zeros, scales, np.zeros(96, np.int64))
    assert w.block_size == 32 and w.k_blocks == 3
    np.testing.assert_array_equal(w.dequantize(), ((codes.astype(np.float32) - zeros) * scales).T)
    with pytest.raises(EdgeLLMError, match="blocks of a power of two of 16 or more"):
        blocks("x", codes[:72], zeros, scales, np.zeros(72, np.int64))
