"""The vision graph's session: images and video frames in, embeddings in the decoder's hidden size out.

Embeddings are cached by the content of the preprocessed pixels, so an image that stays in a conversation is
encoded once, however many turns follow (and the engine's prefix reuse usually skips it altogether).
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError


@dataclass
class Media:
    kind: str  # "image" or "video"
    pixel_values: np.ndarray  # [tiles or frames, 3, H, W], float32
    key: int  # negative: identifies these pixels in the KV cache's position record

    @classmethod
    def of(cls, kind: str, pixel_values: np.ndarray) -> "Media":
        digest = hashlib.sha1(np.ascontiguousarray(pixel_values).tobytes()).digest()
        return cls(kind, pixel_values, -1 - int.from_bytes(digest[:7], "little"))


class VisionEncoder:
    def __init__(self, bundle, options: ort.SessionOptions, providers: list[str], cache_items: int = 16):
        self.settings = bundle.manifest["vision"]
        self.processor = importlib.import_module(f"edgellm.vision.{self.settings['family']}")
        path = bundle.file(bundle.manifest["graphs"]["vision"])
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            raise EdgeLLMError(f"{path}: ONNX Runtime could not load the graph ({e})") from e
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_items = cache_items
        self.encode_s = 0.0  # total time spent in the vision graph (callers take differences)

    def image(self, image) -> Media:
        from ..vision import load_image

        return Media.of("image", self.processor.tiles(load_image(image), self.settings))

    def video(self, video, frames: int | None = None) -> Media:
        from ..vision.video import read_frames

        pictures = read_frames(video, frames or self.settings["video_frames"])
        return Media.of("video", np.concatenate([self.processor.tiles(p, self.settings, max_tiles=1)
                                                 for p in pictures]))

    def embeddings(self, media: Media) -> np.ndarray:
        """[tokens, hidden] for all tiles/frames of `media`, in prompt order."""
        hit = self.cache.get(media.key)
        if hit is not None:
            self.cache.move_to_end(media.key)
            return hit
        started = time.perf_counter()
        out = self.session.run(None, {"pixel_values": media.pixel_values})[0]
        self.encode_s += time.perf_counter() - started
        rows = out.reshape(-1, out.shape[-1])
        self.cache[media.key] = rows
        while len(self.cache) > self.cache_items:
            self.cache.popitem(last=False)
        return rows
