"""Writing a bundle folder atomically: everything goes to a hidden staging folder that is renamed at the end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

from ..errors import EdgeLLMError

FORMAT = "edgellm-bundle"
FORMAT_VERSION = 2  # 2: the embedding table may be a tied lm_head's blocks inside the graph's data file
READABLE_VERSIONS = (1, FORMAT_VERSION)  # what the runtime opens: 1 differs only in always writing its own table
MANIFEST = "manifest.json"


def file_checksums(path: Path, kinds=("sha256", "crc32"), chunk: int = 1 << 22) -> dict:
    """A file's SHA-256 (its identity) and CRC-32 (what loading checks: 7x faster here, and made to catch
    accidental damage). hashlib and zlib release the GIL, so loading checks the files beside building the session."""
    sha, crc = hashlib.sha256() if "sha256" in kinds else None, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if sha:
                sha.update(block)
            if "crc32" in kinds:
                crc = zlib.crc32(block, crc)
    sums = {}
    if sha:
        sums["sha256"] = sha.hexdigest()
    if "crc32" in kinds:
        sums["crc32"] = f"{crc:08x}"
    return sums


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
    """Records size and checksums of every file so that loading can tell a corrupt or truncated bundle."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST and path.is_file():
            files[path.name] = {"bytes": path.stat().st_size, **file_checksums(path)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
