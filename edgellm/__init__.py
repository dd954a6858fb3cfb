"""edgellm: compile Hugging Face and GGUF language models into compact ONNX bundles and run them on the edge."""

from __future__ import annotations

__version__ = "0.1.0"

from .convert.pipeline import convert  # noqa: E402
from .errors import EdgeLLMError  # noqa: E402


def load(path, device: str = "cpu", threads: int | None = None, verify: bool = True, **options):
    """Open a bundle folder made by `edgellm convert`; returns a runtime.model.Model (options: spinning,
    profile_prefix)."""
    from .runtime.model import Model

    return Model(path, device=device, threads=threads, verify=verify, **options)


__all__ = ["load", "convert", "EdgeLLMError", "__version__"]
