"""The token embedding table of a bundle: read from disk row by row as tokens ask for them, never loaded whole.

Usually one float16 (float32 for -q f32) array. A quantized bundle from a GGUF whose embedding is itself in blocks
keeps them: integer codes with per-block scales (and zero points or mins), exact and a fraction of float16's size;
with a large vocabulary (a quarter of a million rows) the table is otherwise the biggest file of the bundle. When the
lm_head is that same table (tied embeddings) and the graph holds its blocks as they are, the bundle stores them
once: the rows are read from the lm_head's initializers in the graph's data file (4-bit codes two per byte, as
MatMulNBits packs them). A float table stays float16: rounding it to 8 bits moves every token's input, measurably
on small models.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeLLMError
from .blocks import QuantizedWeight, unpack_nibbles
from .manifest import ArrayRef, EmbeddingsEntry

FILE = "embed_tokens.npy"


def save_table(folder: Path, table: np.ndarray | QuantizedWeight, mode: str, lm_head: dict | None = None,
               multiplier: np.float32 | None = None) -> EmbeddingsEntry:
    """Write the table for a bundle of quantization `mode`; returns the manifest's "embeddings" entry. `lm_head`
    (from the converter's `stored_blocks`) says where the graph's data file holds the lm_head's blocks: when they
    are this table's own (before `multiplier`, which the table carries), nothing is written and the entry points
    at them."""
    if mode in ("f32", "f16") or not isinstance(table, QuantizedWeight):
        table = table.dequantize() if isinstance(table, QuantizedWeight) else table
        np.save(folder / FILE, table.astype(np.float32 if mode == "f32" else np.float16))
        return EmbeddingsEntry(values=FILE)
    if lm_head is not None and _same_blocks(table, lm_head, multiplier):
        refs: dict[str, Any] = {part: [ArrayRef(**where) for where, _ in pieces]
                                for part, pieces in lm_head["parts"].items()}
        return EmbeddingsEntry(bits=table.bits, k=table.k, packed=table.bits == 4,
                               multiplier=float(multiplier) if multiplier is not None else None, **refs)
    np.save(folder / FILE, table.codes)
    parts = {"scales": table.scales, "zero_points": table.zero_points, "mins": table.mins}
    files: dict[str, Any] = {}
    for part, values in parts.items():
        if values is not None:
            files[part] = f"embed_tokens.{part}.npy"
            np.save(folder / files[part], values)
    return EmbeddingsEntry(codes=FILE, bits=table.bits, k=table.k, **files)


def _same_blocks(table: QuantizedWeight, lm_head: dict, multiplier: np.float32 | None) -> bool:
    """Whether the lm_head's stored codes and scales (times `multiplier`) are the table's, bit for bit. (GGUF blocks,
    the only quantized tables, come without zero points: the codes are centred on the midpoint.)"""
    if table.mins is not None or table.zero_points is not None or (
            lm_head["bits"], lm_head["block_size"], lm_head["k"]) != (table.bits, table.block_size, table.k):
        return False
    stored = {part: np.concatenate([array for _, array in pieces]) for part, pieces in lm_head["parts"].items()}
    if multiplier is not None and "scales" in stored:
        stored["scales"] = stored["scales"] * np.float32(multiplier)
    mine = {"codes": table.packed_codes(), "scales": table.scales}
    return stored.keys() == mine.keys() and all(
        stored[p].dtype == mine[p].dtype and stored[p].size == mine[p].size
        and np.array_equal(stored[p].reshape(-1).view(np.uint8), mine[p].reshape(-1).view(np.uint8)) for p in mine)


class RowFile:
    """An array (a .npy file, or one at an offset of another file) whose rows are read with pread as they are asked
    for: the process holds only those rows. (A memory map serves the same bytes, but the kernel maps the 64 KiB
    around every row touched from the page cache, so a few hundred tokens make most of a table resident.)"""

    def __init__(self, path: Path, where: ArrayRef | None = None):
        """`where`: the array inside a raw file; None for a .npy file."""
        self.file = open(path, "rb")  # stays open; closed with the object
        fortran_order = False
        if where is None:
            version = np.lib.format.read_magic(self.file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            self.shape, fortran_order, self.dtype = read_header(self.file)
            self.offset = self.file.tell()
        else:
            self.shape, self.dtype, self.offset = tuple(where.shape), np.dtype(where.dtype), int(where.offset)
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        if fortran_order or os.fstat(self.file.fileno()).st_size < self.offset + self.shape[0] * self.row_bytes:
            self.file.close()
            raise EdgeLLMError(f"{path}: the file is shorter than its {self.shape} array or not in row order; "
                               "reconvert the bundle")

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        rows = np.empty((ids.size, *self.row_shape), self.dtype)
        flat = rows.reshape(-1).view(np.uint8).data
        fd, size, count = self.file.fileno(), self.row_bytes, self.shape[0]
        for i, row in enumerate(ids.reshape(-1).tolist()):  # pread keeps no file position: safe from many threads
            if not 0 <= row < count:
                raise IndexError(f"token id {row} out of range [0, {count})")
            os.preadv(fd, [flat[i * size:(i + 1) * size]], self.offset + row * size)
        return rows.reshape(*ids.shape, *self.row_shape)


class RowPieces:
    """Rows held by consecutive arrays (a weight stored as row pieces): rows[ids] from whichever holds each."""

    def __init__(self, pieces: list):
        self.pieces = pieces
        self.starts = np.cumsum([0] + [p.shape[0] for p in pieces])
        self.shape = (int(self.starts[-1]), *pieces[0].shape[1:])

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        flat = np.asarray(ids, np.int64).reshape(-1)
        if flat.size and not (0 <= flat.min() and flat.max() < self.shape[0]):
            raise IndexError(f"token id out of range [0, {self.shape[0]})")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        rows = np.empty((flat.size, *self.shape[1:]), self.pieces[0].dtype)
        for i, piece in enumerate(self.pieces):
            if (here := which == i).any():
                rows[here] = piece[flat[here] - self.starts[i]]
        return rows.reshape(*np.shape(ids), *self.shape[1:])


_PREAD = hasattr(os, "preadv")  # Windows has none: a memory map serves the rows there


def _rows(folder: Path, part, read=None):
    """Row reader for a part of the table (a TablePart: a .npy file's name, an array inside another file, or a
    list of those, one per row piece). `read(name)`: a file's bytes in memory (an encrypted bundle's, decrypted),
    instead of reading rows from disk."""
    if isinstance(part, list):
        return _rows(folder, part[0], read) if len(part) == 1 else RowPieces([_rows(folder, p, read) for p in part])
    where = None if isinstance(part, str) else part
    if read is not None:
        if where is None:
            return np.load(io.BytesIO(read(part)))
        return np.frombuffer(read(where.file), np.dtype(where.dtype), int(np.prod(where.shape)),
                             int(where.offset)).reshape(tuple(where.shape))
    path = folder / (part if where is None else where.file)
    if _PREAD:
        return RowFile(path, where)
    if where is None:
        return np.load(path, mmap_mode="r")
    return np.memmap(path, np.dtype(where.dtype), "r", int(where.offset), tuple(where.shape))


class EmbeddingTable:
    """table[ids] -> float32 [len(ids), hidden], for the bundle folder `folder` whose manifest holds `entry`."""

    def __init__(self, folder: Path, entry: EmbeddingsEntry, read=None):
        """`read(name)`: the files' bytes, for a table held in memory (an encrypted bundle's)."""
        if entry.values is not None:  # float rows
            self.values, self.parts = _rows(folder, entry.values, read), None
            self.shape = self.values.shape
            return
        if entry.codes is None or entry.k is None or entry.bits is None:
            raise EdgeLLMError(f"{folder}: the manifest's embeddings entry has neither values nor codes, bits and k; "
                               "reconvert the bundle")
        self.codes = _rows(folder, entry.codes, read)
        self.parts = {name: _rows(folder, part, read) for name, part in entry.block_parts().items()}
        self.k = int(entry.k)
        self.midpoint = np.float32(1 << (int(entry.bits) - 1))  # the zero point when none is stored
        self.packed = entry.packed  # 4-bit codes two per byte
        self.multiplier = np.float32(entry.multiplier) if entry.multiplier is not None else None
        self.shape = (self.codes.shape[0], self.k)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if self.parts is None:
            return np.asarray(self.values[ids], np.float32)
        codes = self.codes[ids]
        codes = (unpack_nibbles(codes) if self.packed else codes).astype(np.float32)  # [n, blocks, block]
        zero = (self.parts["zero_points"][ids].astype(np.float32)[..., None] if "zero_points" in self.parts
                else self.midpoint)
        scales = self.parts["scales"][ids]
        if self.multiplier is not None:
            scales = scales * self.multiplier
        rows = (codes - zero) * scales[..., None]
        if "mins" in self.parts:
            rows += self.parts["mins"][ids][..., None]
        return rows.reshape(len(ids), -1)[:, : self.k]
