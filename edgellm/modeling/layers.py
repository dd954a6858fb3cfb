"""Layers the model families share, written once over the graph builder: activations, norms and biased linears,
per-head norms, rotary position tables (a registry of rope types, and 3-axis M-RoPE), a patch embedding and the
pre-norm block of a vision transformer.

Families receive the converter's GraphBuilder (`g`) and a weight source (`weights`) and call these; nothing here
imports ONNX, so a family module stays cheap to import for the runtime, which only needs its processor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgeLLMError

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder

MS = "com.microsoft"  # ONNX Runtime's contrib-op domain
FLOAT, INT64 = 1, 7  # onnx.TensorProto element types, for Cast


# --- activations, norms, linears ------------------------------------------------------------------
def activation(g: GraphBuilder, x: str, kind: str, name: str) -> str:
    if kind in ("silu", "swish"):
        return g.mul(x, g.op("Sigmoid", [x], name=f"{name}/sigmoid"), name)
    if kind in ("gelu_pytorch_tanh", "gelu_new"):
        return g.op("FastGelu", [x], name=name, domain=MS)
    if kind == "quick_gelu":
        return g.op("QuickGelu", [x], name=name, domain=MS, alpha=1.702)
    if kind == "gelu":
        return g.op("Gelu", [x], name=name, domain=MS)
    raise EdgeLLMError(f"unsupported activation {kind!r}")


def norm(g: GraphBuilder, weights: ModelSource, x: str, name: str, eps: float, kind: str = "layer_norm") -> str:
    """The checkpoint's `{name}.weight` (and `.bias`) as a LayerNorm, or an RMSNorm with kind="rms_norm"."""
    if kind == "rms_norm":
        return g.rms_norm(x, weights.tensor(f"{name}.weight"), eps, name)
    return g.layer_norm(x, weights.tensor(f"{name}.weight"), weights.tensor(f"{name}.bias"), eps, name)


def linear(g: GraphBuilder, weights: ModelSource, x: str, name: str, bias: bool = True) -> str:
    """x @ `{name}.weight`.T (+ `{name}.bias`)."""
    return g.linear(x, weights.linear(f"{name}.weight"), name, weights.tensor(f"{name}.bias") if bias else None)


def head_norm(g: GraphBuilder, x: str, weight: np.ndarray, heads: int, head_dim: int, eps: float, name: str) -> str:
    """RMSNorm over each head of x [1, S, heads * head_dim] (per-head q/k norms)."""
    per_head = g.reshape(x, [0, 0, heads, head_dim], name=f"{name}/split_heads")
    normed = g.rms_norm(per_head, weight, eps, name)
    return g.reshape(normed, [0, 0, heads * head_dim], name=f"{name}/merge_heads")


# --- rotary position embeddings ---------------------------------------------------------------------
def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params["rope_type"] in ("yarn", "dynamic", "longrope"):  # the trained length, which they scale from
        params.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings")
                          or config.get("max_position_embeddings"))
        params["max_positions"] = config.get("max_position_embeddings")
    if config.get("partial_rotary_factor") is not None:  # (transformers 5 keeps it in rope_parameters)
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] == "mrope":  # older 3-axis configs: default frequencies, split over the axes
        params["rope_type"] = "default"
    return params


def _llama3(freqs: np.ndarray, params: dict) -> np.ndarray:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    scaled = np.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _yarn(freqs: np.ndarray, params: dict) -> tuple[np.ndarray, float]:
    """YaRN: frequencies interpolated by `factor` below a band, kept above it, ramped between; cos and sin scaled by
    the attention factor (as transformers computes them)."""
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_positions"] / old_len
    dim, base = 2 * len(freqs), float(params["rope_theta"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(params.get("beta_fast") or 32), correction(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    kept = 1 - ramp
    return (freqs / factor) * (1 - kept) + freqs * kept, float(attention)


def _longrope(freqs: np.ndarray, params: dict) -> tuple[np.ndarray, float]:
    """LongRoPE: per-frequency divisors, the short ones for contexts within the trained length and the long ones
    beyond it, and an attention factor from the context's extension. Tables of `positions` rows are the long ones
    when the positions outgrow the trained length, unless `longrope_table` ("short" or "long") says which."""
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_positions"] / old_len
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    long = params["positions"] > old_len if params.get("longrope_table") is None else params["longrope_table"] == "long"
    divisors = params["long_factor" if long else "short_factor"]
    return freqs / np.asarray(divisors, np.float64), float(attention)


def _dynamic(freqs: np.ndarray, params: dict) -> tuple[np.ndarray, float]:
    """Dynamic NTK scaling changes nothing up to the model's trained length, the longest a bundle can be built for
    with it (rope_frequencies checks the bundle's length against `max_positions`)."""
    return freqs, 1.0


# rope_type -> (the default inverse frequencies, the config's rope parameters) -> (frequencies, attention scale)
ROPE_TYPES: dict[str, Callable[[np.ndarray, dict], tuple[np.ndarray, float]]] = {
    "default": lambda freqs, params: (freqs, 1.0),
    "linear": lambda freqs, params: (freqs / params["factor"], 1.0),
    "llama3": lambda freqs, params: (_llama3(freqs, params), 1.0),
    # a GGUF stores the llama3 adjustment as per-frequency divisors
    "freq_factors": lambda freqs, params: (freqs / np.asarray(params["factors"], np.float64), 1.0),
    "yarn": _yarn,
    "dynamic": _dynamic,
    "longrope": _longrope,
}


def rope_frequencies(params: dict, dim: int, positions: int | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim / 2], the factor the rope type scales cos and sin by) for `rope_parameters`, for
    tables of `positions` rows (rope types whose frequencies depend on the context's length)."""
    params = {**params, "positions": positions or 0}
    base = float(params["rope_theta"])
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = params["rope_type"]
    if kind not in ROPE_TYPES:
        raise EdgeLLMError(f"rope type {kind!r} is not supported yet (supported: {', '.join(ROPE_TYPES)})")
    return ROPE_TYPES[kind](freqs, params)


def inv_freq(params: dict, dim: int) -> np.ndarray:
    """The inverse frequencies of a rope type that does not scale cos and sin (graphs that compute their own
    angles, such as M-RoPE's)."""
    freqs, scale = rope_frequencies(params, dim)
    if scale != 1.0:
        raise EdgeLLMError(f"rope type {params['rope_type']!r} scales attention, which this decoder does not apply")
    return freqs


def longrope_switch(params: dict, max_positions: int) -> int | None:
    """The trained length at which a LongRoPE model changes from its short to its long factors, when a bundle of
    `max_positions` positions crosses it (then the decoder holds both tables); None otherwise."""
    if params["rope_type"] != "longrope" or max_positions <= params["original_max_position_embeddings"]:
        return None
    return int(params["original_max_position_embeddings"])


def rope_tables(params: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, rotary dim / 2] of a rope type, its attention factor applied; the rotary dim is
    head_dim times the partial rotary factor (the rest of each head is not rotated)."""
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if params["rope_type"] == "dynamic" and max_positions > params.get("max_positions", max_positions):
        raise EdgeLLMError(f"dynamic rope scaling changes the frequencies past the model's {params['max_positions']} "
                           f"positions, which a bundle's fixed tables cannot; convert with --seq-length "
                           f"{params['max_positions']} or less")
    freqs, scale = rope_frequencies(params, dim, max_positions)
    cos, sin = cos_sin_cache(freqs, max_positions)
    return (cos * np.float32(scale), sin * np.float32(scale)) if scale != 1.0 else (cos, sin)


def cos_sin_cache(freqs: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """[max_positions, dim/2] tables, computed like transformers (float32 products of float32 operands)."""
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * freqs.astype(np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def mrope_tables(g: GraphBuilder, position_ids: str, length_of: str, freqs: np.ndarray, sections: list[int],
                 interleaved: bool = False) -> tuple[str, str, str]:
    """M-RoPE: each token has (t, h, w) positions `position_ids` [3, S] and each band of frequencies turns with one
    of them (section i with axis i % 3); interleaved, frequency j turns with axis j % 3 while that
    axis's section lasts, else with time. The angles are computed per token in the graph; returns (cos, sin, steps)
    where steps [1, S] = 0..S-1 (S read from `length_of` [1, S, ...]), by which rotary reads row i for token i."""
    half = len(freqs)
    if sum(sections) != half:
        raise EdgeLLMError(f"mrope_section {sections} does not cover the {half} rotary frequencies")
    if interleaved:
        j = np.arange(half)
        axis = np.where((j % 3 == 1) & (j < 3 * sections[1]), 1, np.where((j % 3 == 2) & (j < 3 * sections[2]), 2, 0))
    else:
        axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)])
    pick = (axis[None, :] == np.arange(3)[:, None]).astype(np.float32)[:, None, :]  # [3, 1, half]
    positions = g.op("Cast", [position_ids], name="rope/positions", to=FLOAT)
    angles = g.mul(g.op("Unsqueeze", [positions, g.ints([2], "rope/axis2")], name="rope/unsqueeze"),
                   g.const(freqs.astype(np.float32).reshape(1, 1, half), "rope.inv_freq"), "rope/angles")
    angles = g.op("ReduceSum", [g.mul(angles, g.const(pick, "rope.sections"), "rope/pick"), g.ints([0], "rope/axis0")],
                  name="rope/select", keepdims=0)
    cos, sin = g.op("Cos", [angles], name="rope/cos"), g.op("Sin", [angles], name="rope/sin")
    length = g.op("Gather", [g.op("Shape", [length_of], name="rope/shape"), g.ints(1, "rope/dim1")],
                  name="rope/length", axis=0)
    steps = g.op("Range", [g.ints(0, "rope/zero"), length, g.ints(1, "rope/one")], name="rope/steps")
    return cos, sin, g.op("Unsqueeze", [steps, g.ints([0], "rope/axis0b")], name="rope/local_positions")


# --- vision transformers ----------------------------------------------------------------------------
@dataclass
class VitArgs:
    """What every vision tower of square images with square patches has (names as in the checkpoints' configs)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size


def patch_embedding(g: GraphBuilder, weights: ModelSource, pixels: str, name: str, patch: int, hidden: int) -> str:
    """[images, 3, H, W] -> [images, patches, hidden]: a stride-`patch` convolution, patches in row-major order."""
    x = g.op("Conv", [pixels, g.const(weights.tensor(f"{name}.weight"), f"{name}.weight"),
                      g.const(weights.tensor(f"{name}.bias"), f"{name}.bias")], name=name,
             kernel_shape=[patch] * 2, strides=[patch] * 2)
    return g.op("Transpose", [g.reshape(x, [0, hidden, -1], f"{name}/flatten")], name=f"{name}/nlc", perm=[0, 2, 1])


def vit_block(g: GraphBuilder, x: str, prefix: str, norm1: Callable[[str], str], attention: Callable[[str], str],
              norm2: Callable[[str], str], mlp: Callable[[str], str],
              layer_scale: Callable[[int, str], str] | None = None) -> str:
    """The pre-norm transformer block of every vision tower here: x + attention(norm1(x)), then + mlp(norm2(.));
    layer_scale(i, branch) scales branch i (1, 2) first where the tower learns per-channel scales (InternViT)."""
    for i, (before, branch) in enumerate(((norm1, attention), (norm2, mlp)), start=1):
        h = branch(before(x))
        if layer_scale is not None:
            h = layer_scale(i, h)
        x = g.add(x, h, f"{prefix}/res{i}")
    return x
