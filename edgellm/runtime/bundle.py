"""Opening a bundle folder: the manifest, and a check that every file is whole and unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..convert.bundle import FORMAT, MANIFEST, READABLE_VERSIONS, file_checksums
from ..errors import EdgeLLMError


@dataclass
class Bundle:
    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        return self.path / name

    def json(self, name: str) -> dict:
        path = self.file(name)
        return json.loads(path.read_text()) if path.is_file() else {}

    def verify_hashes(self) -> None:
        """Every file's CRC-32 against the manifest (SHA-256 for bundles written before it recorded CRC-32);
        sizes were checked when the bundle was opened."""
        for name, info in self.manifest["files"].items():
            kind = "crc32" if "crc32" in info else "sha256"
            if file_checksums(self.path / name, (kind,))[kind] != info[kind]:
                raise EdgeLLMError(f"{self.path / name}: {kind.upper()} checksum does not match the manifest "
                                   "(corrupt file); reconvert the model")

    @property
    def seq_length(self) -> int:
        return int(self.manifest["seq_length"])

    @property
    def chunk_length(self) -> int:
        return int(self.manifest["chunk_length"])


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Checks the manifest and file sizes; with verify, also every file's checksum (see Bundle.verify_hashes)."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeLLMError(f"{path}: no such bundle folder (make one with `edgellm convert -m MODEL -o {path}`)")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise EdgeLLMError(f"{path}: not an edgellm bundle (no {MANIFEST})") from None
    except ValueError as e:
        raise EdgeLLMError(f"{manifest_path}: corrupt manifest ({e}); reconvert the model") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise EdgeLLMError(f"{path}: bundle format {manifest.get('format')!r} v{manifest.get('format_version')} is "
                           f"not {FORMAT} v{'/'.join(map(str, READABLE_VERSIONS))}; reconvert the model with this "
                           "edgellm")
    for name, info in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise EdgeLLMError(f"{path}: bundle file {name} is missing; reconvert the model")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise EdgeLLMError(f"{file}: {size} bytes where the manifest records {info['bytes']} "
                               "(truncated or replaced); reconvert the model")
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify_hashes()
    return bundle
