"""Writing a bundle folder atomically: everything goes to a hidden staging folder that is renamed at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import EdgeLLMError

FORMAT = "edgellm-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output(out: Path, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise EdgeLLMError(f"{out} already exists; choose another output folder or pass --force to replace it")


@contextmanager
def staging_folder(out: Path, overwrite: bool):
    """Yields an empty folder beside `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{int(time.time())}"
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> None:
    """Records size and SHA-256 of every file so that loading can tell a corrupt or truncated bundle."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST and path.is_file():
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
