"""edgellm: compile Hugging Face and GGUF language models into compact ONNX bundles and run them on the edge."""

from __future__ import annotations

__version__ = "0.1.0"

from . import convert as _converter_package  # noqa: E402,F401  (bound first, so that the function below wins)
from .errors import EdgeLLMError  # noqa: E402


def load(path, device: str = "cpu", threads: int | None = None, verify: bool = True, **options):
    """Open a bundle folder made by `edgellm convert`; returns a runtime.model.Model (options: spinning,
    profile_prefix, check_memory=False to load a bundle larger than the free memory)."""
    from .runtime.model import Model

    return Model(path, device=device, threads=threads, verify=verify, **options)


def convert(source, out, *args, **options):
    """Convert a Hugging Face folder or a GGUF file into a bundle folder; see edgellm.convert.pipeline.convert for
    the options. The converter (onnx, gguf) is imported here, on first use: running a bundle never pays for it."""
    from .convert.pipeline import convert as run

    return run(source, out, *args, **options)


__all__ = ["load", "convert", "EdgeLLMError", "__version__"]
