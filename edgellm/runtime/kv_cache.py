"""The KV cache: one preallocated array of every layer's keys and values for a number of slots, each slot one
sequence, and what each slot holds (its tokens, their rotary positions, the adapter they were computed with)."""

from __future__ import annotations

import mmap

import numpy as np

from .prompt_cache import CachedSequence


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zeroed array whose memory becomes resident page by page as it is written: the KV cache costs
    what the conversation fills, not the bundle's whole length. (numpy asks for transparent huge pages on large
    arrays; their first write commits 2 MiB, so one token written into every head's slice made all of it resident.)"""
    count, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    buffer = mmap.mmap(-1, max(1, count * size), **private)  # anonymous: zeroed, committed on first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


class Slot:
    """One sequence's place in the KV cache (`index`): which token, or image key, fills each position, at which
    rotary positions (one row, or several axes: after an image those fall behind the position index), and where
    decoding continues (the largest position + 1)."""

    def __init__(self, index: int, rows: int, seq_length: int):
        self.index = index
        self.tokens: list[int] = []
        self.positions = np.zeros((rows, seq_length), np.int64)
        self.next_position = 0
        self.adapter: str | None = None  # the LoRA adapter its keys and values were computed with (LoRA slots)

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` positions (their keys and values are overwritten later)."""
        del self.tokens[length:]
        self.next_position = int(self.positions[:, :length].max()) + 1 if length else 0

    def clear(self) -> None:
        self.tokens, self.next_position = [], 0


class KvCache:
    """`kv` [layers, 2 (key, value), slots, kv heads, seq_length, head] and the slots that index it. Each layer's
    key and value slices of a range of slots are bound as both a graph's past and present tensors (runners.Bindings),
    so the graph appends new positions in place: nothing is copied or reallocated per token."""

    def __init__(self, layers: int, slots: int, kv_heads: int, seq_length: int, head_dim: int, dtype,
                 position_rows: int):
        self.seq_length = seq_length
        self.kv = lazy_zeros((layers, 2, slots, kv_heads, seq_length, head_dim), dtype)
        self.slots = [Slot(i, position_rows, seq_length) for i in range(slots)]

    def slot_at(self, index: int) -> Slot:
        return next(s for s in self.slots if s.index == index)

    def move(self, slot: Slot, free: Slot) -> None:
        """Move `slot`'s sequence to `free`'s place in the cache (so that the sequences that decode together hold
        neighbouring places): the two exchange indices, and `free` is left empty at `slot`'s former one."""
        self.copy_positions(slot.index, free.index, len(slot))
        slot.index, free.index = free.index, slot.index
        free.clear()

    def snapshot(self, slot: Slot) -> CachedSequence:
        """A copy of a slot's cached positions (its keys, rotary positions and keys and values), for a PromptCache."""
        n = len(slot)
        return CachedSequence(np.array(slot.tokens, np.int64), slot.positions[:, :n].copy(), slot.next_position,
                              self.read(slot.index, n))

    def restore(self, slot: Slot, entry: CachedSequence, length: int) -> None:
        """Fill `slot` with the first `length` positions of a PromptCache entry."""
        self.write(slot.index, entry.kv, length)
        slot.tokens = [int(t) for t in entry.keys[:length]]
        slot.positions[:, :length] = entry.positions[:, :length]
        slot.truncate(length)

    # where the keys and values are kept (ray_stages.StageCaches: in the stages' actors)
    def copy_positions(self, source: int, target: int, n: int) -> None:
        """The first n positions of place `source`, copied to place `target`."""
        self.kv[:, :, target, :, :n] = self.kv[:, :, source, :, :n]

    def read(self, index: int, n: int) -> np.ndarray:
        """A copy of the first n positions at place `index`: [layers, 2, kv heads, n, head]."""
        return np.ascontiguousarray(self.kv[:, :, index, :, :n])

    def write(self, index: int, kv: np.ndarray, length: int) -> None:
        """The first `length` positions of `kv` (as read() gives) into place `index`."""
        self.kv[:, :, index, :, :length] = kv[:, :, :, :length]


def common_prefix(slot: Slot, keys, positions: np.ndarray, limit: int) -> int:
    """How many of `keys` (at rotary `positions`) the slot holds from its start, at most `limit`."""
    limit = min(len(slot), len(keys), limit)
    if limit <= 0:
        return 0
    same = np.asarray(slot.tokens[:limit]) == np.asarray(keys[:limit])
    same &= (slot.positions[:, :limit] == positions[:, :limit]).all(axis=0)
    return limit if same.all() else int(np.argmin(same))
