"""Fixed-shape bundles (`--static`): a chunk graph of --chunk-length rows (padded and masked at run time) and a
one-row graph, every dimension fixed; the same greedy tokens and logits as the dynamic bundle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS


@pytest.mark.parametrize("arch", ["llama", "gemma3", "minicpm3"])
def test_a_static_bundle_answers_as_the_dynamic_one(tiny, tmp_path, arch):
    _, folder = tiny(arch)
    options = dict(quantize="f32", seq_length=72, chunk_length=16, progress=False)
    dynamic = edgellm.load(edgellm.convert(folder, tmp_path / "dynamic", **options))
    static = edgellm.load(edgellm.convert(folder, tmp_path / "static", static=True, **options))
    ids = dynamic.tokenizer.encode(CORPUS.read_text())[:70]  # the last 6 run row by row: no room for 16 at 64
    np.testing.assert_allclose(static.logits(ids), dynamic.logits(ids), rtol=0, atol=2e-5)
    for model in (static, dynamic):
        model.engine.reset()
    greedy = dict(max_new_tokens=24, ignore_eos=True)
    assert static.generate("Four score and seven", **greedy).token_ids == \
        dynamic.generate("Four score and seven", **greedy).token_ids


def test_every_dimension_of_a_static_bundle_is_fixed(tiny, tmp_path):
    """ONNX Runtime's shape inference (which knows its contrib operators) leaves no symbolic dimension."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    _, folder = tiny("qwen3")
    bundle = edgellm.convert(folder, tmp_path / "static", quantize="w4", seq_length=64, chunk_length=16,
                             progress=False, static=True)
    for graph in ("decoder.onnx", "decoder_step.onnx"):
        model = onnx.load(bundle / graph, load_external_data=False)
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
        values = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
        symbolic = [(v.name, d.dim_param) for v in values for d in v.type.tensor_type.shape.dim
                    if not d.HasField("dim_value")]
        assert not symbolic, f"{graph}: {symbolic[:5]}"
        assert len(inferred.graph.value_info) > 50  # shapes were inferred through the graph
    assert edgellm.load(bundle).engine.fixed_rows == 16


def test_static_options_that_do_not_combine_are_refused(tiny, tmp_path):
    _, folder = tiny("llama")
    with pytest.raises(EdgeLLMError, match="static=True applies to text models with the float KV cache"):
        edgellm.convert(folder, tmp_path / "x", static=True, kv_cache="int8", progress=False)
    bundle = edgellm.convert(folder, tmp_path / "s", static=True, seq_length=64, progress=False)
    with pytest.raises(EdgeLLMError, match="runs one sequence at a time"):
        edgellm.load(bundle, slots=2)
