"""Rounding float weights to MatMulNBits blocks (format.blocks.QuantizedWeight), and the converter's block
arithmetic: row pieces, fused rows, and GGUF min formats. With float activations the graph adds
``block_sums(x) @ mins`` (see GraphBuilder.linear), which is exact; with int8 activations `fold_mins` makes the
mins part of the matmul.
"""

from __future__ import annotations

import numpy as np

from ..format.blocks import QuantizedWeight


def row_pieces(w: QuantizedWeight, max_bytes: int | None) -> list[QuantizedWeight]:
    """w as consecutive row ranges of about equal size whose packed codes take at most max_bytes each."""
    row_bytes = w.k_blocks * w.block_size * w.bits // 8
    if max_bytes is None or w.n * row_bytes <= max_bytes:
        return [w]
    count = -(-w.n * row_bytes // max_bytes)
    rows = -(-w.n // count)
    return [w.take_rows(slice(start, start + rows)) for start in range(0, w.n, rows)]


# Digits per min in `fold_mins`, by code width: each 4-bit digit keeps 1/14 of what is left, each 8-bit one 1/254.
MIN_DIGITS = {4: 2, 8: 1}


def fold_mins(w: QuantizedWeight) -> QuantizedWeight:
    """A min-format weight (``s * (q - zp) + m`` per block) as a plain one over the input widened by copies of its
    block sums, ``[x, block_sums(x), block_sums(x), ...]`` (`folded_sums_copies`): one MatMulNBits where the exact
    form takes three nodes (MatMulNBits, block_sums(x) @ mins, Add), which costs decode time per node. The
    integer part of m / s moves into the zero point, exactly; the rest r (|r| <= s/2 where the zero point reaches)
    becomes extra rows of codes, one run of rows per digit of r, each digit's blocks with their own per-column
    scale. Two 4-bit digits (one 8-bit) keep r to max|r| / 196 (/ 254) of its column: far below the rounding of
    int8 activations, the only place the graph uses this form (accuracy level 4; with float activations the mins
    stay exact)."""
    assert w.mins is not None and w.k % w.block_size == 0, "min formats come from GGUF, whose rows are whole blocks"
    n, k_blocks = w.scales.shape
    top, mid, half = (1 << w.bits) - 1, 1 << (w.bits - 1), (1 << (w.bits - 1)) - 1
    zero_points = w.zero_points_or_default().astype(np.int32)
    # s * (q - (zp - shift)) = s * (q - zp) + s * shift, so the zero point zp - shift absorbs shift steps of the min
    shift = np.clip(np.rint(w.mins / np.where(w.scales == 0, np.inf, w.scales)), zero_points - top, zero_points)
    rest = w.mins.astype(np.float64) - w.scales * shift
    extra, stride = folded_sums_copies(w) * k_blocks, _digit_stride(w)
    blocks = -(-extra // w.block_size)
    # Rows the digits leave alone hold the zero point's code: they add nothing, whatever their sum and scale.
    rows = np.full((n, blocks * w.block_size), mid, np.uint8)
    row_scales = np.ones((n, blocks), np.float32)
    for d in range(MIN_DIGITS[w.bits]):
        step = (np.abs(rest).max(axis=1) / half).astype(np.float32)
        step[step == 0] = 1
        digit = np.rint(rest / step[:, None])
        rest -= digit * step[:, None]
        at = d * stride + np.arange(k_blocks)  # position p of the copies holds block sum p % k_blocks
        rows[:, at] = digit[:, at % k_blocks] + mid
        row_scales[:, d * stride // w.block_size:(d + 1) * stride // w.block_size] = step[:, None]
    return QuantizedWeight(w.bits, w.block_size, w.k + extra,
                           np.concatenate([w.codes, rows.reshape(n, blocks, w.block_size)], axis=1),
                           np.concatenate([w.scales, row_scales], axis=1),
                           np.concatenate([(zero_points - shift).astype(np.uint8), np.full((n, blocks), mid, np.uint8)],
                                          axis=1))


def _digit_stride(w: QuantizedWeight) -> int:
    """How far apart the digits' runs of rows lie in the widened part: the block sums rounded up to whole blocks,
    so that each run starts at a block boundary (each digit's rows take their own scales)."""
    return w.block_size * -(-w.k_blocks // w.block_size)


def folded_sums_copies(w: QuantizedWeight) -> int:
    """How many copies of block_sums(x) follow x in the input that `fold_mins(w)` multiplies (one Concat, no
    padding; the last block may be partial). Any k_blocks consecutive positions of the copies hold each sum once,
    so every digit's run finds them all."""
    runs_end = (MIN_DIGITS[w.bits] - 1) * _digit_stride(w) + w.k_blocks
    return -(-runs_end // w.k_blocks)


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack weights along N (for fused QKV / gate-up projections); None if their formats differ."""
    first = weights[0]
    if any((w.bits, w.block_size, w.k, w.k_blocks) != (first.bits, first.block_size, first.k, first.k_blocks)
           for w in weights):
        return None
    for w in weights:  # the input is gathered in one order per matmul
        if (w.k_order is None) != (first.k_order is None) or (
                w.k_order is not None and first.k_order is not None and not np.array_equal(w.k_order, first.k_order)):
            return None
    any_zp = any(w.zero_points is not None for w in weights)
    any_min = any(w.mins is not None for w in weights)
    return QuantizedWeight(
        first.bits, first.block_size, first.k,
        np.concatenate([w.codes for w in weights]),
        np.concatenate([w.scales for w in weights]),
        np.concatenate([w.zero_points_or_default() for w in weights]) if any_zp else None,
        np.concatenate([w.mins if w.mins is not None else np.zeros_like(w.scales) for w in weights])
        if any_min else None,
        first.k_order,
    )


ROWS_AT_ONCE_ELEMENTS = 1 << 22  # quantize this many weights at a time: its float temporaries stay a few MiB


def quantize(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Round a float [N, K] weight to `bits`-bit blocks of `block_size` along K. Rows are rounded independently, a
    few at a time, so the working memory stays small whatever the weight's size."""
    n, k = w.shape
    return _quantize_rows(n, k, lambda rows: np.asarray(w[rows], np.float32), bits, block_size, symmetric)


def reblock(w: QuantizedWeight, block_size: int, symmetric: bool = True) -> QuantizedWeight:
    """w's values rounded again to blocks of `block_size` (`--reblock`: a GGUF's 32-weight blocks are the slow
    case of MatMulNBits). 4-bit codes stay 4-bit; wider ones (Q5 to Q8, held as 8-bit) become 8-bit blocks, since
    4 bits would drop what their extra bits hold. Decoded a few rows at a time, as they are rounded."""
    return _quantize_rows(w.n, w.k, lambda rows: w.take_rows(rows).dequantize(), 4 if w.bits == 4 else 8,
                          block_size, symmetric)


def _quantize_rows(n: int, k: int, rows_of, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """An [n, k] weight rounded to blocks, ROWS_AT_ONCE_ELEMENTS weights at a time; rows_of(slice) gives those
    rows in float32."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"group size must be a power of two >= 16, got {block_size}")
    k_blocks = -(-k // block_size)
    codes = np.empty((n, k_blocks, block_size), np.uint8)
    scales = np.empty((n, k_blocks), np.float32)
    zero_points = None if symmetric else np.empty((n, k_blocks), np.uint8)
    step = max(1, ROWS_AT_ONCE_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        part = _round_blocks(rows_of(rows), bits, block_size, symmetric)
        codes[rows], scales[rows] = part[0], part[1]
        if zero_points is not None:
            zero_points[rows] = part[2]
    return QuantizedWeight(bits, block_size, k, codes, scales, zero_points)


def half_scales(scales: np.ndarray, bits: int) -> np.ndarray:
    """4-bit blocks' scales as float16 values where float16 keeps them to 2^-11 (its normal range), far below what 4
    bits round away. edgellm's CPU kernels store 4-bit blocks with float16 scales (half the bytes a scale takes):
    a bundle whose scales already are float16 values gives them and ONNX Runtime's own kernels the same weights.
    8-bit blocks keep float32 scales, which the kernels keep too (2^-11 is not far below what 8 bits round)."""
    if bits != 4:
        return scales.astype(np.float32)
    half = scales.astype(np.float16)
    kept = (np.abs(scales) >= 2.0 ** -14) & np.isfinite(half)
    return np.where(kept, half.astype(np.float32), scales).astype(np.float32)


def _round_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """(codes, scales, zero points or None) of the rows `w`."""
    n, k = w.shape
    k_blocks = -(-k // block_size)
    if k_blocks * block_size != k:
        w = np.pad(w, ((0, 0), (0, k_blocks * block_size - k)))
    blocks = w.reshape(n, k_blocks, block_size)
    qmax = (1 << bits) - 1
    if symmetric:
        # Scale by the signed extreme so that it lands exactly on the code -2**(bits-1): uses the full range.
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scales = half_scales(extreme / -mid, bits)
        safe = np.where(scales == 0, 1.0, scales)
        codes = np.clip(np.rint(blocks / safe[..., None]) + mid, 0, qmax)
        return codes.astype(np.uint8), scales.astype(np.float32), None
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scales = half_scales((hi - lo) / qmax, bits)
    safe = np.where(scales == 0, 1.0, scales)
    zero_points = np.clip(np.rint(-lo / safe), 0, qmax)
    codes = np.clip(np.rint(blocks / safe[..., None]) + zero_points[..., None], 0, qmax)
    return codes.astype(np.uint8), scales.astype(np.float32), zero_points.astype(np.uint8)
