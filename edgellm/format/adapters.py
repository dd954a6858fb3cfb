"""PEFT LoRA adapters (a folder of adapter_config.json and adapter_model.safetensors), read the same way by the
converter (`--lora`: merged into the weights) and the runtime (`load_adapter`: into a bundle's LoRA slots).

Each adapted module m holds A [r, in] and B [out, r]; its output gains scale * x A^T B^T, scale = lora_alpha / r
(or / sqrt(r) with rsLoRA), r and alpha per module from rank_pattern / alpha_pattern where given.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError

_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (small) safetensors file, as float32."""
    try:
        raw = path.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + size])
    except (OSError, struct.error, ValueError) as e:
        raise EdgeLLMError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        if info.get("dtype") not in _DTYPES:
            raise EdgeLLMError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        data = np.frombuffer(raw, _DTYPES[info["dtype"]], (end - start) // np.dtype(_DTYPES[info["dtype"]]).itemsize,
                             8 + size + start).reshape(info["shape"])
        tensors[name] = (data.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else \
            data.astype(np.float32)
    return tensors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that names the module (its end)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


@dataclass
class Adapter:
    folder: Path
    modules: dict  # module name (model.layers.0.self_attn.q_proj) -> (A [r, in], B [out, r], scale)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def read_adapter(folder: str | Path) -> Adapter:
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise EdgeLLMError(f"{folder}: no adapter_config.json; a LoRA adapter is a PEFT adapter folder")
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgeLLMError(f"{folder}/adapter_config.json: not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise EdgeLLMError(f"{folder}: a {cfg.get('peft_type')} adapter; edgellm takes LoRA adapters")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights")):
        if cfg.get(key):
            raise EdgeLLMError(f"{folder}: {why} adapters are not supported; merge it with PEFT (merge_and_unload) "
                               "and convert the merged model")
    files = sorted(folder.glob("adapter_model*.safetensors"))
    if not files:
        raise EdgeLLMError(f"{folder}: no adapter_model.safetensors (PyTorch .bin adapters are not read)")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for file in files:
        for key, value in _safetensors(file).items():
            m = _KEY.match(key)
            if not m:
                raise EdgeLLMError(f"{folder}: adapter tensor {key} is not a LoRA A or B matrix (trained embeddings, "
                                   "modules_to_save and DoRA magnitudes are not supported)")
            parts.setdefault(m.group(1), {})[m.group(2)] = value
    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise EdgeLLMError(f"{folder}: {module} has lora_{''.join(ab)} without its other half")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise EdgeLLMError(f"{folder}: {module}'s A {a.shape} and B {b.shape} are not a LoRA pair")
        rank = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", a.shape[0]))
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank))
        modules[module] = (a, b, float(alpha / (np.sqrt(rank) if cfg.get("use_rslora") else rank)))
    return Adapter(folder, modules)
