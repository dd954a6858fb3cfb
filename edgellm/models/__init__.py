"""Model families, one module each. A text family exposes ARCHITECTURES, ModelArgs.from_config and Model.build;
a vision-language family exposes ARCHITECTURES and split(source) -> (text source, vision model, its weights,
runtime settings), and its text decoder is built by the text family its config names."""

from __future__ import annotations

from types import ModuleType

from ..errors import EdgeLLMError
from . import gemma3, gemma3_vl, internvl, llama, qwen2, qwen2_vl, qwen3, qwen3_vl

FAMILIES: list[ModuleType] = [llama, qwen2, qwen3, gemma3, internvl, qwen2_vl, qwen3_vl, gemma3_vl]


def family_for(architecture: str) -> ModuleType:
    for module in FAMILIES:
        if architecture in module.ARCHITECTURES:
            return module
    known = ", ".join(a for m in FAMILIES for a in m.ARCHITECTURES)
    raise EdgeLLMError(f"unknown architecture {architecture!r}; edgellm converts: {known}")
