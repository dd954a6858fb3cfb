"""A bundle folder on disk: written atomically (a hidden staging folder renamed at the end), with the size and
checksums of every file in its manifest; opened with those checked, so a damaged or swapped file is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError
from . import encryption
from .manifest import MANIFEST, FileEntry, Manifest


def file_checksums(path: Path, kinds=("sha256", "crc32"), chunk: int = 1 << 22) -> dict:
    """A file's SHA-256 (its identity) and CRC-32 (what loading checks: several times faster, and made to catch
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
        raise EdgeLLMError(f"{out} already exists; choose another output folder, or replace it (--force; force=True in "
                           "Python)")


@contextmanager
def staging_folder(out: Path, overwrite: bool):
    """Yields an empty folder beside `out`; on success it replaces `out`, on any failure it is removed (an OSError,
    such as a full disk, becomes one EdgeLLMError). Folders that a killed conversion left are removed first."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
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
    except OSError as e:  # a full disk, a file too large for the file system, a folder without write permission
        shutil.rmtree(stage, ignore_errors=True)
        raise EdgeLLMError(f"writing {out} failed: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
                           + "; nothing was written") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def remove_abandoned(out: Path) -> None:
    """Staging (and replaced) folders of `out` left by a conversion that was killed: their process is gone."""
    for kind in ("partial", "old"):  # .NAME.partial-PID-TIME, .NAME.old-PID
        prefix = f".{out.name}.{kind}-"
        for leftover in out.parent.glob(prefix + "*"):
            if not _alive(leftover.name[len(prefix):].split("-")[0]):
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # not ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Records size and checksums of every file so that loading can tell a corrupt or truncated bundle."""
    manifest.files = {}
    for path in sorted(folder.iterdir()):
        if path.name != MANIFEST and path.is_file():
            manifest.files[path.name] = FileEntry(path.stat().st_size, **file_checksums(path))
    (folder / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    key: bytes | None = field(default=None, repr=False)  # an encrypted bundle's key, once unlock() derived it
    _plain: dict = field(default_factory=dict, repr=False)  # decrypted files, read once, shared by their readers

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def encrypted(self) -> bool:
        return self.manifest.encryption is not None

    def unlock(self, material: bytes) -> None:
        """Derive an encrypted bundle's key from the user's key material; a wrong one is refused here."""
        e = self.manifest.encryption
        assert e is not None, "unlock() is for encrypted bundles"
        key = encryption.derive_key(material, bytes.fromhex(e["salt"]), e["kdf"])
        if encryption.key_check(key) != e["check"]:
            raise EdgeLLMError(f"{self.path}: wrong key for this encrypted bundle")
        self.key = key

    def is_encrypted(self, name: str) -> bool:
        return self.manifest.encryption is not None and name in self.manifest.encryption["files"]

    def read(self, name: str) -> bytes | bytearray:
        """A file's contents, decrypted in memory if the bundle is encrypted (and kept: the graph's session and the
        embedding table may both read one file)."""
        if not self.is_encrypted(name):
            return self.file(name).read_bytes()
        if self.key is None:
            raise EdgeLLMError(f"{self.path}: the bundle is encrypted and was opened without its key")
        if name not in self._plain:
            self._plain[name] = encryption.decrypt_file(self.file(name), self.key)
        return self._plain[name]

    def json(self, name: str) -> dict:
        path = self.file(name)
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def identity(self) -> str:
        """A fingerprint of this bundle's contents (its manifest records every file's checksum): what saved KV caches
        are tied to."""
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    def verify_hashes(self) -> None:
        """Every file's CRC-32 against the manifest (SHA-256 for bundles written before it recorded CRC-32);
        sizes were checked when the bundle was opened."""
        for name, info in self.manifest.files.items():
            kind, want = ("crc32", info.crc32) if info.crc32 else ("sha256", info.sha256)
            if file_checksums(self.path / name, (kind,))[kind] != want:
                if name in self.manifest.shared:
                    raise EdgeLLMError(f"{self.path / name}: the weights file shared with "
                                       f"{self.path / self.manifest.shared[name]} changed since this bundle was made; "
                                       "reconvert it")
                raise EdgeLLMError(f"{self.path / name}: {kind.upper()} checksum does not match the manifest "
                                   "(corrupt file); reconvert the model")


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Checks the manifest and file sizes; with verify, also every file's checksum (see Bundle.verify_hashes)."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeLLMError(f"{path}: no such bundle folder (make one with `edgellm convert -m MODEL -o {path}`)")
    manifest_path = path / MANIFEST
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise EdgeLLMError(f"{path}: not an edgellm bundle (no {MANIFEST})") from None
    except ValueError as e:
        raise EdgeLLMError(f"{manifest_path}: corrupt manifest ({e}); reconvert the model") from None
    manifest = Manifest.from_json(data, str(path))
    for name, info in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise EdgeLLMError(f"{path}: bundle file {name} is missing; reconvert the model")
        size = file.stat().st_size
        if size != info.bytes and name in manifest.shared:
            raise EdgeLLMError(f"{file}: the weights file shared with {path / manifest.shared[name]} changed since "
                               "this bundle was made (its size differs); reconvert it")
        if size != info.bytes:
            raise EdgeLLMError(f"{file}: {size} bytes where the manifest records {info.bytes} "
                               "(truncated or replaced); reconvert the model")
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify_hashes()
    return bundle
