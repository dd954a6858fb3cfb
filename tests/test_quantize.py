"""Block formats: our quantizer's rounding, and GGUF blocks decoded into MatMulNBits codes without loss."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.convert import gguf as gguf_reader
from edgellm.convert.quantize import concat_rows, quantize

import gguf  # noqa: E402

# type: (bytes per block, elements per block, offsets of float16 fields inside a block)
# bytes per block, weights per block, offsets of its float16 scales
LAYOUTS = {"Q4_0": (18, 32, [0]), "Q4_1": (20, 32, [0, 2]), "Q5_0": (22, 32, [0]), "Q5_1": (24, 32, [0, 2]),
           "Q8_0": (34, 32, [0]), "Q4_K": (144, 256, [0, 2]), "Q5_K": (176, 256, [0, 2]), "Q6_K": (210, 256, [208])}


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
    if symmetric:  # the largest magnitude of each block lands exactly on a code
        blocks = np.pad(w, ((0, 0), (0, 56))).reshape(64, 4, 64)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        np.testing.assert_allclose(q.scales * -(1 << (bits - 1)), extreme, rtol=1e-6)


def test_concat_rows_unifies_zero_points_and_mins():
    rng = np.random.default_rng(2)
    a = quantize(rng.standard_normal((8, 64)), 4, 32, symmetric=True)
    b = quantize(rng.standard_normal((4, 64)), 4, 32, symmetric=False)
    fused = concat_rows([a, b])
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))
    assert concat_rows([a, quantize(rng.standard_normal((4, 64)), 8, 32)]) is None


def test_min_format_matmul_is_exact():
    """GGUF min formats run as MatMulNBits plus block_sums(x) @ mins; with float activations that is exact."""
    import onnxruntime as ort

    from edgellm.convert.graph import GraphBuilder, WeightPolicy

    k, n = 256, 48
    weight = gguf_reader._BLOCK_DECODERS["Q4_K"](random_blocks("Q4_K", n, k, seed=3), k)
    assert weight.mins is not None
    g = GraphBuilder(WeightPolicy("w4", accuracy_level=0))
    y = g.linear(g.input("x", np.float32, [1, "s", k]), weight, "proj")
    g.output("y", np.float32, [1, "s", n], value=y)
    session = ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).standard_normal((1, 7, k)).astype(np.float32)
    expected = x @ weight.dequantize().T
    scale = np.abs(expected).max()  # ~100: float32 sums in another order differ by ~1e-6 of that
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=2e-6 * scale)
