"""Checkpoints quantized before they reach edgellm (GPTQ, AWQ, compressed-tensors), read as the blocks they hold:
repacked into MatMulNBits' layout exactly, never dequantized and rounded again.

Layouts (b bits, 4 or 8, p = 32 / b codes per int32 word, lowest bits first; K = in_features, N = out_features,
G = K / group_size):
- GPTQ (AutoGPTQ, GPTQModel): qweight int32 [K / p, N], codes packed along K; qzeros int32 [G, N / p], packed along
  N, stored minus one in the original "gptq" checkpoint format (as they are in "gptq_v2"); scales float16 [G, N];
  g_idx int32 [K], each input column's group. With desc_act the groups are not in column order: the columns are
  reordered so that each group is one block, and the graph gathers the matmul's input in that order.
- AWQ (AutoAWQ GEMM, 4 bits): qweight int32 [K, N / 8] and qzeros int32 [G, N / 8], eight codes per int32 along N
  in the order 0, 2, 4, 6, 1, 3, 5, 7; scales float16 [G, N]; zero points as they are.
- compressed-tensors "pack-quantized" (llm-compressor's W4A16 / W8A16): weight_packed int32 [N, K / p], packed along
  K, each code stored plus 2^(b-1) (unsigned); weight_scale [N, G] (G = 1 for per-channel scales); symmetric, or
  weight_zero_point int32 [N / p, G] packed along N, plus 2^(b-1) too; weight_g_idx [K] with activation ordering.
All decode as scale * (code - zero).
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import ModelSource, WrappedSource
from ..errors import EdgeLLMError
from ..format.blocks import QuantizedWeight

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
         "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")}
READ = "edgellm reads float, GPTQ, AWQ and compressed-tensors pack-quantized checkpoints (and GGUF files)"


def quantization_config(config: dict) -> dict | None:
    """The checkpoint's quantization_config (bits, symmetric, method), when it is one edgellm reads as blocks; an
    error for other methods."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method not in PARTS:
        raise EdgeLLMError(f"the checkpoint is quantized with {method or 'an unnamed method'!r}; {READ}")
    if method == "compressed-tensors":
        q = compressed_tensors_scheme(q)
    bits = int(q.get("bits", 4))
    if bits not in (4, 8) or (method == "awq" and bits != 4):
        raise EdgeLLMError(f"a {bits}-bit {method.upper()} checkpoint: edgellm reads 4-bit ones"
                           + (" and 8-bit ones" if method != "awq" else ""))
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise EdgeLLMError(f"AWQ version {q.get('version')!r}: edgellm reads the GEMM layout")
    return {**q, "quant_method": method, "bits": bits}


def compressed_tensors_scheme(q: dict) -> dict:
    """The one weight scheme of a compressed-tensors config that edgellm reads: integer weights only (no quantized
    activations), stored "pack-quantized", by group or channel."""
    groups = list((q.get("config_groups") or {}).values())
    formats = {g.get("format") or q.get("format") for g in groups}
    if len(groups) != 1 or formats != {"pack-quantized"}:
        raise EdgeLLMError(f"a compressed-tensors checkpoint in format {', '.join(sorted(map(str, formats)))} with "
                           f"{len(groups)} scheme(s): edgellm reads one pack-quantized integer weight scheme")
    weights, activations = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if activations or weights.get("type", "int") != "int" or weights.get("strategy") not in ("group", "channel"):
        raise EdgeLLMError("a compressed-tensors checkpoint with quantized activations, float weights or "
                           f"{weights.get('strategy')!r} scales: edgellm reads integer weights (W4A16, W8A16) "
                           "with group or channel scales")
    return {**q, "bits": weights.get("num_bits", 4), "sym": bool(weights.get("symmetric", True))}


def _unpack(packed: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """int32 words -> their 32 / bits values, lowest bits first, spread along `axis`."""
    words, per_word = packed.astype(np.uint32), 32 // bits
    mask = np.uint32((1 << bits) - 1)
    values = np.stack([(words >> (bits * i)) & mask for i in range(per_word)], axis=axis + 1).astype(np.uint8)
    shape = list(packed.shape)
    shape[axis] *= per_word
    return values.reshape(shape)


class PrequantizedSource(WrappedSource):
    """A Hugging Face source whose projections are GPTQ, AWQ or compressed-tensors blocks: linear("x.weight") hands
    over a QuantizedWeight; every other tensor reads through."""

    def __init__(self, source: ModelSource, quantization: dict):
        self.source, self.config, self.q = source, source.config, quantization
        self.parts = PARTS[quantization["quant_method"]]
        names, marker = source.names(), "." + self.parts[0]
        self.packed = {n[: -len(marker)] for n in names if n.endswith(marker)}
        self._names = [n for n in names if not any(n == f"{p}.{part}" for p in self.packed for part in self.parts)]
        self._names += [f"{p}.weight" for p in sorted(self.packed)]

    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def raw(self, name: str) -> np.ndarray:
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and prefix in self.packed:
            weight = self.linear(name)
            assert isinstance(weight, QuantizedWeight)  # (a packed tensor is read as blocks)
            return weight.dequantize()
        return self.source.raw(name)

    def block_types(self) -> set[str]:
        return {f"{self.q['quant_method'].upper()} {self.q['bits']}-bit"}

    def linear(self, name: str) -> np.ndarray | QuantizedWeight:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix not in self.packed:
            return self.source.linear(name)
        part = lambda p: self.source.raw(f"{prefix}.{p}")  # noqa: E731
        has = lambda p: f"{prefix}.{p}" in self.source  # noqa: E731
        method, bits = self.q["quant_method"], self.q["bits"]
        if method == "compressed-tensors":
            n, k = (int(v) for v in part("weight_shape")) if has("weight_shape") else (None, None)
            codes = _unpack(part("weight_packed"), 1, bits)  # [N, K (padded)] plus the midpoint
            n, k = n or codes.shape[0], k or codes.shape[1]
            codes = np.ascontiguousarray(codes[:, :k].T)
            scales = part("weight_scale").astype(np.float32).reshape(n, -1).T  # [G, N]
            groups = scales.shape[0]
            if self.q["sym"]:
                zeros = np.full((groups, n), 1 << (bits - 1), np.uint8)
            else:
                zeros = np.ascontiguousarray(_unpack(part("weight_zero_point"), 0, bits)[:n].T)
            group_of = (part("weight_g_idx").astype(np.int64) if has("weight_g_idx")
                        else np.arange(k) // (k // groups))
            return blocks(prefix, codes, zeros, scales, group_of, bits)
        scales = part("scales").astype(np.float32)  # [G, N]
        groups, n = scales.shape
        if method == "awq":
            codes = _unpack(part("qweight"), 1, 4)  # [K, N] in packing order
            zeros = _unpack(part("qzeros"), 1, 4)
            unorder = np.argsort(np.tile(AWQ_ORDER, n // 8) + np.repeat(np.arange(0, n, 8), 8))
            codes, zeros = codes[:, unorder], zeros[:, unorder]
            group_of = np.arange(codes.shape[0]) // (codes.shape[0] // groups)
        else:
            codes = _unpack(part("qweight"), 0, bits)  # [K, N]
            zeros = _unpack(part("qzeros"), 1, bits).astype(np.int16)[:, :n]  # [G, N]
            if self.q.get("checkpoint_format", "gptq") != "gptq_v2":
                zeros = zeros + 1
            if zeros.max() >= 1 << bits:
                raise EdgeLLMError(f"{prefix}: a GPTQ zero point of {1 << bits}, which {bits}-bit blocks cannot hold")
            zeros = zeros.astype(np.uint8)
            k = codes.shape[0]
            group_of = part("g_idx").astype(np.int64) if has("g_idx") else np.arange(k) // (k // groups)
        return blocks(prefix, codes, zeros, scales, group_of, bits)


def blocks(prefix: str, codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, group_of: np.ndarray,
           bits: int = 4):
    """QuantizedWeight [N, G, K / G] of codes [K, N] whose column k is in group group_of[k] (zeros and scales
    [G, N]); columns out of group order are reordered, the order recorded for the graph. A group that is not a
    power of two (one scale per channel of 576 inputs) is cut into blocks of the largest power of two dividing it,
    each with the group's scale and zero point."""
    k, n = codes.shape
    groups = scales.shape[0]
    size = k // groups
    block = size & -size  # the largest power of two dividing the group
    if size * groups != k or block < 16:
        raise EdgeLLMError(f"{prefix}: groups of {k / groups:g} input columns; edgellm keeps blocks of a power of two "
                           "of 16 or more, which must divide the group")
    order = np.argsort(group_of, kind="stable")
    if not (np.bincount(group_of, minlength=groups) == size).all():
        raise EdgeLLMError(f"{prefix}: its groups are of unequal sizes (g_idx), which blocks cannot hold")
    in_order = bool((order == np.arange(k)).all())
    codes = codes[order] if not in_order else codes
    per_group = size // block
    return QuantizedWeight(bits, block, k, np.ascontiguousarray(codes.T.reshape(n, groups * per_group, block)),
                           np.ascontiguousarray(np.repeat(scales.T, per_group, axis=1)),
                           np.ascontiguousarray(np.repeat(zeros.T, per_group, axis=1)),
                           k_order=None if in_order else order)
