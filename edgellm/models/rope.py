"""Rotary position embedding tables: inverse frequencies per the config's rope type, then cos/sin caches."""

from __future__ import annotations

import math

import numpy as np

from ..errors import EdgeLLMError


def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params["rope_type"] == "mrope":  # Qwen2-VL's older configs: default frequencies, split over 3 axes
        params["rope_type"] = "default"
    return params


def inv_freq(params: dict, dim: int) -> np.ndarray:
    base = float(params["rope_theta"])
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    kind = params["rope_type"]
    if kind == "default":
        return freqs
    if kind == "freq_factors":  # GGUF Llama 3.x stores the llama3 adjustment as divisors
        return freqs / np.asarray(params["factors"], np.float64)
    if kind == "linear":
        return freqs / params["factor"]
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freqs
        scaled = np.where(wavelen > old_len / low, freqs / factor, freqs)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise EdgeLLMError(f"rope type {kind!r} is not supported yet (supported: default, linear, llama3)")


def cos_sin_cache(freqs: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """[max_positions, dim/2] tables, computed like transformers (float32 products of float32 operands)."""
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * freqs.astype(np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
