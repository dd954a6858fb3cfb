"""A PEFT LoRA adapter merged into the checkpoint at conversion (`edgellm convert --lora ADAPTER`): every adapted
projection is read as W + scale * B @ A (format.adapters), before the bundle's precision rounds it, once. The
adapter is read under the checkpoint's own names, so a remote-code layout (ChatGLM's fused query_key_value) is
merged before it is cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import ModelSource, WrappedSource
from ..errors import EdgeLLMError
from ..format.adapters import read_adapter
from .quantize import QuantizedWeight


class LoRASource(WrappedSource):
    """`source` with the adapter in `folder` merged into the projections it adapts."""

    def __init__(self, source: ModelSource, folder: str | Path):
        self.source, self.config = source, source.config
        adapter = read_adapter(folder)
        self.folder, own = adapter.folder, set(source.names())
        self.deltas = {f"{module}.weight": pair for module, pair in adapter.modules.items()}
        for name in self.deltas:
            if name not in own:
                raise EdgeLLMError(f"{self.folder}: the adapter changes {name[:-len('.weight')]}, which this "
                                   "checkpoint does not have: an adapter of another model")
        self.adapter = {"path": str(self.folder), "rank": adapter.rank, "modules": len(self.deltas)}

    def names(self) -> list[str]:
        return self.source.names()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def _delta(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a, b, scale = self.deltas[name]
        if (b.shape[0], a.shape[1]) != tuple(shape):
            raise EdgeLLMError(f"{self.folder}: the adapter's {name} is {b.shape[0]}x{a.shape[1]} (rank "
                               f"{a.shape[0]}), the checkpoint's {shape[0]}x{shape[1]}: an adapter of another model")
        return (scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)

    def raw(self, name: str) -> np.ndarray:
        return self.tensor(name) if name in self.deltas else self.source.raw(name)

    def tensor(self, name: str) -> np.ndarray:
        w = self.source.tensor(name)
        return w + self._delta(name, w.shape) if name in self.deltas else w

    def linear(self, name: str):
        if name not in self.deltas:
            return self.source.linear(name)
        w = self.source.linear(name)
        if isinstance(w, QuantizedWeight):
            raise EdgeLLMError(f"{self.folder}: the adapter changes {name}, which the checkpoint holds quantized; "
                               "merge adapters into a float checkpoint")
        return w + self._delta(name, w.shape)
