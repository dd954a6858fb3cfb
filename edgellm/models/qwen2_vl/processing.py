"""Qwen2-VL / Qwen2.5-VL preprocessing: images keep their aspect ratio and are resized to a multiple of 28 px within
a pixel budget ("smart resize"), then cut into 14px patches, two frames deep, grouped 2x2 for the merger. Videos
are sampled at a frame rate, two frames per temporal patch. The rules are transformers' Qwen2VLImageProcessor's
and Qwen2VLVideoProcessor's; the 3-axis positions are those of the model's get_rope_index."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ...errors import EdgeLLMError
from ...vision import processor
from ...vision.images import load_image, normalize
from ...vision.media import Media
from ...vision.video import read_frames


@dataclass(kw_only=True)
class Settings(processor.MediaTokens):
    version: str  # "2" or "2.5" ("3": Qwen3-VL)
    static_size: list[int] | None  # (height, width) every image is resized to, under --static-vit
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    resample: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    video_fps: float
    video_min_frames: int
    video_frames: int
    video_min_pixels: int
    video_max_pixels: int
    tokens_per_second: float | None  # 2.5: temporal positions of video frames follow time


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), both multiples of `factor`, with a pixel count within bounds and the aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise EdgeLLMError(f"an image of {width}x{height} is too elongated (aspect ratio above 200)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


QwenSettings = Settings  # the name the processor's class attribute is typed with


def patchify(frames: np.ndarray, s: Settings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[frames, 3, H, W] -> ([t * h * w patches, 3 * temporal * 14 * 14], (t, h, w)), patches ordered by temporal
    slice, then 2x2 merge group, then within the group; a last incomplete temporal patch repeats the last frame."""
    p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
    if len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
    n, c, height, width = frames.shape
    t, h, w = n // tp, height // p, width // p
    x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(t * h * w, c * tp * p * p)), (t, h, w)


def fitted_size(picture, s: Settings, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) to resize `picture` to: the bundle's fixed size under --static-vit, else smart resize."""
    if s.static_size:
        height, width = s.static_size
        return height, width
    return smart_resize(picture.height, picture.width, s.patch_size * s.merge_size, min_pixels, max_pixels)


def resized(picture, s: Settings, size: tuple[int, int]) -> np.ndarray:
    """[3, height, width] float32, resized to `size` (height, width) and normalised."""
    height, width = size
    return normalize(picture.resize((width, height), s.resample), s.rescale_factor, s.image_mean,
                     s.image_std)


def sample_indices(total: int, video_fps: float, s: Settings, max_frames: int) -> list[int]:
    """Frames at the bundle's sampling rate, at least video_min_frames and at most max_frames, a whole number of
    temporal patches (transformers' Qwen2VLVideoProcessor.sample_frames)."""
    tp = s.temporal_patch_size
    cap = math.floor(min(max_frames, total) / tp) * tp
    n = min(max(total / video_fps * s.video_fps, s.video_min_frames), cap, total)
    n = math.floor(n / tp) * tp or total  # a clip shorter than one temporal patch keeps what it has
    return [int(i * total / n) for i in range(n)]


def patch_positions(h: int, w: int, m: int) -> np.ndarray:
    """(row, column) of each patch of one temporal slice, in the merge-group order of `patchify`."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    return np.stack([block(rows), block(cols)], axis=1).astype(np.int64)


def mrope_positions(length: int, spans: list[np.ndarray], items: list, s: Settings) -> np.ndarray:
    """[3, length] M-RoPE positions: text advances all three axes together; an image's tokens take (t, row, col)
    offsets from where the text stopped, and the text after it resumes past the image's larger side."""
    out = np.empty((3, length), np.int64)
    at, done, m = 0, 0, s.merge_size
    for span, item in zip(spans, items):
        start = int(span[0])
        out[:, done:start] = at + np.arange(start - done)
        at += start - done
        t, h, w = item.grid[0], item.grid[1] // m, item.grid[2] // m
        interval = np.float32(1.0)
        if item.kind == "video" and s.tokens_per_second:
            interval = np.float32(s.tokens_per_second) * np.float32(item.seconds_per_grid)
        times = (np.arange(t, dtype=np.float32) * interval).astype(np.int64) + at
        grid = np.meshgrid(times, np.arange(h) + at, np.arange(w) + at, indexing="ij")
        out[:, start:start + len(span)] = np.stack(grid).reshape(3, -1)
        at += max(h, w)
        done = start + len(span)
    out[:, done:] = at + np.arange(length - done)
    return out


def merged_tokens(grid: tuple[int, int, int], s: Settings) -> int:
    return grid[0] * grid[1] * grid[2] // s.merge_size ** 2


class Processor(processor.Processor):
    Settings: type[QwenSettings] = QwenSettings
    settings: QwenSettings

    def image(self, picture) -> Media:
        s, picture = self.settings, load_image(picture)
        pixels, grid = patchify(resized(picture, s, fitted_size(picture, s, s.min_pixels, s.max_pixels))[None], s)
        return Media.of("image", pixels, merged_tokens(grid, s), grid=grid)

    def video(self, clip, frames: int | None = None) -> Media:
        """`frames` caps the frame count (default: the bundle's video_frames)."""
        s = self.settings
        cap = frames or s.video_frames
        if cap < 1:
            raise EdgeLLMError("--frames must be at least 1")
        pictures, fps, total = read_frames(clip, lambda total, fps: sample_indices(total, fps, s, cap))
        size = fitted_size(pictures[0], s, s.video_min_pixels, s.video_max_pixels)
        pixels, grid = patchify(np.stack([resized(p, s, size) for p in pictures]), s)
        sampled_fps = len(pictures) / total * fps
        return Media.of("video", pixels, merged_tokens(grid, s), grid=grid,
                        seconds_per_grid=s.temporal_patch_size / sampled_fps)

    def runs(self, media: Media):
        """One vision-graph run per temporal slice: attention never crosses slices, so each is a graph of its own."""
        assert media.grid is not None  # (this family's media always carry their grid)
        t, h, w = media.grid
        positions = patch_positions(h, w, self.settings.merge_size)
        for i in range(t):
            yield {"pixel_values": media.pixel_values[i * h * w:(i + 1) * h * w], "patch_positions": positions}

    def expand_prompt(self, text: str, items: list) -> str:
        """Each <|image_pad|> / <|video_pad|> of the template becomes as many pads as its embeddings have rows."""
        pads = (self.settings.image_token, self.settings.video_token)
        pattern = re.compile("|".join(re.escape(t) for t in pads if t))
        counts = iter([item.tokens for item in items])  # a placeholder beyond the items stays one token;
        return pattern.sub(lambda m: m.group(0) * next(counts, 1), text)  # Model.prepare reports the mismatch

    def positions(self, length: int, spans: list[np.ndarray], items: list) -> np.ndarray:
        return mrope_positions(length, spans, items, self.settings)
