"""Quantized weight blocks in the layout of ONNX Runtime's MatMulNBits, as bundles store them.

A weight of shape [N, K] (out_features, in_features, as in a torch Linear) is split along K into blocks; each block
stores integer codes q, a float scale and an integer zero point, and decodes as ``scale * (q - zero_point)``.
GGUF's "min" formats (Q4_1, Q4_K, ...) decode as ``scale * q + min`` with a float min that no integer zero point
can express; the converter turns those into graph terms (convert.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class QuantizedWeight:
    bits: int  # 4 or 8
    block_size: int  # power of two, >= 16
    k: int  # in_features before padding to whole blocks
    codes: np.ndarray  # uint8 [N, k_blocks, block_size], values in [0, 2**bits)
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None = None  # uint8 [N, k_blocks]; None means the midpoint 2**(bits-1)
    mins: np.ndarray | None = None  # float32 [N, k_blocks], added per block (GGUF min formats)
    # the input columns in block order, where a checkpoint grouped them out of order (GPTQ's desc_act): block
    # column j multiplies input column k_order[j]; the graph gathers its input so
    k_order: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scales, self.zero_points, self.mins) if a is not None)

    def zero_points_or_default(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        zp = self.zero_points_or_default().astype(np.float32)[..., None]
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        w = w.reshape(self.n, -1)[:, : self.k]
        if self.k_order is not None:
            w = w[:, np.argsort(self.k_order)]
        return w

    def scaled(self, factor: np.float32) -> QuantizedWeight:
        """The same codes decoding to factor * w."""
        return QuantizedWeight(self.bits, self.block_size, self.k, self.codes, self.scales * factor,
                               self.zero_points, None if self.mins is None else self.mins * factor, self.k_order)

    def take_rows(self, rows: np.ndarray | slice) -> QuantizedWeight:
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return QuantizedWeight(self.bits, self.block_size, self.k, self.codes[rows], self.scales[rows],
                               pick(self.zero_points), pick(self.mins), self.k_order)

    # --- MatMulNBits initializers -------------------------------------------------------------
    def packed_codes(self) -> np.ndarray:
        """uint8 [N, k_blocks, block_size * bits / 8]; 4-bit codes pack two per byte, low nibble first."""
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        c = self.codes
        return np.ascontiguousarray(c[..., 0::2] | (c[..., 1::2] << 4))

    def packed_zero_points(self) -> np.ndarray | None:
        if self.zero_points is None:
            return None
        if self.bits == 8:
            return np.ascontiguousarray(self.zero_points.reshape(-1))
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return np.ascontiguousarray((zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1))


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of packed_codes' 4-bit packing: uint8 [..., m], two values per byte, low nibble first ->
    [..., 2m]."""
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
