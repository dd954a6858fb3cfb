"""The vision graph's session: images and video frames in, embeddings in the decoder's hidden size out.

Embeddings are cached by the content of the preprocessed pixels, so an image that stays in a conversation is
encoded once, however many turns follow (and the engine's prefix reuse usually skips it altogether).
"""

from __future__ import annotations

import importlib
import time
from collections import OrderedDict

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..vision.media import Media


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
        return self.processor.image(image, self.settings)

    def video(self, video, frames: int | None = None) -> Media:
        return self.processor.video(video, self.settings, frames)

    def embeddings(self, media: Media) -> np.ndarray:
        """[tokens, hidden] for all tiles/frames of `media`, in prompt order."""
        hit = self.cache.get(media.key)
        if hit is not None:
            self.cache.move_to_end(media.key)
            return hit
        started = time.perf_counter()
        rows = np.concatenate([self._rows(self.session.run(None, feed))
                               for feed in self.processor.runs(media, self.settings)])
        self.encode_s += time.perf_counter() - started
        self.cache[media.key] = rows
        while len(self.cache) > self.cache_items:
            self.cache.popitem(last=False)
        return rows

    @staticmethod
    def _rows(outputs: list[np.ndarray]) -> np.ndarray:
        """[tokens, hidden] from image_embeds; a DeepStack graph's deepstack_embeds [K, tokens, hidden] follow on
        each row, as [tokens, (1 + K) * hidden]."""
        rows = outputs[0].reshape(-1, outputs[0].shape[-1])
        if len(outputs) == 1:
            return rows
        deep = outputs[1]
        return np.concatenate([rows, deep.transpose(1, 0, 2).reshape(len(rows), -1)], axis=1)
