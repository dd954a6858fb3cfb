"""Whether a bundle fits in the memory this machine has free, checked before anything is loaded: a bundle that
does not fit would otherwise be killed by the kernel half-way through loading, or push the machine into swap."""

from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError
from ..format import DECODER_GRAPH, Bundle
from ..host import available_bytes

GIB = 1 << 30


def openvino_copy_bytes(stored: int, quantization) -> int:
    """What OpenVINO holds of a decoder whose weights take `stored` bytes in the bundle: about 2 bytes per weight,
    whatever the bundle's precision (measured: a 1.5B-parameter 4-bit bundle of 1.34 GiB added 2.9 GiB)."""
    group = quantization.group_size
    per_weight = {"w4": 0.5 + 4 / group, "w8": 1 + 4 / group, "f16": 2.0, "f32": 4.0}[quantization.mode]
    return int(stored / per_weight * 2)


DEFAULT_SLOTS = 4  # answers a server decodes together unless told (`serve --parallel`)


def kv_cache_bytes(bundle: Bundle) -> int:
    """One sequence's KV cache once the bundle's whole context is filled."""
    m = bundle.manifest
    shape = m.model
    itemsize = np.dtype(m.quantization.kv_dtype).itemsize
    return shape.num_hidden_layers * 2 * shape.num_key_value_heads * m.seq_length * shape.head_dim * itemsize


def default_slots(bundle: Bundle, device: str = "cpu", available: int | None = None) -> int:
    """DEFAULT_SLOTS, or fewer where their KV caches, full, would take more than half the memory left beside the
    weights."""
    free = available_bytes() if available is None else available
    if free is None:
        return DEFAULT_SLOTS
    weights = sum(size for name, size in needed_bytes(bundle, device).items() if name != "KV cache")
    return int(max(1, min(DEFAULT_SLOTS, (free - weights) // 2 // kv_cache_bytes(bundle))))


def needed_bytes(bundle: Bundle, device: str = "cpu", slots: int = 1) -> dict[str, int]:
    """What loading the bundle makes resident, by part: the graphs' weights (float16 ones are widened to float32
    when the session starts; on device openvino OpenVINO holds the decoder's again, widened, for prefill) and the
    KV cache once the context is full. The embedding table is read row by row and not counted."""
    m = bundle.manifest
    needs = {}
    for graph, file in m.graphs.items():
        data = m.files.get(file + ".data")
        if data is not None:
            mode = m.vision.quantization if (graph != DECODER_GRAPH and m.vision) else m.quantization.mode
            needs[f"{graph} weights"] = data.bytes * (2 if mode == "f16" else 1)
            if graph == DECODER_GRAPH and device == "openvino":
                needs["OpenVINO's copy of the decoder weights"] = openvino_copy_bytes(data.bytes, m.quantization)
    needs["KV cache"] = kv_cache_bytes(bundle) * slots
    return needs


def check_fits(bundle: Bundle, device: str = "cpu", available: int | None = None, slots: int = 1) -> None:
    free = available_bytes() if available is None else available
    if free is None:
        return
    needs = needed_bytes(bundle, device, slots)
    total = sum(needs.values())
    if total > free:
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in needs.items())
        raise EdgeLLMError(f"{bundle.path}: this bundle needs about {total / GIB:.2f} GiB ({parts}) and "
                           f"{free / GIB:.2f} GiB is free; close other programs, or reconvert with a smaller "
                           "--seq-length or -q w4 (--no-memory-check, or load(..., check_memory=False), loads it "
                           "anyway)")
