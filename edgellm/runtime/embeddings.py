"""The token embedding table of a bundle: looked up row by row in numpy, memory-mapped, never loaded whole.

Usually one float16 (float32 for -q f32) array. A quantized bundle from a GGUF whose embedding is itself in blocks
keeps them: integer codes with per-block scales (and zero points or mins), exact and a fraction of float16's size;
with a large vocabulary (Gemma 3: 262,144 rows) the table is otherwise the biggest file of the bundle. A float
table stays float16: rounding it to 8 bits moves every token's input, measurably on small models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert.quantize import QuantizedWeight

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


class EmbeddingTable:
    """table[ids] -> float32 [len(ids), hidden]."""

    def __init__(self, bundle):
        entry = bundle.manifest["embeddings"]
        if isinstance(entry, str):  # float rows
            self.values, self.parts = np.load(bundle.file(entry), mmap_mode="r"), None
            self.shape = self.values.shape
            return
        self.codes = np.load(bundle.file(entry["codes"]), mmap_mode="r")
        self.parts = {p: np.load(bundle.file(entry[p]), mmap_mode="r") for p in _PARTS if p in entry}
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
