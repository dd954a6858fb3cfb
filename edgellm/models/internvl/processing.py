"""InternVL tiling: the image is resized onto the grid of 448px tiles whose aspect ratio is closest to its own
(at most max_patches tiles), cut into tiles, and followed by a thumbnail of the whole image when there is more
than one tile. The rules are those of transformers' GotOcr2 image processor, which InternVL uses."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ...vision import processor
from ...vision.images import load_image, normalize
from ...vision.media import Media
from ...vision.video import read_frames, segment_midpoints


@dataclass(kw_only=True)
class Settings(processor.MediaTokens):
    tile_size: int
    tokens_per_tile: int
    crop_to_patches: bool
    min_patches: int
    max_patches: int
    resample: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    video_frames: int


@lru_cache(maxsize=16)
def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) arrangements with min..max tiles, fewest tiles first."""
    sides = range(1, max_tiles + 1)
    grids = [(c, r) for c in sides for r in sides if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie, the larger grid, as long as the image has
    more than half the pixels of that grid."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in tile_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def tiles(image, s: Settings, max_tiles: int | None = None) -> np.ndarray:
    """RGB PIL image -> float32 [n_tiles, 3, tile, tile] with the bundle's vision settings `s`.
    max_tiles overrides the checkpoint's max_patches (video frames use 1)."""
    size, resample = s.tile_size, s.resample
    max_tiles = s.max_patches if max_tiles is None else max_tiles
    if s.crop_to_patches and max_tiles > 1:
        cols, rows = best_grid(image.width, image.height, size, s.min_patches, max_tiles)
        canvas = image.resize((size * cols, size * rows), resample)
        parts = [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                 for r in range(rows) for c in range(cols)]
        if len(parts) > 1:
            parts.append(image.resize((size, size), resample))
    else:
        parts = [image.resize((size, size), resample)]
    return np.stack([normalize(p, s.rescale_factor, s.image_mean, s.image_std) for p in parts])


class Processor(processor.Processor):
    Settings = Settings

    def image(self, picture) -> Media:
        pixels = tiles(load_image(picture), self.settings)
        return Media.of("image", pixels, pixels.shape[0] * self.settings.tokens_per_tile)

    def video(self, clip, frames: int | None = None) -> Media:
        """`frames` pictures (default: the bundle's video_frames) at segment midpoints, one tile each."""
        s = self.settings
        pictures, _, _ = read_frames(clip, lambda total, fps: segment_midpoints(total, frames or s.video_frames))
        pixels = np.concatenate([tiles(p, s, max_tiles=1) for p in pictures])
        return Media.of("video", pixels, pixels.shape[0] * s.tokens_per_tile)

    def runs(self, media: Media):
        """All tiles (or frames) of one image in one run."""
        yield {"pixel_values": media.pixel_values}

    def expand_prompt(self, text: str, items: list) -> str:
        """An image becomes <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>; a video becomes one such
        block per frame, each introduced by "Frame{i}: "."""
        s = self.settings
        pattern = re.compile(f"({re.escape(s.image_token)}|{re.escape(s.video_token)})")
        pieces, found = [], 0
        per_tile = s.image_start + "{}" + s.image_end

        def block(n_tiles: int) -> str:
            return per_tile.format(s.image_token * (s.tokens_per_tile * n_tiles))

        last = 0
        for m in pattern.finditer(text):
            pieces.append(text[last:m.start()])
            last = m.end()
            item = items[found] if found < len(items) else None
            found += 1
            if item is None:
                continue
            if item.kind == "image":
                pieces.append(block(item.pixel_values.shape[0]))
            else:
                pieces.append("\n".join(f"Frame{i + 1}: {block(1)}" for i in range(item.pixel_values.shape[0])))
        pieces.append(text[last:])
        return "".join(pieces)
