"""`--kv-cache int8`: the calibrated 8-bit KV cache against the float one and transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS, TEXT_MODELS, reference_logits, relative_error

ARCHS = sorted(TEXT_MODELS)


def cache_scales(bundle) -> dict[str, np.ndarray]:
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph
    return {t.name[: -len(".scale")]: onnx.numpy_helper.to_array(t) for t in graph.initializer
            if t.name.endswith(".scale")}


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_cache_holds_the_float_cache_rounded_to_its_scales(tiny, bundle, arch):
    ref_model, _ = tiny(arch)
    exact, small = edgellm.load(bundle(arch)), edgellm.load(bundle(arch, kv_cache="int8"))
    assert small.manifest.quantization.kv_cache == "int8" and exact.manifest.quantization.kv_cache == "f32"
    assert small.engine.kv.dtype == np.int8
    ids = small.tokenizer.encode(CORPUS.read_text())[:40]  # three chunks of 16
    got, want = small.logits(ids), exact.logits(ids)
    scales = cache_scales(bundle(arch, kv_cache="int8"))
    layers = small.manifest.model.num_hidden_layers
    assert len(scales) == 2 * layers
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            step = scales[f"past_{kind}.{i}"][0]  # [heads, 1, dim]
            stored = small.engine.kv[i, j, 0, :, :len(ids)].astype(np.float32)
            floats = exact.engine.kv[i, j, 0, :, :len(ids)]
            # rounded to the step (at the range's end where a value does not fit); layers after the first see inputs
            # that the first's 8-bit cache moved a little
            off = np.abs(stored - np.clip(np.round(floats / step), -128, 127))
            assert off.max() <= (1 if i == 0 else 4) and off.mean() < 0.5, f"layer {i} {kind}"
            assert (np.abs(floats) <= 127 * step).mean() > 0.99  # the calibration's range covers this text
    # what an 8-bit cache costs on these tiny random models, which amplify any rounding (measured 0.015-0.085;
    # the real models' perplexity moves by about 1%, docs/benchmarks.md)
    assert relative_error(got, want) < 0.15
    assert relative_error(got, reference_logits(ref_model, ids)) < 0.15


def test_int8_cache_generates_and_reuses_prefixes(bundle):
    model = edgellm.load(bundle("qwen2", "w4", kv_cache="int8"))
    first = model.generate("Four score and seven years ago", max_new_tokens=12, ignore_eos=True)
    again = model.generate("Four score and seven years ago", max_new_tokens=12, ignore_eos=True)
    assert again.token_ids == first.token_ids and model.engine.reused > 0


def test_unknown_kv_cache_precision_is_one_clear_error(tiny, tmp_path):
    _, folder = tiny("llama")
    with pytest.raises(EdgeLLMError, match="kv_cache='int4' is not a KV cache precision; choose one of f32, int8"):
        edgellm.convert(folder, tmp_path / "b", kv_cache="int4", progress=False)
    assert not (tmp_path / "b").exists()
