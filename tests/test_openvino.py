"""Device openvino: prefill chunks and vision graphs on the `openvino` runtime (bf16 where the CPU has it), decode
on ONNX Runtime, one KV cache between them. Compared with transformers like the CPU device, at bf16's tolerance;
skipped, with the reason, where the openvino extra is not installed. Its errors are tested either way."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import edgellm
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from helpers import OPENVINO_MISSING, TEXT_MODELS, reference_logits, relative_error

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason=OPENVINO_MISSING)

BF16 = 3e-2  # relative error bound of bf16 matmuls on these tiny models (float32 runs within 1e-5)


@needs_openvino
@pytest.mark.parametrize("arch", list(TEXT_MODELS))
def test_prefill_on_openvino_and_decode_after_it_match_transformers(tiny, bundle, arch):
    """A prompt of several chunks is computed by OpenVINO (the engine's chunk at least 64 rows), its keys and values
    land in the cache, and ONNX Runtime decodes after them: Gemma 3's sliding window and Qwen3's q/k norms
    included."""
    model_hf, _ = tiny(arch)
    if arch == "gemma2":  # OpenVINO's GroupQueryAttention has no score soft-capping: one clear error
        with pytest.raises(EdgeLLMError, match="OpenVINO could not compile the graph.*use -c cpu"):
            edgellm.load(bundle(arch, "f32"), device="openvino")
        return
    model = edgellm.load(bundle(arch, "f32"), device="openvino")
    calls = []
    run = model.engine.openvino.run
    model.engine.openvino.run = lambda feed: calls.append(len(feed["inputs_embeds"][0])) or run(feed)
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 200, 150)]
    ref = reference_logits(model_hf, ids + [7, 9])
    assert relative_error(model.logits(ids), ref[:-2]) < BF16
    assert calls == [150]  # one chunk of the whole prompt (the bundle's chunk is 16)
    model.engine.reset()
    model.engine.prefill(ids)
    assert relative_error(model.engine.decode(7), ref[-2]) < BF16
    assert relative_error(model.engine.decode(9), ref[-1]) < BF16
    assert calls == [150, 150]  # decoding stayed on ONNX Runtime


@needs_openvino
def test_openvino_answers_like_the_cpu_device(bundle):
    """The prompt reused from the cache, a short chunk on ONNX Runtime after a long one on OpenVINO: greedy
    answers agree with the CPU device's on a quantized bundle (the first tokens at least)."""
    path = bundle("qwen2", "w8")
    cpu, ov = edgellm.load(path), edgellm.load(path, device="openvino")
    ids = [int(t) for t in np.random.default_rng(6).integers(3, 200, 100)]
    first = [m.generate(ids, max_new_tokens=4, temperature=0).token_ids for m in (cpu, ov)]
    assert first[0][:2] == first[1][:2]
    follow = ids + first[1] + [11, 12, 13]
    assert ov.generate(follow, max_new_tokens=2, temperature=0).token_ids
    assert ov.engine.reused == len(ids) + 3  # the earlier prompt and answer were kept (the last answer token is new)


def test_openvino_without_the_extra_is_one_clear_error(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(EdgeLLMError, match=r"needs the OpenVINO runtime: pip install 'edgellm\[openvino\]'"):
        edgellm.load(bundle("llama", "f32"), device="openvino")
    assert main(["run", str(bundle("llama", "f32")), "Liberty", "-n", "2", "-c", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "edgellm[openvino]" in err and "Traceback" not in err


@needs_openvino
def test_a_graph_openvino_cannot_compile_is_one_clear_error(bundle, monkeypatch):
    import openvino as ov

    def refuse(self, *args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:109:\nunsupported operation\n")

    monkeypatch.setattr(ov.Core, "compile_model", refuse)
    with pytest.raises(EdgeLLMError, match=r"decoder\.onnx: OpenVINO could not compile the graph .*use -c cpu"):
        edgellm.load(bundle("llama", "f32"), device="openvino")


def test_an_unknown_device_is_refused_before_loading(bundle):
    with pytest.raises(EdgeLLMError, match="unknown device 'tpu'; choose one of cpu, cuda, openvino"):
        edgellm.load(bundle("llama", "f32"), device="tpu")


def test_the_memory_check_counts_openvinos_copy_of_the_weights(bundle):
    from edgellm.format import open_bundle
    from edgellm.runtime import memory

    for quant in ("w4", "f32"):
        opened = open_bundle(bundle("llama", quant))
        cpu, ov = memory.needed_bytes(opened), memory.needed_bytes(opened, "openvino")
        stored = opened.manifest.files["decoder.onnx.data"].bytes
        # about 2 bytes per weight: more than the 4-bit bundle's bytes, half the float32 one's
        assert ov.pop("OpenVINO's copy of the decoder weights") == (int(stored / (0.5 + 4 / 128) * 2)
                                                                    if quant == "w4" else stored // 2)
        assert ov == cpu


def test_an_int8_kv_cache_on_openvino_is_one_clear_error(bundle, capsys):
    """OpenVINO compiles GroupQueryAttention with an int8 cache but ignores its scales (measured: logits 25% off)."""
    with pytest.raises(EdgeLLMError, match="device openvino cannot run this bundle's int8 KV cache"):
        edgellm.load(bundle("llama", "w4", kv_cache="int8"), device="openvino")
    assert main(["run", str(bundle("llama", "w4", kv_cache="int8")), "Liberty", "-n", "2", "-c", "openvino"]) == 2
    assert "Traceback" not in capsys.readouterr().err
