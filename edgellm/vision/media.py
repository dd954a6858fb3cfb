"""One image or video, preprocessed and ready for the vision graph."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Media:
    kind: str  # "image" or "video"
    pixel_values: np.ndarray  # float32, laid out as the family's vision graph takes it
    tokens: int  # prompt positions its embeddings fill
    key: int  # negative: identifies these pixels in the KV cache's position record
    grid: tuple[int, int, int] | None = None  # (t, h, w) in patches, for families with dynamic resolution
    seconds_per_grid: float | None = None  # video: seconds covered by one temporal patch
    timestamps: tuple[float, ...] | None = None  # video: the time of each temporal patch (for prompts that write it)

    @classmethod
    def of(cls, kind: str, pixel_values: np.ndarray, tokens: int, **extra) -> Media:
        digest = hashlib.sha1(np.ascontiguousarray(pixel_values).tobytes())
        digest.update(repr(sorted(extra.items())).encode())
        return cls(kind, pixel_values, tokens, -1 - int.from_bytes(digest.digest()[:7], "little"), **extra)
