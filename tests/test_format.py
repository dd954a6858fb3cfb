"""The bundle format on its own (numpy-only, no torch): the typed manifest reads and writes every version's JSON
unchanged, a folder is written with checksums and refused when damaged, and the embedding table's rows read back
from quantized blocks stored as their own files or inside another file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.format import (
    ArrayRef,
    EmbeddingsEntry,
    EmbeddingTable,
    Manifest,
    QuantizedWeight,
    open_bundle,
    save_table,
    write_manifest,
)

VERSION_1 = {  # a bundle written before CRC-32 and the tied table (format 1, a float table of its own)
    "format": "edgellm-bundle", "format_version": 1, "created_by": "edgellm 0.1.0", "architecture": "LlamaForCausalLM",
    "family": "llama", "source": {"path": "/models/smol", "format": "hf"},
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "vocab_size": 512},
    "seq_length": 512, "chunk_length": 16,
    "quantization": {"mode": "f16", "group_size": 64, "symmetric": True, "lm_head": "f16", "accuracy_level": 4,
                     "matmuls": {}},
    "tokens": {"bos_token": None, "bos_token_id": None, "eos_token": "<|im_end|>", "eos_token_ids": [2],
               "pad_token_id": None},
    "graphs": {"decoder": "decoder.onnx"}, "embeddings": "embed_tokens.npy",
    "files": {"decoder.onnx": {"bytes": 10, "sha256": "ab" * 32}},
}
VERSION_2_VLM = {  # a vision-language bundle whose table is the tied lm_head's 4-bit blocks, in row pieces
    **VERSION_1, "format_version": 2, "architecture": "Qwen3VLForConditionalGeneration", "family": "qwen3",
    "model": {**VERSION_1["model"], "mrope_section": [2, 3, 3]},
    "quantization": {**VERSION_1["quantization"], "mode": "w4", "lm_head": "w8", "matmuls": {"4-bit/32": 12}},
    "tokens": {**VERSION_1["tokens"], "image_token_id": 5, "image_start_id": 3, "image_end_id": 4,
               "video_token_id": 6},
    "graphs": {"decoder": "decoder.onnx", "vision": "vision.onnx"},
    "embeddings": {"bits": 4, "k": 64, "packed": True, "multiplier": 8.0,
                   "codes": [{"file": "decoder.onnx.data", "offset": 0, "dtype": "uint8", "shape": [256, 2, 16]},
                             {"file": "decoder.onnx.data", "offset": 8192, "dtype": "uint8", "shape": [256, 2, 16]}],
                   "scales": [{"file": "decoder.onnx.data", "offset": 16384, "dtype": "float32", "shape": [256, 2]},
                              {"file": "decoder.onnx.data", "offset": 18432, "dtype": "float32", "shape": [256, 2]}]},
    "vision": {"family": "qwen3_vl", "version": "3", "patch_size": 16, "image_token": "<|image_pad|>",
               "quantization": "f16"},
    "files": {"decoder.onnx": {"bytes": 10, "sha256": "ab" * 32, "crc32": "0a7e5e8b"}},
}


VERSION_3_INT8_CACHE = {**VERSION_1, "format_version": 3,
                        "quantization": {**VERSION_1["quantization"], "kv_cache": "int8"}}


@pytest.mark.parametrize("data", [VERSION_1, VERSION_2_VLM, VERSION_3_INT8_CACHE],
                         ids=["v1-float-table", "v2-vlm-tied-table", "v3-int8-cache"])
def test_manifest_reads_and_writes_the_same_json(data):
    manifest = Manifest.from_json(json.loads(json.dumps(data)))
    assert manifest.to_json() == data
    assert manifest.model.num_key_value_heads == 2 and manifest.tokens.eos_token_ids == [2]
    assert manifest.quantization.kv_dtype == (np.int8 if data is VERSION_3_INT8_CACHE else np.float32)
    if manifest.vision:
        assert manifest.vision.family == "qwen3_vl" and manifest.vision.settings["patch_size"] == 16
        assert manifest.tokens.media_ids == [5, 6]
        assert isinstance(manifest.embeddings.codes[1], ArrayRef) and manifest.embeddings.codes[1].offset == 8192


def test_a_damaged_or_newer_manifest_is_refused_clearly():
    with pytest.raises(EdgeLLMError, match="corrupt manifest .*'model'.*reconvert"):
        Manifest.from_json({k: v for k, v in VERSION_1.items() if k != "model"})
    with pytest.raises(EdgeLLMError, match="v0 is not edgellm-bundle v1/2/3/4; reconvert the model"):
        Manifest.from_json({**VERSION_1, "format_version": 0})
    # a bundle from a newer edgellm: upgrading is the fix, not reconverting
    with pytest.raises(EdgeLLMError, match=r"format v5, written by a newer edgellm \(edgellm 9\.0\); this one reads "
                                           r"up to v4: upgrade edgellm \(pip install -U edgellm\)"):
        Manifest.from_json({**VERSION_1, "format_version": 5, "created_by": "edgellm 9.0"})
    with pytest.raises(EdgeLLMError, match="is not edgellm-bundle"):
        Manifest.from_json(["not", "a", "manifest"])


def quantized(rows: int, k: int, bits: int, seed: int = 0) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    blocks = k // 32
    return QuantizedWeight(bits, 32, k, rng.integers(0, 1 << bits, (rows, blocks, 32), dtype=np.uint8),
                           rng.normal(size=(rows, blocks)).astype(np.float32))


def test_a_folder_is_written_with_checksums_and_refused_when_damaged(tmp_path):
    table = quantized(40, 64, 8)
    manifest = Manifest.from_json({**VERSION_1, "files": {}})
    manifest.embeddings = save_table(tmp_path, table, "w8")
    (tmp_path / "decoder.onnx").write_bytes(b"graph bytes")
    write_manifest(tmp_path, manifest)
    bundle = open_bundle(tmp_path)
    assert set(bundle.manifest.files) == {"decoder.onnx", "embed_tokens.npy", "embed_tokens.scales.npy"}
    assert all(entry.crc32 and entry.sha256 for entry in bundle.manifest.files.values())
    rows = EmbeddingTable(tmp_path, bundle.manifest.embeddings)
    np.testing.assert_array_equal(rows[[3, 0, 39]], table.dequantize()[[3, 0, 39]])
    (tmp_path / "decoder.onnx").write_bytes(b"graph bytez")  # same size, other bytes
    with pytest.raises(EdgeLLMError, match="CRC32 checksum does not match"):
        open_bundle(tmp_path)
    open_bundle(tmp_path, verify=False)  # sizes only
    (tmp_path / "decoder.onnx").write_bytes(b"graph")
    with pytest.raises(EdgeLLMError, match="truncated or replaced"):
        open_bundle(tmp_path, verify=False)


def test_table_rows_read_from_blocks_inside_another_file(tmp_path):
    """A tied table: 4-bit codes packed two per byte and their scales, in two row pieces at offsets of one file,
    times a multiplier the stored scales lack."""
    table = quantized(30, 64, 4, seed=1)
    pieces = [table.take_rows(slice(0, 16)), table.take_rows(slice(16, 30))]
    blob, refs = bytearray(b"\0" * 7), {"codes": [], "scales": []}
    for piece in pieces:
        for part, array in (("codes", piece.packed_codes()), ("scales", piece.scales)):
            refs[part].append(ArrayRef("data.bin", len(blob), array.dtype.name, list(array.shape)))
            blob += array.tobytes()
    (tmp_path / "data.bin").write_bytes(bytes(blob))
    entry = EmbeddingsEntry(bits=4, k=64, packed=True, multiplier=2.0, codes=refs["codes"], scales=refs["scales"])
    entry = EmbeddingsEntry.from_json(json.loads(json.dumps(entry.to_json())))
    rows = EmbeddingTable(tmp_path, entry)
    ids = np.array([29, 0, 16, 15])
    np.testing.assert_allclose(rows[ids], 2 * table.dequantize()[ids], rtol=1e-6)
    with pytest.raises(IndexError):
        rows[np.array([30])]


def test_a_vision_section_missing_a_setting_is_a_clear_error():
    from edgellm.models import vision_family

    with pytest.raises(EdgeLLMError, match="vision settings are incomplete .*tile_size.*reconvert"):
        vision_family("internvl").processor({"image_token": "<IMG_CONTEXT>"})
    with pytest.raises(EdgeLLMError, match="unknown model family 'llava'"):
        vision_family("llava")
