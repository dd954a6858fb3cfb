"""Checkpoints quantized before they reach edgellm (GPTQ, AWQ), read as the 4-bit blocks they hold: repacked into
MatMulNBits' layout exactly, never dequantized and rounded again.

Layouts (bits 4; K = in_features, N = out_features, G = K / group_size):
- GPTQ (AutoGPTQ, GPTQModel): qweight int32 [K / 8, N], eight codes per int32 along K, lowest nibble first; qzeros
  int32 [G, N / 8], eight per int32 along N, stored minus one in the original "gptq" checkpoint format (as they are
  in "gptq_v2"); scales float16 [G, N]; g_idx int32 [K], each input column's group. With desc_act the groups are not
  in column order: the columns are reordered so that each group is one block, and the graph gathers the matmul's
  input in that order.
- AWQ (AutoAWQ GEMM): qweight int32 [K, N / 8] and qzeros int32 [G, N / 8], eight codes per int32 along N in the
  order 0, 2, 4, 6, 1, 3, 5, 7; scales float16 [G, N]; zero points as they are.
Both decode as scale * (code - zero).
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError
from ..format.blocks import QuantizedWeight
from .source import ModelSource, WrappedSource

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(config: dict) -> dict | None:
    """The checkpoint's quantization_config, when it is one edgellm reads as blocks; an error for other methods."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise EdgeLLMError(f"the checkpoint is quantized with {method or 'an unnamed method'!r}; edgellm reads "
                           "float, GPTQ and AWQ checkpoints (and GGUF files)")
    if int(q.get("bits", 4)) != 4:
        raise EdgeLLMError(f"a {q.get('bits')}-bit {method.upper()} checkpoint: edgellm reads 4-bit ones")
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise EdgeLLMError(f"AWQ version {q.get('version')!r}: edgellm reads the GEMM layout")
    return {**q, "quant_method": method}


def _nibbles(packed: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> their eight 4-bit values, lowest first, spread along `axis`."""
    words = packed.astype(np.uint32)
    values = np.stack([(words >> (4 * i)) & 15 for i in range(8)], axis=axis + 1).astype(np.uint8)
    shape = list(packed.shape)
    shape[axis] *= 8
    return values.reshape(shape)


class PrequantizedSource(WrappedSource):
    """A Hugging Face source whose projections are GPTQ or AWQ blocks: linear("x.weight") hands over a
    QuantizedWeight; every other tensor reads through."""

    def __init__(self, source: ModelSource, quantization: dict):
        self.source, self.config, self.q = source, source.config, quantization
        names = source.names()
        self.packed = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        self._names = [n for n in names if not any(n == f"{p}.{part}" for p in self.packed for part in PARTS)]
        self._names += [f"{p}.weight" for p in sorted(self.packed)]

    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def raw(self, name: str) -> np.ndarray:
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in self.packed:
            return self.linear(name).dequantize()
        return self.source.raw(name)

    def block_types(self) -> set[str]:
        return {f"{self.q['quant_method'].upper()} 4-bit"}

    def linear(self, name: str) -> np.ndarray | QuantizedWeight:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix not in self.packed:
            return self.source.linear(name)
        part = lambda p: self.source.raw(f"{prefix}.{p}")  # noqa: E731
        scales = part("scales").astype(np.float32)  # [G, N]
        groups, n = scales.shape
        if self.q["quant_method"] == "awq":
            codes = _nibbles(part("qweight"), 1)  # [K, N] in packing order
            zeros = _nibbles(part("qzeros"), 1)
            unorder = np.argsort(np.tile(AWQ_ORDER, n // 8) + np.repeat(np.arange(0, n, 8), 8))
            codes, zeros = codes[:, unorder], zeros[:, unorder]
            group_of = np.arange(codes.shape[0]) // (codes.shape[0] // groups)
        else:
            codes = _nibbles(part("qweight"), 0)  # [K, N]
            zeros = _nibbles(part("qzeros"), 1).astype(np.int16)  # [G, N]
            if self.q.get("checkpoint_format", "gptq") != "gptq_v2":
                zeros = zeros + 1
            if zeros.max() > 15:
                raise EdgeLLMError(f"{prefix}: a GPTQ zero point of 16, which 4-bit blocks cannot hold")
            zeros = zeros.astype(np.uint8)
            k = codes.shape[0]
            g_idx = (part("g_idx").astype(np.int64) if f"{prefix}.g_idx" in self.source
                     else np.arange(k) // (k // groups))
            group_of = g_idx
        return blocks(prefix, codes, zeros, scales, group_of)


def blocks(prefix: str, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, group_of: np.ndarray):
    """QuantizedWeight [N, G, K / G] of codes [K, N] whose column k is in group group_of[k] (zeros and scales
    [G, N]); columns out of group order are reordered, the order recorded for the graph."""
    k, n = codes.shape
    groups = scales.shape[0]
    size = k // groups
    if size * groups != k or size < 16 or size & (size - 1):
        raise EdgeLLMError(f"{prefix}: groups of {k / groups:g} input columns; edgellm keeps blocks of a power of two "
                           "of 16 or more")
    order = np.argsort(group_of, kind="stable")
    if not (np.bincount(group_of, minlength=groups) == size).all():
        raise EdgeLLMError(f"{prefix}: its groups are of unequal sizes (g_idx), which blocks cannot hold")
    in_order = bool((order == np.arange(k)).all())
    codes = codes[order] if not in_order else codes
    return QuantizedWeight(4, size, k, np.ascontiguousarray(codes.T.reshape(n, groups, size)),
                           np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T),
                           k_order=None if in_order else order)
