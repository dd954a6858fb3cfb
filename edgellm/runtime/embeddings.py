"""The token embedding table of a bundle: read from disk row by row as tokens ask for them, never loaded whole.

Usually one float16 (float32 for -q f32) array. A quantized bundle from a GGUF whose embedding is itself in blocks
keeps them: integer codes with per-block scales (and zero points or mins), exact and a fraction of float16's size;
with a large vocabulary (Gemma 3: 262,144 rows) the table is otherwise the biggest file of the bundle. A float
table stays float16: rounding it to 8 bits moves every token's input, measurably on small models.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..convert.quantize import QuantizedWeight
from ..errors import EdgeLLMError

FILE = "embed_tokens.npy"
_PARTS = ("scales", "zero_points", "mins")


def save_table(folder: Path, table: np.ndarray | QuantizedWeight, mode: str) -> str | dict:
    """Write the table for a bundle of quantization `mode`; returns the manifest's "embeddings" entry."""
    if mode in ("f32", "f16") or not isinstance(table, QuantizedWeight):
        table = table.dequantize() if isinstance(table, QuantizedWeight) else table
        np.save(folder / FILE, table.astype(np.float32 if mode == "f32" else np.float16))
        return FILE
    np.save(folder / FILE, table.codes)
    entry = {"codes": FILE, "bits": table.bits, "k": table.k}
    for part in _PARTS:
        value = getattr(table, part)
        if value is not None:
            entry[part] = f"embed_tokens.{part}.npy"
            np.save(folder / entry[part], value)
    return entry


class RowFile:
    """A .npy array whose rows are read with pread as they are asked for: the process holds only those rows.
    (A memory map serves the same bytes, but the kernel maps the 64 KiB around every row touched from the page
    cache: a few hundred tokens made SmolLM2's whole 27 MiB table resident, and most of Gemma 3's 180 MiB.)"""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # stays open; closed with the object
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran_order, self.dtype = read_header(self.file)
        self.offset = self.file.tell()
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        if fortran_order or os.fstat(self.file.fileno()).st_size < self.offset + self.shape[0] * self.row_bytes:
            self.file.close()
            raise EdgeLLMError(f"{path}: the file is shorter than its {self.shape} array or not in row order; "
                               "reconvert the bundle")

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        rows = np.empty((ids.size, *self.row_shape), self.dtype)
        flat = memoryview(rows.reshape(-1).view(np.uint8))
        fd, size, count = self.file.fileno(), self.row_bytes, self.shape[0]
        for i, row in enumerate(ids.reshape(-1).tolist()):  # pread keeps no file position: safe from many threads
            if not 0 <= row < count:
                raise IndexError(f"token id {row} out of range [0, {count})")
            os.preadv(fd, [flat[i * size:(i + 1) * size]], self.offset + row * size)
        return rows.reshape(*ids.shape, *self.row_shape)


def _rows(path: Path):
    """Row reader for `path`; a memory map where the platform has no pread (Windows)."""
    return RowFile(path) if hasattr(os, "preadv") else np.load(path, mmap_mode="r")


class EmbeddingTable:
    """table[ids] -> float32 [len(ids), hidden]."""

    def __init__(self, bundle):
        entry = bundle.manifest["embeddings"]
        if isinstance(entry, str):  # float rows
            self.values, self.parts = _rows(bundle.file(entry)), None
            self.shape = self.values.shape
            return
        self.codes = _rows(bundle.file(entry["codes"]))
        self.parts = {p: _rows(bundle.file(entry[p])) for p in _PARTS if p in entry}
        self.k = int(entry["k"])
        self.midpoint = np.float32(1 << (int(entry["bits"]) - 1))  # the zero point when none is stored
        self.shape = (self.codes.shape[0], self.k)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if self.parts is None:
            return np.asarray(self.values[ids], np.float32)
        codes = self.codes[ids].astype(np.float32)  # [n, blocks, block]
        zero = (self.parts["zero_points"][ids].astype(np.float32)[..., None] if "zero_points" in self.parts
                else self.midpoint)
        rows = (codes - zero) * self.parts["scales"][ids][..., None]
        if "mins" in self.parts:
            rows += self.parts["mins"][ids][..., None]
        return rows.reshape(len(ids), -1)[:, : self.k]
