"""`--kv-cache int8`: the decoder's KV cache stored as int8 with one scale per layer, head and channel.

Decoding after a long context reads the whole cache once per token; at 8 bits it reads a quarter of float32's bytes,
and ONNX Runtime's GroupQueryAttention quantizes new rows and dequantizes the cache itself (`k_quant_type`,
`v_quant_type`). The scales are fixed in the graph, so they are calibrated here: the converted float-cache decoder
runs over a built-in text, and each channel's scale covers the largest magnitude seen there times a margin (larger
values saturate). Keys are rotated by position, which mixes channel c with c + head_dim / 2, so those two share
the larger range. Nodes other than GroupQueryAttention that read the cache (a family computing its own attention)
get it widened back to float beside them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeLLMError
from ..format import EmbeddingTable
from .decoder_run import present_name, run_decoder
from .options import KV_CACHE_MODES

MARGIN = 1.6  # headroom over the calibrated range (values beyond saturate): the best of 1.0-3.0 on both real models

CALIBRATION_TEXT = """\
The history of the lighthouse is the history of trade. Long before electric lamps, keepers burned wood, coal and
whale oil in open fires on headlands, and ships still ran aground on nights of fog. In 1822 Augustin Fresnel built
a lens of concentric glass rings that gathered the light of a single lamp into a beam visible for twenty miles.
Question: How many rings did the first Fresnel lens have, and why did it matter?
Answer: The number varied by order of lens; what mattered was that one small flame could now be seen from far out
at sea, so coasts could be lit for a fraction of the fuel.

def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    \"\"\"Merge overlapping closed intervals; returns them sorted by start.\"\"\"
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

| city      | population | area (km2) |
|-----------|-----------:|-----------:|
| Lyon      |    522,250 |      47.87 |
| Osaka     |  2,752,412 |     225.21 |
| Curitiba  |  1,773,718 |     434.89 |

Le marché ouvre à sept heures ; les pêcheurs arrivent avec la marée. 今日は雨が降っていますが、明日は晴れるでしょう。
我们明天早上九点在火车站见面。 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144 -- 3.14159 * 2 = 6.28318.
{"id": 42, "name": "sensor-7", "readings": [21.5, 21.7, 22.0], "ok": true}
"""


def cache_names(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(past, present) names of each cache tensor, in the decoder contract's order (past_key.0, past_value.0, ...)."""
    return [(i.name, present_name(i.name)) for i in graph.input if i.name.startswith("past_")]


def calibrate(decoder: Path, table: EmbeddingTable, token_ids: list[int], chunk_length: int,
              extension_for=None, on_chunk=None) -> dict[str, np.ndarray]:
    """Run the float-cache decoder over `token_ids` (in chunks, as the runtime prefills) and return, per past
    input, the largest magnitude of each [head, channel] over those positions: {past name: [1, heads, 1, dim]}.
    `extension_for(graph inputs {name: shape})`: the family's DecoderExtension, whose extra inputs for text it
    feeds; on_chunk(tokens done) after each chunk."""
    caches = run_decoder(decoder, table, token_ids, chunk_length, extension_for, on_chunk).caches
    length = len(token_ids)
    ranges = {}
    for n, cache in caches.items():
        peak = np.abs(cache[:, :, :length]).max(axis=2, keepdims=True)
        if n.startswith("past_key"):  # rotary pairs channel c with c + dim/2: both get the pair's range
            half = peak.shape[-1] // 2
            pair = np.maximum(peak[..., :half], peak[..., half:2 * half])
            peak[..., :half], peak[..., half:2 * half] = pair, pair
        ranges[n] = peak
    return ranges


def scales_from_ranges(ranges: dict[str, np.ndarray], margin: float = MARGIN) -> dict[str, np.ndarray]:
    """int8 steps per channel; a channel that stayed zero keeps a tiny step rather than dividing by zero."""
    return {n: np.maximum(peak * np.float32(margin / 127), np.float32(1e-8)).astype(np.float32)
            for n, peak in ranges.items()}


def quantize_cache(graph_path: Path, scales: dict[str, np.ndarray]) -> None:
    """Rewrite the saved decoder graph (its weights stay in the data file, untouched) to keep an int8 cache with
    `scales` ({past name: [1, heads, 1, dim]})."""
    model = onnx.load(graph_path, load_external_data=False)
    graph = model.graph
    pairs = cache_names(graph)
    if set(scales) != {past for past, _ in pairs}:
        raise EdgeLLMError("the KV cache scales do not match the decoder graph's cache inputs")
    scale_of = {}
    for past, present in pairs:
        name = f"{past}.scale"
        graph.initializer.append(numpy_helper.from_array(scales[past], name))
        scale_of[past] = scale_of[present] = name
    for value in list(graph.input) + list(graph.output):
        if value.name in scale_of:
            value.type.tensor_type.elem_type = TensorProto.INT8
    _rewrite(graph, scale_of)
    onnx.save_model(model, graph_path)


def _rewrite(graph: onnx.GraphProto, scale_of: dict[str, str]) -> None:
    """GroupQueryAttention nodes get the scales; any other reader of the cache reads it widened to float, where it
    reads it (inside an If branch, widened only when the branch runs). Identity nodes pass the int8 cache on."""
    widened: dict[str, str] = {}
    nodes = []
    scale_of = dict(scale_of)  # names a branch adds stay in the branch
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rewrite(attribute.g, scale_of)
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            past_key, past_value = node.input[3], node.input[4]
            if past_key in scale_of:
                inputs = list(node.input) + [""] * max(0, 12 - len(node.input))
                inputs[12:14] = [scale_of[past_key], scale_of[past_value]]
                del node.input[:]
                node.input.extend(inputs)
                node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                                       helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                                       helper.make_attribute("kv_cache_bit_width", 8)])
            nodes.append(node)
            continue
        if node.op_type == "Identity" and node.input[0] in scale_of:  # passes the int8 cache on as it is
            scale_of[node.output[0]] = scale_of[node.input[0]]
            nodes.append(node)
            continue
        for j, name in enumerate(node.input):
            if name in scale_of:
                if name not in widened:
                    widened[name] = f"{name}/float"
                    as_float = helper.make_node("Cast", [name], [f"{name}/int8_as_float"], to=TensorProto.FLOAT,
                                                name=f"{name}/widen")
                    nodes.append(as_float)
                    nodes.append(helper.make_node("Mul", [as_float.output[0], scale_of[name]], [widened[name]],
                                                  name=f"{name}/dequantize"))
                node.input[j] = widened[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


__all__ = ["KV_CACHE_MODES", "CALIBRATION_TEXT", "calibrate", "scales_from_ranges", "quantize_cache"]
