"""Encrypted bundles (`edgellm convert --encrypt`): the graphs and weight files stored with AES-256-GCM, read back
into memory only (sessions from bytes, external data from memory buffers, the embedding table as arrays).

A file is a header (magic, chunk size, plaintext size) and then chunks of at most CHUNK plaintext bytes, each with
its own random nonce and tag; a chunk's associated data names the file, the chunk's index and whether it is the
last, so chunks cannot be reordered, dropped or swapped between files without the tag failing. The key is derived
from the user's key material (EDGELLM_KEY, or a key file) with scrypt and the bundle's random salt (kept in its
manifest), so a short passphrase is as slow to guess as scrypt makes it, and one passphrase gives every bundle its
own key. Needs the `cryptography` package (`pip install 'edgellm[encrypt]'`), at conversion and at load.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from ..errors import EdgeLLMError

MAGIC = b"EDGELLM-AESGCM-1"
CHUNK = 64 << 20
NONCE, TAG = 12, 16
CIPHER = "AES-256-GCM"
KDF = {"name": "scrypt", "n": 1 << 15, "r": 8, "p": 1}
KEY_ENV = "EDGELLM_KEY"


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise EdgeLLMError("encrypted bundles need the 'cryptography' package: pip install 'edgellm[encrypt]'") \
            from None
    return AESGCM(key)


def key_material(key: bytes | str | None = None, key_file: str | Path | None = None, encrypting: bool = False) -> bytes:
    """The user's key material: `key`, else the contents of `key_file`, else $EDGELLM_KEY; one clear error if none.
    `encrypting`: for a new bundle, whose key must be at least 8 characters (at load, a shorter one is simply not
    the bundle's key)."""
    if key is not None:
        material = key.encode() if isinstance(key, str) else bytes(key)
    elif key_file is not None:
        try:
            material = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise EdgeLLMError(f"{key_file}: cannot read the key file ({e.strerror or e})") from None
    elif os.environ.get(KEY_ENV):
        material = os.environ[KEY_ENV].encode()
    elif encrypting:
        raise EdgeLLMError(f"--encrypt needs a key to encrypt with: --key-file FILE or ${KEY_ENV} (key= / key_file= "
                           "in Python)")
    else:
        raise EdgeLLMError(f"the bundle is encrypted: give its key in ${KEY_ENV} or with --key-file FILE "
                           "(key= / key_file= in Python)")
    if encrypting and len(material) < 8:
        raise EdgeLLMError("an encryption key needs at least 8 characters")
    return material


def derive_key(material: bytes, salt: bytes, kdf: dict = KDF) -> bytes:
    if kdf.get("name") != "scrypt":
        raise EdgeLLMError(f"unknown key derivation {kdf.get('name')!r}; a newer edgellm wrote this bundle")
    return hashlib.scrypt(material, salt=salt, n=kdf["n"], r=kdf["r"], p=kdf["p"], dklen=32,
                          maxmem=256 * kdf["n"] * kdf["r"] + (1 << 20))


def key_check(key: bytes) -> str:
    """What the manifest keeps to tell a wrong key at once: a hash of the derived key (nothing to decrypt with)."""
    return hashlib.sha256(b"edgellm key check\0" + key).hexdigest()[:32]


def new_salt() -> bytes:
    return os.urandom(16)


def _associated(name: str, index: int, last: bool) -> bytes:
    return f"{name}:{index}:{int(last)}".encode()


def encrypt_file(path: Path, key: bytes) -> None:
    """Replace the file at `path` with its encryption (written beside it, then renamed over it)."""
    aes, size, name = _aesgcm(key), path.stat().st_size, path.name
    out = path.with_name(path.name + ".encrypting")
    with open(path, "rb") as src, open(out, "wb") as dst:
        dst.write(MAGIC + struct.pack("<IQ", CHUNK, size))
        index, done = 0, 0
        while True:
            block = src.read(CHUNK)
            done += len(block)
            last = done >= size
            nonce = os.urandom(NONCE)
            dst.write(nonce + aes.encrypt(nonce, block, _associated(name, index, last)))
            index += 1
            if last:
                break
    os.replace(out, path)


def decrypt_file(path: Path, key: bytes) -> bytearray:
    """The plaintext of an encrypted bundle file, in memory only; one clear error for a wrong key or an altered file."""
    from cryptography.exceptions import InvalidTag

    aes, name = _aesgcm(key), path.name
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 12)
        if len(head) < len(MAGIC) + 12 or not head.startswith(MAGIC):
            raise EdgeLLMError(f"{path}: not an encrypted bundle file; reconvert the model")
        chunk, size = struct.unpack("<IQ", head[len(MAGIC):])
        plain = bytearray(size)
        index, done = 0, 0
        while True:
            want = min(chunk, size - done)
            sealed = f.read(NONCE + want + TAG)
            last = done + want >= size
            try:
                block = aes.decrypt(sealed[:NONCE], sealed[NONCE:], _associated(name, index, last))
            except (InvalidTag, ValueError):
                raise EdgeLLMError(f"{path}: does not decrypt with this key (a wrong key, or the file was altered)") \
                    from None
            plain[done:done + len(block)] = block
            done += len(block)
            index += 1
            if last:
                break
    return plain
