"""The vision graph's session: images and video frames in, per-token features in the decoder's hidden size out.

The family's processor (from the registry, by the manifest's vision family) prepares images and prompts. The graph
outputs `image_embeds` (rows in prompt order, [..., hidden]) and may output more per-token features
[K, tokens, hidden], which are handed to the family's decoder extension. Features are cached by the content of the
preprocessed pixels, so an image that stays in a conversation is encoded once, however many turns follow (and the
engine's prefix reuse usually skips it altogether); with keep_on_disk, also in a folder, across restarts.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..format import VISION_GRAPH, Bundle
from ..models import vision_family
from ..vision.media import Media
from ..vision.processor import Processor
from .sessions import PROVIDERS, default_threads, open_graph, session_options


def processor_for(bundle: Bundle) -> Processor:
    section = bundle.manifest.vision
    if section is None:
        raise EdgeLLMError(f"{bundle.path}: the bundle has no vision graph; convert a vision-language model")
    return vision_family(section.family).processor(section.settings)


class FeatureGraph(Protocol):
    """The vision graph as the encoder runs it, on ONNX Runtime or OpenVINO."""

    outputs: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class _OrtGraph:
    """An ONNX Runtime session with OpenVINO's CompiledGraph interface: run(feed) -> {output name: array}."""

    def __init__(self, bundle: Bundle, name: str, options: ort.SessionOptions, providers: list[str]):
        self.session = open_graph(bundle, name, options, providers)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feed)))


class VisionEncoder:
    def __init__(self, bundle: Bundle, processor: Processor, device: str, threads: int | None, spinning: bool,
                 cache_items: int = 16):
        self.processor = processor
        self.settings = processor.settings
        path = bundle.file(bundle.manifest.graphs[VISION_GRAPH])
        self.graph: FeatureGraph
        if device == "openvino":  # the whole tower: many rows per matmul, where OpenVINO's bf16 GEMMs gain
            from .openvino import CompiledGraph

            self.graph = CompiledGraph(path, threads or default_threads())
        else:
            self.graph = _OrtGraph(bundle, path.name, session_options(threads, spinning), PROVIDERS[device])
        self.outputs = self.graph.outputs
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.cache_items = cache_items
        self.encode_s = 0.0  # total time spent in the vision graph (callers take differences)
        self.folder: Path | None = None
        self.identity = ""

    def keep_on_disk(self, folder, identity: str) -> None:
        """Also keep features in `folder` (`<key>.features.npz`, each recording `identity`, the bundle's: a file of
        another bundle, or a damaged one, is computed again and replaced)."""
        self.folder, self.identity = Path(folder), identity
        self.folder.mkdir(parents=True, exist_ok=True)

    def _read(self, folder: Path, key: int) -> dict[str, np.ndarray] | None:
        path = folder / f"{-key:x}.features.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["bundle"]) != self.identity:
                    return None
                found = {name: f[name] for name in self.outputs}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return found

    def _write(self, folder: Path, key: int, found: dict[str, np.ndarray]) -> None:
        path = folder / f"{-key:x}.features.npz"
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                np.savez(f, **{"bundle": np.str_(self.identity), **found})
            os.replace(partial, path)
        except OSError:  # a full disk costs the next process an encoding, not this answer
            partial.unlink(missing_ok=True)

    def image(self, image) -> Media:
        return self.processor.image(image)

    def video(self, video, frames: int | None = None) -> Media:
        return self.processor.video(video, frames)

    def features(self, media: Media) -> dict[str, np.ndarray]:
        """{output: [tokens, ...]} for all tiles/frames of `media`, in prompt order: image_embeds [tokens, hidden],
        any other output [tokens, K, hidden]."""
        hit = self.cache.get(media.key)
        if hit is None and self.folder is not None:
            hit = self._read(self.folder, media.key)
            if hit is not None:
                self.cache[media.key] = hit
        if hit is not None:
            self.cache.move_to_end(media.key)
            return hit
        started = time.perf_counter()
        runs = [self.graph.run(feed) for feed in self.processor.runs(media)]
        found = {}
        for name in self.outputs:
            values = [run[name] for run in runs]
            found[name] = (np.concatenate([v.reshape(-1, v.shape[-1]) for v in values]) if name == "image_embeds"
                           else np.concatenate([v.transpose(1, 0, 2) for v in values]))
        self.encode_s += time.perf_counter() - started
        if self.folder is not None:
            self._write(self.folder, media.key, found)
        self.cache[media.key] = found
        while len(self.cache) > self.cache_items:
            self.cache.popitem(last=False)
        return found
