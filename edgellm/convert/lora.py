"""A PEFT LoRA adapter merged into the checkpoint at conversion (`edgellm convert --lora ADAPTER`): every adapted
projection is read as W + scale * B @ A (scale = lora_alpha / r, or / sqrt(r) with rsLoRA; per-module ranks and
alphas from rank_pattern / alpha_pattern), before the bundle's precision rounds it, once. The adapter is read under
the checkpoint's own names, so a remote-code layout (ChatGLM's fused query_key_value) is merged before it is cut.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .hf import SafetensorsFile, read_json
from .quantize import QuantizedWeight
from .source import ModelSource, WrappedSource

_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that names the module (its end)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


class LoRASource(WrappedSource):
    """`source` with the adapter in `folder` merged into the projections it adapts."""

    def __init__(self, source: ModelSource, folder: str | Path):
        folder = Path(folder)
        self.source, self.config, self.folder = source, source.config, folder
        if not (folder / "adapter_config.json").is_file():
            raise EdgeLLMError(f"{folder}: no adapter_config.json; --lora takes a PEFT LoRA adapter folder")
        cfg = read_json(folder / "adapter_config.json")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise EdgeLLMError(f"{folder}: a {cfg.get('peft_type')} adapter; edgellm merges LoRA adapters")
        for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights")):
            if cfg.get(key):
                raise EdgeLLMError(f"{folder}: {why} adapters are not supported; merge it with PEFT "
                                   "(merge_and_unload) and convert the merged model")
        files = sorted(folder.glob("adapter_model*.safetensors"))
        if not files:
            raise EdgeLLMError(f"{folder}: no adapter_model.safetensors (PyTorch .bin adapters are not read)")
        parts: dict[str, dict[str, tuple[SafetensorsFile, str]]] = {}
        for file in map(SafetensorsFile, files):
            for key in file.names():
                m = _KEY.match(key)
                if not m:
                    raise EdgeLLMError(f"{folder}: adapter tensor {key} is not a LoRA A or B matrix (trained "
                                       "embeddings, modules_to_save and DoRA magnitudes are not supported)")
                parts.setdefault(m.group(1), {})[m.group(2)] = (file, key)
        own = set(source.names())
        self.deltas: dict[str, tuple] = {}
        for module, ab in parts.items():
            name = f"{module}.weight"
            if set(ab) != {"A", "B"}:
                raise EdgeLLMError(f"{folder}: {module} has lora_{''.join(ab)} without its other half")
            if name not in own:
                raise EdgeLLMError(f"{folder}: the adapter changes {module}, which this checkpoint does not have: "
                                   "an adapter of another model")
            rank = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank))
            scale = alpha / (np.sqrt(rank) if cfg.get("use_rslora") else rank)
            self.deltas[name] = (ab["A"], ab["B"], float(scale))
        self.adapter = {"path": str(folder), "rank": cfg.get("r"), "modules": len(self.deltas)}

    def names(self) -> list[str]:
        return self.source.names()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def _delta(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        (fa, ka), (fb, kb), scale = self.deltas[name]
        a, b = fa.get(ka).astype(np.float64), fb.get(kb).astype(np.float64)
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(shape) or b.shape[1] != a.shape[0]:
            raise EdgeLLMError(f"{self.folder}: the adapter's {name} is {b.shape[0]}x{a.shape[1]} (rank "
                               f"{a.shape[0]}), the checkpoint's {shape[0]}x{shape[1]}: an adapter of another model")
        return (scale * (b @ a)).astype(np.float32)

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
