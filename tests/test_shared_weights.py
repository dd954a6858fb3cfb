"""Bundles of one model at other lengths sharing one weights file (`--share-weights-with`): the files that are the
same are hard links to the other bundle's, checked by checksum at load."""

from __future__ import annotations

import os

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS


def test_a_bundle_of_another_length_shares_the_weights_file(tiny, tmp_path):
    _, folder = tiny("qwen3")
    first = edgellm.convert(folder, tmp_path / "s64", seq_length=64, chunk_length=16, progress=False)
    second = edgellm.convert(folder, tmp_path / "s256", seq_length=256, chunk_length=32, progress=False,
                             share_weights_with=first)
    alone = edgellm.convert(folder, tmp_path / "alone", seq_length=256, chunk_length=32, progress=False)
    data = second / "decoder.onnx.data"
    assert os.path.samefile(data, first / "decoder.onnx.data") and data.stat().st_nlink == 2  # one file on disk
    shared = edgellm.load(second).manifest.shared
    assert shared["decoder.onnx.data"] == "../s64/decoder.onnx.data" and "embed_tokens.npy" in shared
    assert os.path.samefile(second / "embed_tokens.npy", first / "embed_tokens.npy")
    ids = edgellm.load(alone).tokenizer.encode(CORPUS.read_text())[:100]
    np.testing.assert_array_equal(edgellm.load(second).logits(ids), edgellm.load(alone).logits(ids))
    # the other bundle's weights changed: refused at load, naming the shared file
    raw = bytearray((first / "decoder.onnx.data").read_bytes())
    raw[len(raw) // 2] ^= 1
    (first / "decoder.onnx.data").write_bytes(raw)  # in place: the linked file changes for both
    raw[len(raw) // 2] ^= 1
    with pytest.raises(EdgeLLMError, match="shared with .*s64.* changed"):
        edgellm.load(second)
    (first / "decoder.onnx.data").write_bytes(raw)  # mended: then the first bundle can go, the second keeps the file
    for f in first.iterdir():
        f.unlink()
    first.rmdir()
    np.testing.assert_array_equal(edgellm.load(second).logits(ids[:10]), edgellm.load(alone).logits(ids[:10]))


def test_sharing_with_another_models_bundle_is_refused(tiny, tmp_path):
    _, folder = tiny("qwen3")
    other = edgellm.convert(folder, tmp_path / "w8", quantize="w8", seq_length=64, progress=False)
    with pytest.raises(EdgeLLMError, match="cannot share its weights with .*w8.*: its decoder.onnx.data differs"):
        edgellm.convert(folder, tmp_path / "w4", seq_length=64, progress=False, share_weights_with=other)
    assert not (tmp_path / "w4").exists()
    with pytest.raises(EdgeLLMError, match="not an edgellm bundle"):
        edgellm.convert(folder, tmp_path / "x", seq_length=64, progress=False, share_weights_with=tmp_path)
