"""Qwen3-VL preprocessing: Qwen2-VL's smart resize and patch order (16px patches, 32px merged units), plus, per
patch, the four bilinear taps into the ViT's learned position table (align_corners, as transformers resamples it
for each grid)."""

from __future__ import annotations

import numpy as np

from .media import Media
from .qwen2_vl import expand_prompt, image, patch_positions, positions  # noqa: F401  (the same rules)


def axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps into a `side`-long table for positions `index` of an axis of `size`, and their weights."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0, None)
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)


def position_taps(rows_cols: np.ndarray, h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """([patches, 4] indices into the flattened table, [patches, 4] weights) for patches at (row, col)."""
    rt, rw = axis_taps(rows_cols[:, 0], h, side)
    ct, cw = axis_taps(rows_cols[:, 1], w, side)
    return (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4), (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4)


def runs(media: Media, s: dict):
    """One vision-graph run per temporal slice."""
    t, h, w = media.grid
    where = patch_positions(h, w, s["merge_size"])
    taps, weights = position_taps(where, h, w, s["grid_per_side"])
    for i in range(t):
        yield {"pixel_values": media.pixel_values[i * h * w:(i + 1) * h * w], "patch_positions": where,
               "position_indices": taps, "position_weights": weights}


def video(clip, s: dict, frames: int | None = None) -> Media:
    from ..errors import EdgeLLMError

    raise EdgeLLMError("Qwen3-VL video input is not supported yet; give frames as images")
