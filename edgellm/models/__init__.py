"""Model families, one module each. A module exposes ARCHITECTURES, ModelArgs.from_config and Model.build."""

from __future__ import annotations

from types import ModuleType

from ..errors import EdgeLLMError
from . import llama, qwen2, qwen3

FAMILIES: list[ModuleType] = [llama, qwen2, qwen3]


def family_for(architecture: str) -> ModuleType:
    for module in FAMILIES:
        if architecture in module.ARCHITECTURES:
            return module
    known = ", ".join(a for m in FAMILIES for a in m.ARCHITECTURES)
    raise EdgeLLMError(f"unknown architecture {architecture!r}; edgellm converts: {known}")
