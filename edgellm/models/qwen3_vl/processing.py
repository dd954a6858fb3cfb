"""Qwen3-VL preprocessing: Qwen2-VL's smart resize and patch order (16px patches, 32px merged units), plus, per
patch, the four bilinear taps into the ViT's learned position table (align_corners, as transformers resamples it
for each grid). A video is sampled evenly at 2 frames per second and written into the prompt as one block per
temporal patch, each after its time ("<1.6 seconds>"), as Qwen3VLProcessor does."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from ...errors import EdgeLLMError
from ...vision.media import Media
from ...vision.processor import DecoderExtension
from ...vision.video import read_frames
from ..qwen2_vl import processing as qwen2_vl
from ..qwen2_vl.processing import fitted_size, merged_tokens, patch_positions, patchify, resized


@dataclass(kw_only=True)
class Settings(qwen2_vl.Settings):
    grid_per_side: int  # the ViT's learned position table is a square grid of this side


Qwen3Settings = Settings  # the name the processor's class attribute is typed with


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


def sample_indices(total: int, video_fps: float, s: Settings, max_frames: int) -> list[int]:
    """Evenly spread frames at the bundle's rate, at least video_min_frames, at most max_frames
    (Qwen3VLVideoProcessor.sample_frames)."""
    n = min(max(int(total / video_fps * s.video_fps), s.video_min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


class Processor(qwen2_vl.Processor):
    """Images as Qwen2-VL's; the vision graph also takes each patch's position-table taps, and a video is written
    as one timed block per temporal patch."""

    Settings = Qwen3Settings
    settings: Qwen3Settings

    def runs(self, media: Media):
        """One vision-graph run per temporal slice."""
        assert media.grid is not None, "this family's media always carry their patch grid"
        t, h, w = media.grid
        where = patch_positions(h, w, self.settings.merge_size)
        taps, weights = position_taps(where, h, w, self.settings.grid_per_side)
        for i in range(t):
            yield {"pixel_values": media.pixel_values[i * h * w:(i + 1) * h * w], "patch_positions": where,
                   "position_indices": taps, "position_weights": weights}

    def video(self, clip, frames: int | None = None) -> Media:
        """`frames` caps the frame count (default: the bundle's video_frames); each frame is resized within the
        bundle's per-frame video pixel budget."""
        s = self.settings
        cap = frames or s.video_frames
        if cap < 1:
            raise EdgeLLMError("--frames must be at least 1")
        pictures, fps, total = read_frames(clip, lambda total, rate: sample_indices(total, rate, s, cap))
        chosen = sample_indices(total, fps, s, cap)
        size = fitted_size(pictures[0], s, s.video_min_pixels, s.video_max_pixels)
        pixels, grid = patchify(np.stack([resized(p, s, size) for p in pictures]), s)
        tp = s.temporal_patch_size
        times = [i / fps for i in chosen + [chosen[-1]] * (-len(chosen) % tp)]
        stamps = tuple((times[i] + times[i + tp - 1]) / 2 for i in range(0, len(times), tp))
        return Media.of("video", pixels, merged_tokens(grid, s), grid=grid, timestamps=stamps)

    def expand_prompt(self, text: str, items: list) -> str:
        """An image's <|image_pad|> becomes as many pads as it has rows; a video's <|video_pad|> becomes, per
        temporal patch, "<t seconds>" + <|vision_start|> + pads + <|vision_end|>."""
        s = self.settings
        pattern = re.compile("|".join(re.escape(t) for t in (s.image_token, s.video_token) if t))
        queue = iter(items)

        def expand(m):
            item = next(queue, None)
            if item is None:  # Model.prepare reports the mismatch
                return m.group(0)
            if item.kind == "image":
                return m.group(0) * item.tokens
            per_frame = item.tokens // len(item.timestamps)
            return "".join(f"<{t:.1f} seconds>{s.image_start}{s.video_token * per_frame}{s.image_end}"
                           for t in item.timestamps)

        return pattern.sub(expand, text)

    def positions(self, length: int, spans: list[np.ndarray], items: list) -> np.ndarray:
        """M-RoPE positions as Qwen2-VL's for images; each temporal patch of a video is placed like an image of its
        own (the timestamps between them are text)."""
        split_spans, split_items = [], []
        for span, item in zip(spans, items):
            if item.kind != "video":
                split_spans.append(span)
                split_items.append(item)
                continue
            t, h, w = item.grid
            per = len(span) // t
            for i in range(t):
                split_spans.append(span[i * per:(i + 1) * per])
                split_items.append(dataclasses.replace(item, kind="image", grid=(1, h, w), tokens=per))
        return qwen2_vl.mrope_positions(length, split_spans, split_items, self.settings)

    def decoder_extension(self, graph_inputs: dict[str, list]) -> DecoderExtension:
        return DeepStack(*graph_inputs["deepstack_embeds"][::2])


class DeepStack(DecoderExtension):
    """The decoder adds the features of K ViT depths (the vision graph's deepstack_embeds) to the image positions
    after its first K layers: an input [K, positions, hidden], zero where no image is."""

    def __init__(self, depths: int, hidden: int):
        self.depths, self.hidden = depths, hidden

    def inputs(self, length: int, media: list) -> dict[str, np.ndarray]:
        deep = np.zeros((self.depths, length, self.hidden), np.float32)
        for at, features in media:
            deep[:, at] = features["deepstack_embeds"].transpose(1, 0, 2)
        return {"deepstack_embeds": deep}
