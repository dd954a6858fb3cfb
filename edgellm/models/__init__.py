"""The model families: one module per text family, one folder per vision-language family, each declaring itself
with `FAMILY` (a modeling.family.TextFamily or VisionLanguageFamily). This registry lists them; adding a family is
adding its module or folder here, and nothing else in edgellm changes."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from functools import cache

from ..errors import EdgeLLMError
from ..modeling.family import TextFamily, VisionLanguageFamily

Family = TextFamily | VisionLanguageFamily


def names() -> list[str]:
    """Every family's name (its module's), without importing any."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


@cache
def get(name: str) -> Family:
    """The family called `name` (a module or folder of this package)."""
    if name not in names():
        raise EdgeLLMError(f"unknown model family {name!r} (this edgellm has: {', '.join(names())}); a bundle made "
                           "by a newer edgellm needs that version")
    family = importlib.import_module(f"{__name__}.{name}").FAMILY
    if not isinstance(family, (TextFamily, VisionLanguageFamily)) or family.name != name:
        raise TypeError(f"{__name__}.{name}.FAMILY must be a TextFamily or VisionLanguageFamily named {name!r}")
    return family


def families() -> list[Family]:
    return [get(name) for name in names()]


def text_family(name: str) -> TextFamily:
    family = get(name)
    if not isinstance(family, TextFamily):
        raise EdgeLLMError(f"{name} is a vision-language family, not a text decoder")
    return family


def vision_family(name: str) -> VisionLanguageFamily:
    family = get(name)
    if not isinstance(family, VisionLanguageFamily):
        raise EdgeLLMError(f"{name} is a text family: it has no image processor")
    return family


def family_for(architecture: str) -> Family:
    """The family that converts checkpoints whose config names `architecture`."""
    for family in families():
        if architecture in family.architectures:
            return family
    known = {a: f for f in families() for a in f.architectures}
    close = difflib.get_close_matches(architecture, list(known), n=1, cutoff=0.5)
    nearest = (f"; the nearest supported is {close[0]} (family {known[close[0]].name}: {known[close[0]].title})"
               if close else "")
    raise EdgeLLMError(f"unknown architecture {architecture!r}{nearest}; `edgellm convert --list` shows every "
                       "family and its architectures")


def family_table() -> str:
    """Every family: name, kind, what its checkpoints call themselves, and where they are read from."""
    rows = [("family", "kind", "architectures (config.json)", "sources")]
    for f in families():
        text = isinstance(f, TextFamily)
        sources = "HF folder (float, GPTQ, AWQ, compressed-tensors)" if text else "HF folder"
        if isinstance(f, TextFamily) and f.layouts:
            sources += f"; remote-code layout: {', '.join(f.layouts)}"
        if isinstance(f, TextFamily) and f.gguf:
            sources += "; GGUF " + ", ".join(f"`{a}`" for a in (f.gguf.architecture, *f.gguf.also))
        rows.append((f.name, "text" if text else "vision-language", ", ".join(f.architectures), sources))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def gguf_family(architecture: str) -> TextFamily:
    """The text family whose GGUF files have `general.architecture` == `architecture`."""
    readable = {a: f for f in families() if isinstance(f, TextFamily) and f.gguf
                for a in (f.gguf.architecture, *f.gguf.also)}
    if architecture not in readable:
        raise EdgeLLMError(f"unknown GGUF architecture {architecture!r}; edgellm reads: {', '.join(readable)}")
    return readable[architecture]
