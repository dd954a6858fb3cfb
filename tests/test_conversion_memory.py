"""Converting holds about one weight at a time: the peak memory of `edgellm convert` grows with the largest tensor,
not with the model. Checked on synthetic bf16 checkpoints written with numpy (no torch), each converted in a
fresh process whose peak resident set is read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import write_random_bf16, write_tokenizer

pytestmark = pytest.mark.slow  # converts in a child process and reads its peak memory

HIDDEN, INTERMEDIATE = 512, 1536


def write_checkpoint(folder: Path, layers: int, vocab: int) -> dict[str, int]:
    """A Llama-shaped bf16 safetensors checkpoint of random weights; returns its parameter counts."""
    folder.mkdir(parents=True)
    write_tokenizer(folder)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": vocab,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": False,
              "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "lm_head.weight": (vocab, HIDDEN),
              "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                       f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (256, HIDDEN),
                       f"{p}.self_attn.v_proj.weight": (256, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       f"{p}.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                       f"{p}.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       f"{p}.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    write_random_bf16(folder / "model.safetensors", shapes)
    return {name: int(np.prod(shape)) for name, shape in shapes.items()}


def conversion_peak_mib(folder: Path, out: Path) -> float:
    # VmHWM, the process's own high-water mark: ru_maxrss would carry over the forking test process's. Without the
    # quality report, whose float reference holds the model by design (its cost: docs/benchmarks.md, "Fidelity")
    code = ("import sys, edgellm; "
            "edgellm.convert(sys.argv[1], sys.argv[2], quantize='w4', seq_length=64, progress=False, report=False); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_follows_the_largest_tensor_not_the_model(tmp_path):
    counts = {}
    for name, layers, vocab in (("few", 2, 8192), ("many", 30, 8192), ("wide", 2, 65536)):
        counts[name] = write_checkpoint(tmp_path / name, layers, vocab)
    peaks = {name: conversion_peak_mib(tmp_path / name, tmp_path / f"{name}-w4") for name in counts}
    mib = lambda params: params * 4 / 2**20  # noqa: E731  (float32)
    extra_layers = mib(sum(counts["many"].values()) - sum(counts["few"].values()))  # 327 MiB of float32
    # 28 more layers, the same largest tensor: the peak moves by a small part of their size (before the
    # streaming conversion, by more than their bf16 size alone)
    assert peaks["many"] - peaks["few"] < 0.1 * extra_layers, (peaks, extra_layers)
    # an 8x larger embedding and lm_head: the peak grows by a few times the growth of the largest tensor
    growth = mib(counts["wide"]["lm_head.weight"] - counts["few"]["lm_head.weight"])  # 112 MiB of float32
    assert 0.5 * growth < peaks["wide"] - peaks["few"] < 3 * growth, (peaks, growth)
