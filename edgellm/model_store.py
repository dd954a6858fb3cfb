"""Models as users name them: a bundle folder runs as it is; a Hugging Face folder, a .gguf file or a Hugging Face
id (hub.py) is converted once into the cache of bundles and run from there.

The cache (`$EDGELLM_CACHE`, else `$XDG_CACHE_HOME/edgellm`, else `~/.cache/edgellm`) holds one bundle folder per
source and options under `bundles/`, each beside a `NAME.json` record of where it came from. A bundle's name ends in
a key computed from the source's content and the conversion options, so a changed file or other options make a new
bundle, never a stale answer. For a file, "content" is its size and three 1 MiB samples (start, middle, end): a full
hash of a multi-gigabyte checkpoint would cost seconds at every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EdgeLLMError
from .format import MANIFEST, open_bundle

SAMPLE = 1 << 20  # bytes per sample of a file's content fingerprint


def cache_dir() -> Path:
    base = os.environ.get("EDGELLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgellm"
    return Path(base)


def bundles_dir() -> Path:
    return cache_dir() / "bundles"


@dataclass
class CachedBundle:
    """The record beside a cached bundle."""

    name: str
    source: str  # what the user named: a path or a Hugging Face id
    options: dict  # the conversion options that differ from the defaults
    created: float
    used: float
    key: str = ""  # of the source's content and the options

    @property
    def path(self) -> Path:
        return bundles_dir() / self.name

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def is_checkpoint(path: Path) -> bool:
    """A source the converter reads: a Hugging Face folder or a .gguf file."""
    return (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and path.suffix.lower() == ".gguf")


def resolve(spec: str | os.PathLike, progress: bool = True, **options) -> Path:
    """The bundle folder for `spec`: a bundle as it is, anything else converted once into the cache (`options`:
    edgellm.convert's, default w4) and taken from there after."""
    path = Path(os.path.expanduser(os.fspath(spec)))
    if is_bundle(path):
        return path
    if is_checkpoint(path):
        return cached(path, str(path.resolve()), progress, options)
    if path.exists():
        raise EdgeLLMError(f"{spec}: not an edgellm bundle (no {MANIFEST}), a Hugging Face model folder (no "
                           "config.json) or a .gguf file")
    from .hub import fetch, parse_hub_id

    hub_id = parse_hub_id(os.fspath(spec))
    if hub_id is None:
        raise EdgeLLMError(f"{spec}: no such bundle folder, Hugging Face folder or .gguf file (a model is one of "
                           "those, or a Hugging Face id such as org/name or org/name:Q4_K_M; `edgellm convert -m "
                           "MODEL -o BUNDLE` makes a bundle)")
    if progress:
        print(f"resolving {hub_id} through the Hugging Face cache ...", file=sys.stderr)
    try:
        checkpoint = fetch(hub_id)
    except EdgeLLMError as e:
        raise EdgeLLMError(f"{spec}: no such bundle folder, Hugging Face folder or .gguf file here; as a Hugging "
                           f"Face id: {e}") from None
    return cached(checkpoint, str(hub_id), progress, options)


def served_models(specs: list[str]) -> list[tuple[str, str]]:
    """(name, spec) of each model `serve` was given: a folder that is neither a bundle nor a Hugging Face folder
    stands for the bundles, Hugging Face folders and .gguf files inside it. Names: a folder's or file's name (a
    .gguf without its suffix), a Hugging Face id as written."""
    found = []
    for spec in specs:
        path = Path(os.path.expanduser(spec))
        if path.is_dir() and not is_bundle(path) and not is_checkpoint(path):
            inside = [p for p in sorted(path.iterdir()) if is_bundle(p) or is_checkpoint(p)]
            if not inside:
                raise EdgeLLMError(f"{spec}: holds no bundle, Hugging Face folder or .gguf file to serve")
            found += [(_name_of(p), str(p)) for p in inside]
        else:
            found.append((_name_of(path) if path.exists() else spec, spec))
    return found


def _name_of(path: Path) -> str:
    return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name


def fingerprint(path: Path) -> str:
    """A key of the source's content: per file (a folder's checkpoint files, or the one GGUF), its name, size and
    three samples."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name if file == path else file.relative_to(path)}\0{size}\0".encode())
        with open(file, "rb") as f:
            for at in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
                f.seek(at)
                digest.update(f.read(SAMPLE))
    return digest.hexdigest()


def _slug(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    name = name[:-5] if name.lower().endswith(".gguf") else name
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name.lower())[:64] or "model"


def cached(source: Path, label: str, progress: bool, options: dict, name: str | None = None) -> Path:
    """The cached bundle of `source` with `options`, converted first when missing or damaged. `name`: a fixed
    folder name (the demo's), reconverted when the source or options change; by default one made of them."""
    from ._version import __version__

    key = hashlib.sha256(json.dumps({"source": fingerprint(source), "options": options}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    if name is None:  # the same source and options under another name (the demo's) will do
        same = [r for r in cached_bundles() if r.key == key]
        name = same[0].name if same else f"{_slug(label)}-{options.get('quantize', 'w4')}-{key}"
    folder = bundles_dir() / name
    record_path = bundles_dir() / f"{name}.json"
    try:
        open_bundle(folder, verify=False)
        record = _read_record(record_path)
        if record is None or record.key != key:
            raise EdgeLLMError("made from another source or options")
        record.used = time.time()
        _write_record(record_path, record)
        if progress:
            print(f"using {folder} (converted from {label}; `edgellm rm {name}` removes it)", file=sys.stderr)
        return folder
    except EdgeLLMError:
        pass
    from .convert.options import ConvertOptions
    from .convert.pipeline import convert

    if progress:
        print(f"converting {label} into {folder} (once; edgellm {__version__}) ...", file=sys.stderr)
    bundles_dir().mkdir(parents=True, exist_ok=True)
    convert(source, folder, ConvertOptions(**{**options, "force": True, "progress": progress}))
    now = time.time()
    _write_record(record_path, CachedBundle(name, label, options, now, now, key))
    return folder


def _read_record(path: Path) -> CachedBundle | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CachedBundle(**{k: data[k] for k in ("name", "source", "options", "created", "used")},
                            key=str(data.get("key", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(path: Path, record: CachedBundle) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
    os.replace(partial, path)


def cached_bundles() -> list[CachedBundle]:
    """Every bundle in the cache, most recently used first (a folder without its record is listed as found)."""
    found = []
    root = bundles_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not is_bundle(folder):
            continue
        record = _read_record(root / f"{folder.name}.json")
        if record is None:
            mtime = folder.stat().st_mtime
            record = CachedBundle(folder.name, "(unknown)", {}, mtime, mtime)
        found.append(record)
    return sorted(found, key=lambda r: -r.used)


def remove(name: str) -> list[CachedBundle]:
    """Remove the cached bundles whose name or source is `name`; returns them (an error when none is)."""
    matches = [r for r in cached_bundles() if name in (r.name, r.source)]
    if not matches:
        known = ", ".join(r.name for r in cached_bundles()) or "none"
        raise EdgeLLMError(f"{name}: no cached bundle has that name or source (cached: {known}); `edgellm list` "
                           "shows them")
    for record in matches:
        shutil.rmtree(record.path, ignore_errors=True)
        (bundles_dir() / f"{record.name}.json").unlink(missing_ok=True)
    return matches


def table(records: list[CachedBundle]) -> str:
    rows = [("NAME", "SIZE", "USED", "SOURCE")]
    for r in records:
        rows.append((r.name, f"{r.size() / (1 << 20):,.0f} MiB", time.strftime("%Y-%m-%d %H:%M",
                                                                              time.localtime(r.used)), r.source))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
