"""Copies of earlier sequences' KV cache (system prompts, conversations, documents, image positions), found by
their longest common start with a new prompt, so that only the rest is prefilled.

A PromptCache holds CachedSequences in memory, least recently used first out when over its size (a sequence that
extends another replaces it, but for pinned ones: prompts precomputed on purpose); with a folder, each one is also a
file there (`<fingerprint>.kv.npz`, written on a background thread), reloaded when the cache is opened again: a
restarted server, or a prompt precomputed by `edgellm cache-prompt`. Each file records the bundle it was computed
with; a file of another bundle, or one that does not read back whole, is refused with the reason.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError

FILE_SUFFIX = ".kv.npz"
FILE_FORMAT = 1


@dataclass
class CachedSequence:
    keys: np.ndarray  # [n] token ids (negative: an image's key) at each position
    positions: np.ndarray  # [rows, n] rotary positions
    next_position: int
    kv: np.ndarray  # [layers, 2, kv_heads, n, head_dim], in the cache's dtype
    pinned: bool = False  # computed on purpose (`edgellm cache-prompt`): never evicted, nor dropped for a longer one

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.keys.nbytes + self.positions.nbytes

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.keys.tobytes() + self.positions.tobytes()).hexdigest()[:32]

    def matches(self, keys, positions: np.ndarray, limit: int) -> int:
        """How many of `keys` (at rotary `positions`) this sequence starts with, at most `limit`."""
        n = min(len(self.keys), len(keys), limit)
        if n == 0:
            return 0
        same = (self.keys[:n] == np.asarray(keys[:n], np.int64)) & (self.positions[:, :n] == positions[:, :n]).all(0)
        return n if same.all() else int(np.argmin(same))


class PromptCache:
    def __init__(self, limit_mib: float, bundle=None, folder: str | Path | None = None):
        """`limit_mib`: the most the entries may hold in memory; `folder`: where entries are saved and read back
        (needs `bundle`, whose identity each file records)."""
        self.limit = int(limit_mib * (1 << 20))
        self.entries: OrderedDict[str, CachedSequence] = OrderedDict()
        self.identity = bundle.identity if bundle is not None else None
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.lookups = 0
        self.refused: list[str] = []  # files not loaded, each with why
        self.failed: list[str] = []  # files that could not be written (flush() raises the first)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="edgellm-prompt-cache") if folder is not None else None
        if self.folder is not None:
            if bundle is None:
                raise ValueError("a PromptCache with a folder needs the bundle its files belong to")
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                files = sorted(self.folder.glob(f"*{FILE_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
            except OSError as e:
                raise EdgeLLMError(f"{self.folder}: cannot use it as a prompt cache folder ({e.strerror or e})") \
                    from None
            loaded: list = []  # the newest that fit (pinned ones always); files left out stay on disk
            for path in files:
                try:
                    entry = self.read(path)
                except EdgeLLMError as e:
                    self.refused.append(str(e))
                    continue
                if entry.pinned or sum(e.nbytes for e in loaded) + entry.nbytes <= self.limit:
                    loaded.append(entry)
            for entry in reversed(loaded):
                self.entries[entry.fingerprint] = entry

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def longest(self, keys, positions: np.ndarray, limit: int) -> tuple[CachedSequence | None, int]:
        """The entry that holds the longest start of `keys` (at most `limit` positions), and that length."""
        self.lookups += 1
        best, best_n, used = None, 0, []
        for fingerprint, entry in self.entries.items():
            n = entry.matches(keys, positions, limit)
            if n > 0:
                used.append(fingerprint)
            if n > best_n:
                best, best_n = fingerprint, n
        if best is None:
            return None, 0
        self.hits += 1
        for fingerprint in used + [best]:  # a shared system prompt stays as recent as the conversations it starts
            self.entries.move_to_end(fingerprint)
        return self.entries[best], best_n

    def put(self, entry: CachedSequence) -> None:
        """Keep `entry` (the most recently used now); entries it extends are dropped, as are the least recently used
        ones while the cache is over its size. An entry larger than the whole cache is not kept."""
        if len(entry.keys) == 0 or entry.nbytes > self.limit:
            return
        for fingerprint, old in list(self.entries.items()):
            if (not old.pinned and len(old.keys) <= len(entry.keys)
                    and old.matches(entry.keys, entry.positions, len(old.keys)) == len(old.keys)):
                self._drop(fingerprint)
        self._keep(entry)
        if self.writer is not None and self.folder is not None:  # (a writer only with a folder)
            self.writer.submit(self.write, entry, self.folder / f"{entry.fingerprint}{FILE_SUFFIX}")

    def _keep(self, entry: CachedSequence) -> None:
        self.entries[entry.fingerprint] = entry
        self.entries.move_to_end(entry.fingerprint)
        while self.nbytes > self.limit:
            oldest = next((f for f, e in self.entries.items() if not e.pinned and f != entry.fingerprint), None)
            if oldest is None:
                break
            self._drop(oldest)

    def _drop(self, fingerprint: str) -> None:
        del self.entries[fingerprint]
        if self.writer is not None and self.folder is not None:
            self.writer.submit((self.folder / f"{fingerprint}{FILE_SUFFIX}").unlink, missing_ok=True)

    def flush(self) -> None:
        """Wait until every file written so far is on disk."""
        if self.writer is not None:
            self.writer.submit(lambda: None).result()
        if self.failed:
            raise EdgeLLMError(self.failed.pop(0))

    def write(self, entry: CachedSequence, path: Path) -> None:
        """Save `entry` to `path` (written beside it and renamed, so a reader never sees half a file); on the writer
        thread, a failure is reported by the next flush()."""
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                np.savez(f, format=np.int64(FILE_FORMAT), bundle=np.str_(self.identity), keys=entry.keys,
                         positions=entry.positions, next_position=np.int64(entry.next_position), kv=entry.kv,
                         pinned=np.bool_(entry.pinned))
            os.replace(partial, path)
        except OSError as e:
            partial.unlink(missing_ok=True)
            self.failed.append(f"cannot save the prompt cache to {path}: {e.strerror or e}")

    def read(self, path: Path) -> CachedSequence:
        """One saved entry; EdgeLLMError when it belongs to another bundle or does not read back whole."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if int(f["format"]) != FILE_FORMAT:
                    raise EdgeLLMError(f"{path}: a prompt cache file of format {int(f['format'])}, this edgellm "
                                       f"reads format {FILE_FORMAT}; recompute it")
                if str(f["bundle"]) != self.identity:
                    raise EdgeLLMError(f"{path}: this prompt cache was computed with another bundle (or before "
                                       "the bundle was reconverted); recompute it with `edgellm cache-prompt`")
                entry = CachedSequence(f["keys"], f["positions"], int(f["next_position"]), f["kv"],
                                       bool(f["pinned"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise EdgeLLMError(f"{path}: not a readable prompt cache file (truncated or damaged: {e}); delete it "
                               "or recompute it") from None
        n = len(entry.keys)
        if entry.positions.shape[1:] != (n,) or entry.kv.ndim != 5 or entry.kv.shape[3] != n:
            raise EdgeLLMError(f"{path}: the prompt cache file's arrays do not agree (damaged); recompute it")
        return entry
