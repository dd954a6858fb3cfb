"""LoRA slots (convert --lora-slots): the adapters loaded by name, and the arrays each slot's graph inputs take."""

from __future__ import annotations

import numpy as np

from ..errors import EdgeLLMError


class LoraSlots:
    """The bundle's LoRA branches (`spec`: the manifest's slots, rank and the shape of each adapted projection) and
    the adapters loaded into them: {name: {graph input: its array for one sequence}}."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.adapters: dict[str, dict[str, np.ndarray]] = {}

    def add(self, name: str, modules: dict) -> None:
        """Make an adapter (format.adapters' modules: A, B and scale per projection) loadable by name; one clear
        error for one the slots cannot hold."""
        spec = self.spec
        if name not in self.adapters and len(self.adapters) >= spec["slots"]:
            raise EdgeLLMError(f"the bundle's {spec['slots']} LoRA slot(s) are full; convert with more --lora-slots")
        rank, arrays = spec["rank"], {}
        for module, (a, b, scale) in modules.items():
            if module not in spec["shapes"]:
                covered = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in spec["shapes"]}))
                raise EdgeLLMError(f"the adapter changes {module}, which the bundle's LoRA slots do not cover (they "
                                   f"cover {covered})")
            k, n = spec["shapes"][module]
            if (b.shape[0], a.shape[1]) != (n, k):
                raise EdgeLLMError(f"the adapter's {module} is {b.shape[0]}x{a.shape[1]}, the bundle's {n}x{k}: an "
                                   "adapter of another model")
            if a.shape[0] > rank:
                raise EdgeLLMError(f"the adapter's rank {a.shape[0]} is more than the bundle's LoRA slots hold "
                                   f"({rank}); convert with a larger --lora-max-rank")
            pad = rank - a.shape[0]
            arrays[f"lora_a.{module}"] = np.pad(a.T, ((0, 0), (0, pad))).astype(np.float32)
            arrays[f"lora_b.{module}"] = np.pad((b * scale).T, ((0, pad), (0, 0))).astype(np.float32)
        self.adapters[name] = arrays

    def array(self, adapter: str | None, name: str) -> np.ndarray:
        """An adapter's A [in, rank] or B [rank, out] for the graph input `name` (zeros where it adapts nothing)."""
        if adapter is not None and name in self.adapters[adapter]:
            return self.adapters[adapter][name]
        k, n = self.spec["shapes"][name.split(".", 1)[1]]
        rank = self.spec["rank"]
        return np.zeros((k, rank) if name.startswith("lora_a.") else (rank, n), np.float32)
