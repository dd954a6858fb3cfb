"""Block formats: our quantizer's rounding, and GGUF blocks decoded into MatMulNBits codes without loss."""

from __future__ import annotations

import gguf  # noqa: E402
import numpy as np
import pytest

from edgellm.convert import gguf as gguf_reader
from edgellm.convert.quantize import concat_rows, fold_mins, folded_sums_copies, quantize

# type: (bytes per block, elements per block, offsets of float16 fields inside a block)
# bytes per block, weights per block, offsets of its float16 scales
LAYOUTS = {"Q4_0": (18, 32, [0]), "Q4_1": (20, 32, [0, 2]), "Q5_0": (22, 32, [0]), "Q5_1": (24, 32, [0, 2]),
           "Q8_0": (34, 32, [0]), "Q4_K": (144, 256, [0, 2]), "Q5_K": (176, 256, [0, 2]), "Q6_K": (210, 256, [208]),
           "Q2_K": (84, 256, [80, 82]), "Q3_K": (110, 256, [108])}


def random_blocks(kind: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in `kind`'s layout, with sane float16 scales (random bytes could be inf/nan)."""
    size, per_block, f16_offsets = LAYOUTS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // per_block, size), dtype=np.uint8)
    for off in f16_offsets:
        scales = rng.uniform(-0.05, 0.05, raw.shape[:2]).astype(np.float16)
        raw[..., off: off + 2] = scales[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_gguf_blocks_decode_to_what_gguf_dequantizes(kind):
    rows, k = 24, 512
    raw = random_blocks(kind, rows, k)
    expected = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(rows, k)
    weight = gguf_reader._BLOCK_DECODERS[kind](raw, k)
    assert weight.codes.max() < (1 << weight.bits)
    # Exact in real arithmetic; the centred form of the min formats (s*(q-8) + (m+8s)) reassociates float32 sums.
    np.testing.assert_allclose(weight.dequantize(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_round_trip_error(bits, symmetric):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 200)).astype(np.float32)  # K not a multiple of the block: padded
    q = quantize(w, bits, 64, symmetric)
    err = np.sqrt(((q.dequantize() - w) ** 2).mean() / (w ** 2).mean())
    assert q.dequantize().shape == w.shape
    assert err < {4: 0.11, 8: 0.007}[bits]  # uniform rounding of a Gaussian block: ~0.09 and ~0.006
    if bits == 4:  # scales are float16 values (edgellm's kernels store them so: ONNX Runtime's read the same weights)
        np.testing.assert_array_equal(q.scales.astype(np.float16).astype(np.float32), q.scales)
    if symmetric:  # the largest magnitude of each block lands on a code, to the (4-bit: float16) scale's precision
        blocks = np.pad(w, ((0, 0), (0, 56))).reshape(64, 4, 64)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        np.testing.assert_allclose(q.scales * -(1 << (bits - 1)), extreme, rtol=2 ** -11 if bits == 4 else 1e-6)


def test_concat_rows_unifies_zero_points_and_mins():
    rng = np.random.default_rng(2)
    a = quantize(rng.standard_normal((8, 64)), 4, 32, symmetric=True)
    b = quantize(rng.standard_normal((4, 64)), 4, 32, symmetric=False)
    fused = concat_rows([a, b])
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    assert concat_rows([a, quantize(rng.standard_normal((4, 64)), 8, 32)]) is None


MIN_FORMATS = ["Q4_1", "Q5_1", "Q4_K", "Q5_K"]  # 4-bit codes with mins, and 5-bit ones widened to 8 bits


def min_format_weight(kind: str, n: int, k: int, seed: int):
    if kind in ("Q4_1", "Q5_1"):  # quantized from a Gaussian matrix, as llama.cpp would: realistic mins
        raw = gguf.quants.quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32),
                                   getattr(gguf.GGMLQuantizationType, kind))
    else:  # the gguf package cannot quantize K formats: random super-blocks (their mins are rarely near a step)
        raw = random_blocks(kind, n, k, seed)
    weight = gguf_reader._BLOCK_DECODERS[kind](raw, k)
    assert weight.mins is not None
    return weight


def test_min_format_matmul_is_exact():
    """GGUF min formats run as MatMulNBits plus block_sums(x) @ mins; with float activations that is exact."""
    import onnxruntime as ort

    from edgellm.convert.graph import GraphBuilder, WeightPolicy

    k, n = 256, 48
    weight = min_format_weight("Q4_K", n, k, seed=3)
    g = GraphBuilder(WeightPolicy("w4", accuracy_level=0))
    y = g.linear(g.input("x", np.float32, [1, "s", k]), weight, "proj")
    g.output("y", np.float32, [1, "s", n], value=y)
    session = ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((1, 7, k)).astype(np.float32)
    expected = x @ weight.dequantize().T
    scale = np.abs(expected).max()  # ~100: float32 sums in another order differ by ~1e-6 of that
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=2e-6 * scale)


def digits_bound(weight, folded) -> np.ndarray:
    """Per output column: what the digits may leave of a min, max|rest| / 196 for 4-bit codes (two digits of 1/14
    each) and / 254 for 8-bit ones (one digit), where rest is the part of the min the new zero point did not take."""
    shift = weight.zero_points_or_default().astype(np.float64) - folded.zero_points[:, :weight.k_blocks]
    rest = weight.mins - weight.scales.astype(np.float64) * shift
    return np.abs(rest).max(axis=1) / {4: 196, 8: 254}[weight.bits], rest, shift


@pytest.mark.parametrize("k", [512, 1280])  # 16 block sums, or 40: a digit's rows spanning two blocks
@pytest.mark.parametrize("kind", MIN_FORMATS)
def test_folded_mins_keep_the_weight_to_their_digits(kind, k):
    """fold_mins: the zero points take the integer part of each min (exactly), and the digits rows over the block
    sums take the rest to 1/196 of its largest value in the column (4-bit codes, two digits; 8-bit: one, 1/254)."""
    n = 40
    weight = min_format_weight(kind, n, k, seed=5)
    folded = fold_mins(weight)
    copies = folded_sums_copies(weight)
    assert folded.mins is None and folded.k == k + copies * weight.k_blocks
    sums = np.zeros((k, weight.k_blocks))
    sums[np.arange(k), np.arange(k) // weight.block_size] = 1  # x @ sums: the block sums of x
    widen = np.concatenate([np.eye(k)] + [sums] * copies, axis=1)  # x @ it: [x, sums, sums, ...]
    effective = folded.dequantize().astype(np.float64) @ widen.T  # what the folded matmul applies to x
    bound, rest, shift = digits_bound(weight, folded)
    error = np.abs(effective - weight.dequantize())
    assert (error <= bound[:, None] + 1e-6 * np.abs(weight.dequantize()).max()).all(), (error / bound[:, None]).max()
    assert (bound > 0).any()
    top = (1 << weight.bits) - 1
    zero_points = folded.zero_points[:, :weight.k_blocks]
    inside = (zero_points > 0) & (zero_points < top) & (weight.scales != 0)  # (a zero scale leaves the min whole)
    assert inside.any() and (np.abs(rest) <= np.abs(weight.scales) / 2 + 1e-7)[inside].all()
    if kind in ("Q4_1", "Q5_1"):  # real mins lie within the zero point's reach: what is left is at most half a step
        assert inside.all() and (shift != 0).any()


@pytest.mark.parametrize("kind", MIN_FORMATS)
def test_min_format_matmul_at_int8_activations(kind):
    """At accuracy level 4 the graph runs one MatMulNBits over [x, block sums of x] with the folded weight, no
    separate mins product. Read at accuracy level 0 the same graph computes x @ W.T to the digits' bound, so its
    wiring and packing are right; at level 4 what differs is the int8 rounding of the activations."""
    import onnxruntime as ort

    from edgellm.convert.graph import GraphBuilder, WeightPolicy

    k, n = 512, 40
    weight = min_format_weight(kind, n, k, seed=6)
    g = GraphBuilder(WeightPolicy("w4", accuracy_level=4))
    y = g.linear(g.input("x", np.float32, [1, "s", k]), weight, "proj")
    g.output("y", np.float32, [1, "s", n], value=y)
    model = g.to_model()
    ops = sorted(node.op_type for node in model.graph.node)
    assert ops == ["Concat", "Identity", "MatMulNBits", "ReduceSum", "Reshape"], ops
    x = np.random.default_rng(7).standard_normal((1, 9, k)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.dequantize().T.astype(np.float64)
    scale = np.abs(expected).max()
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    int8_error = np.abs(run(model) - expected).max() / scale
    assert int8_error < 2e-2, int8_error  # int8 activations per block of 32
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    bound = np.abs(x).sum(-1)[..., None] * digits_bound(weight, fold_mins(weight))[0]
    assert (np.abs(run(model) - expected) <= bound + 2e-6 * scale).all()
