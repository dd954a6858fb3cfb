"""Reading a GGUF file as a Hugging Face-style source: config from metadata, tensors under HF names, tokenizer.

Quantized blocks that MatMulNBits can express exactly are decoded into integer codes + scales (+ mins) and kept
as they are (see quantize.QuantizedWeight; the table of types is in docs/gguf-types.md); every other type (the IQ
formats, TQ, MXFP4...) is dequantized by the gguf package and quantized again, which the converter warns of.
"""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..checkpoint import ModelSource
from ..errors import EdgeLLMError
from ..format import QuantizedWeight
from ..modeling.family import GGUFNames
from ..models import gguf_family
from .sentencepiece import SPM_SPACE, implied_merges
from .tiktoken_file import CL100K_SPLIT
from .vocab import added_token, bos_prefix

# Tensors outside the layers, named alike by every family (the layers' names are each family's GGUFNames)

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs.weight",
                 "rope_factors_long.weight": "rope_factors_long.weight",
                 "rope_factors_short.weight": "rope_factors_short.weight"}


def hf_name(gguf_name: str, names: Mapping[str, str]) -> str | None:
    """The Hugging Face name of a GGUF tensor, given a family's layer names; None for tensors edgellm skips."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


class GGUFSource(ModelSource):
    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ImportError as e:  # pragma: no cover - an install problem, not a code path
            raise EdgeLLMError("reading GGUF files needs the 'gguf' package: pip install 'edgellm[convert]'") from e
        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # the gguf package raises bare ValueError/struct errors on corrupt files
            raise EdgeLLMError(f"{path}: not a readable GGUF file ({e})") from e
        self.path = path
        self._file_map: mmap.mmap = self.reader.data._mmap  # type: ignore[attr-defined]  # the reader's map of the file
        self.meta = {name: _field_value(field) for name, field in self.reader.fields.items()
                     if not name.startswith("tokenizer.ggml.") or name in _SMALL_TOKENIZER_FIELDS}
        self.arch = str(self.meta.get("general.architecture"))
        try:
            self.family = gguf_family(self.arch)
        except EdgeLLMError as e:
            raise EdgeLLMError(f"{path}: {e}") from None
        assert self.family.gguf is not None  # gguf_family() finds only families with GGUF names
        self.names_in_file: GGUFNames = self.family.gguf
        self._tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name, self.names_in_file.layers)
            if name is not None:
                self._tensors[name] = t
        self.config = self._hf_config()

    def block_types(self) -> set[str]:
        """The GGML types of the file's quantized tensors (Q4_0, Q8_0, Q6_K...)."""
        return {t.tensor_type.name for t in self._tensors.values() if t.tensor_type.name not in ("F32", "F16", "BF16")}

    def rerounded_types(self) -> set[str]:
        return self.block_types() - set(_BLOCK_DECODERS)

    # --- config --------------------------------------------------------------------------------
    def _hf_config(self) -> dict:
        a, m = self.arch, self.meta
        heads = m[f"{a}.attention.head_count"]
        config = {
            "architectures": [self.family.architectures[0]],
            "hidden_size": m[f"{a}.embedding_length"],
            "num_hidden_layers": m[f"{a}.block_count"],
            "intermediate_size": m[f"{a}.feed_forward_length"],
            "num_attention_heads": heads,
            "num_key_value_heads": m.get(f"{a}.attention.head_count_kv", heads),
            "head_dim": m.get(f"{a}.attention.key_length", m[f"{a}.embedding_length"] // heads),
            "rms_norm_eps": m[f"{a}.attention.layer_norm_rms_epsilon"],
            "max_position_embeddings": m.get(f"{a}.context_length", 4096),
            "vocab_size": len(self.reader.fields["tokenizer.ggml.tokens"].data),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "rope_theta": m.get(f"{a}.rope.freq_base", 10000.0),
        }
        scaling = m.get(f"{a}.rope.scaling.type")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": m[f"{a}.rope.scaling.factor"]}
        elif scaling not in (None, "none"):
            raise EdgeLLMError(f"{self.path}: rope scaling {scaling!r} is not supported yet")
        if "rope_freqs.weight" in self._tensors:  # Llama 3.x: per-frequency divisors stored as a tensor
            config["rope_scaling"] = {"rope_type": "freq_factors", "factors": self._vector("rope_freqs.weight")}
        if "rope_factors_long.weight" in self._tensors:  # LongRoPE (Phi-3, MiniCPM): its two factor lists as tensors
            config["rope_scaling"] = {
                "rope_type": "longrope", "long_factor": self._vector("rope_factors_long.weight"),
                "short_factor": self._vector("rope_factors_short.weight"),
                "original_max_position_embeddings": m.get(f"{a}.rope.scaling.original_context_length")}
        rotary = m.get(f"{a}.rope.dimension_count")
        if rotary and rotary != config["head_dim"]:  # partial rotary
            config["partial_rotary_factor"] = rotary / config["head_dim"]
        if m.get(f"{a}.attention.sliding_window"):
            config["sliding_window"] = m[f"{a}.attention.sliding_window"]
        config.update(self.names_in_file.config(m, config))
        return config

    def _vector(self, name: str) -> list[float]:
        """A small float tensor the config is made of (read before the config exists, so not through raw())."""
        return _dequantize(self._tensors[name]).reshape(-1).tolist()

    # --- weights -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str):
        if name not in self._tensors:
            raise EdgeLLMError(f"{self.path}: tensor {name} not found in the GGUF file")
        return self._tensors[name]

    def raw(self, name: str) -> np.ndarray:
        t = self._get(name)
        try:
            floats = _dequantize(t)
        except NotImplementedError:
            raise EdgeLLMError(f"{self.path}: tensor {name} is {t.tensor_type.name}, which the gguf package cannot "
                               "decode; convert a GGUF of another type, or the float checkpoint") from None
        value = self.names_in_file.tensor(name, floats, self.config)
        self._release(t)
        return value

    def linear(self, name: str) -> np.ndarray | QuantizedWeight:
        t = self._get(name)
        decode = _BLOCK_DECODERS.get(t.tensor_type.name)
        if decode is None:
            return self.tensor(name)
        rows = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        value = self.names_in_file.tensor(name, decode(rows, int(t.shape[0])), self.config)
        self._release(t)
        return value

    def _release(self, t) -> None:
        """Drop the mapped pages of a tensor once it is decoded (the file stays in the page cache): otherwise each
        one read stays in the process's resident set, and the whole file by the end of the conversion."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: the pages stay
            return
        start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        end = int(t.data_offset) + int(t.n_bytes)
        self._file_map.madvise(mmap.MADV_DONTNEED, start, end - start)

    # --- tokenizer and templates ---------------------------------------------------------------
    def tokenizer_json(self) -> str:
        return json.dumps(gguf_tokenizer(self.reader, self.meta, self.names_in_file.merges_by_rank))

    def tokenizer_config(self) -> dict:
        tokens = self.reader.fields["tokenizer.ggml.tokens"]
        token = lambda key: (_token_text(tokens, self.meta[key]) if key in self.meta else None)  # noqa: E731
        return {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
                "add_bos_token": bool(self.meta.get("tokenizer.ggml.add_bos_token", False))}

    def chat_template(self) -> str | None:
        return self.meta.get("tokenizer.chat_template")

    def generation_config(self) -> dict:
        eos = [self.meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if k in self.meta]
        config = {"eos_token_id": sorted(set(eos))}
        if "tokenizer.ggml.bos_token_id" in self.meta:
            config["bos_token_id"] = self.meta["tokenizer.ggml.bos_token_id"]
        return config


_SMALL_TOKENIZER_FIELDS = {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                           "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                           "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                           "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                           "tokenizer.ggml.add_space_prefix"}


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # exotic field types we never read
        return None


def _token_text(tokens_field, index: int) -> str:
    return bytes(tokens_field.parts[tokens_field.data[index]]).decode("utf-8", errors="replace")


def _dequantize(t) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    data = np.asarray(t.data)
    kind = t.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        out = data
    else:
        out = quants.dequantize(data, kind)
    return np.asarray(out, np.float32).reshape([int(d) for d in reversed(t.shape)])


# --- block decoders: raw GGUF rows [N, bytes] -> QuantizedWeight ---------------------------------
def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _blocks(rows: np.ndarray, k: int, block_bytes: int, block: int) -> np.ndarray:
    return rows.reshape(rows.shape[0], k // block, block_bytes)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs element j in the low nibble and j + half in the high nibble of byte j."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(rows, k):
    b = _blocks(rows, k, 18, 32)
    return QuantizedWeight(4, 32, k, _split_nibbles(b[..., 2:]), _f16(b[..., 0:2]))


def _q5_0(rows, k):
    b = _blocks(rows, k, 22, 32)
    q = _split_nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6], 32) << 4)
    return _symmetric(5, 32, k, q.astype(np.int16) - 16, _f16(b[..., 0:2]))


def _q5_1(rows, k):
    b = _blocks(rows, k, 24, 32)
    q = _split_nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8], 32) << 4)
    return _centered(5, 32, k, q, _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _centered(bits, block, k, codes, scales, mins) -> QuantizedWeight:
    """w = s*q + m, rewritten as s*(q - mid) + (m + mid*s): the same weight, but the integer part is centred like a
    symmetric block. With int8 activations (accuracy_level 4) an uncentred s*q term is large and the float min term
    cancels most of it, which leaves the rounding error of the large term behind (docs/benchmarks.md)."""
    mid = 1 << (bits - 1)
    return _symmetric(bits, block, k, codes.astype(np.int16) - mid, scales, mins + mid * scales)


def _symmetric(bits, block, k, signed_codes, scales, mins=None) -> QuantizedWeight:
    """w = s*q (+ m) with q centred on 0. MatMulNBits holds 4- or 8-bit codes around their midpoint (the default
    zero point); 5- and 6-bit codes widen to 8 bits, exactly."""
    store = 4 if bits <= 4 else 8
    codes = (signed_codes.astype(np.int16) + (1 << (store - 1))).astype(np.uint8)
    return QuantizedWeight(store, block, k, codes, scales, None, mins)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit e of the little-endian bit field `qh` (bytes on the last axis) for e < count, as 0/1 bytes."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")[..., :count]


def _q4_1(rows, k):
    b = _blocks(rows, k, 20, 32)
    return _centered(4, 32, k, _split_nibbles(b[..., 4:]), _f16(b[..., 0:2]), _f16(b[..., 2:4]))


def _q8_0(rows, k):
    b = _blocks(rows, k, 34, 32)
    return _symmetric(8, 32, k, b[..., 2:].view(np.int8), _f16(b[..., 0:2]))


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scales and mins of the 8 sub-blocks of a Q4_K/Q5_K super-block (12 bytes)."""
    q = scales.astype(np.uint8)
    sc = np.empty(q.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = q[..., 0:4] & 63
    mn[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant(b, k, qs, qh=None):
    """Q4_K / Q5_K super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales and mins; `qs` holds 4 chunks of 64
    elements (low nibbles, then high nibbles), `qh` (Q5_K) bit s of byte l is the fifth bit of sub-block s, row l."""
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales_mins(b[..., 4:16])
    qs = qs.reshape(*b.shape[:2], 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(*b.shape[:2], 8, 32)
    bits = 4
    if qh is not None:
        codes = codes | (np.unpackbits(qh[..., None], axis=-1, bitorder="little").swapaxes(-1, -2) << 4)
        bits = 5
    scales = (d[..., None] * sc).reshape(b.shape[0], -1)
    mins = (-dmin[..., None] * mn).reshape(b.shape[0], -1)
    return _centered(bits, 32, k, codes.reshape(b.shape[0], -1, 32), scales, mins)


def _q4_k(rows, k):
    b = _blocks(rows, k, 144, 256)
    return _k_quant(b, k, b[..., 16:])


def _q5_k(rows, k):
    b = _blocks(rows, k, 176, 256)
    return _k_quant(b, k, b[..., 48:], b[..., 16:48])


def _q6_k(rows, k):
    b = _blocks(rows, k, 210, 256)
    ql, qh = b[..., 0:128].reshape(*b.shape[:2], 2, 64), b[..., 128:192].reshape(*b.shape[:2], 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    lo = np.concatenate([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-1)
    hi = np.concatenate([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], axis=-1)
    q = (lo | (hi << 4)).astype(np.int16) - 32  # [N, superblocks, 2, 128], values -32..31
    scales = (d[..., None] * sc).reshape(b.shape[0], -1)
    return _symmetric(6, 16, k, q.reshape(b.shape[0], -1, 16), scales)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K's low bits: 64 bytes holding 256 2-bit values, element 128c + 32s + j in bits 2s of byte 32c + j."""
    chunks = qs.reshape(*qs.shape[:-1], 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return (chunks & 3).reshape(*qs.shape[:-1], 256)


def _q2_k(rows, k):
    """Q2_K super-blocks of 256: 16 sub-blocks of 16 with 4-bit scales and mins under float16 d and dmin, 2-bit
    codes: w = d*sc*q - dmin*m, kept as 4-bit codes with a float min per block of 16."""
    b = _blocks(rows, k, 84, 256)
    sc, d, dmin = b[..., 0:16], _f16(b[..., 80:82]), _f16(b[..., 82:84])
    scales = (d[..., None] * (sc & 0x0F).astype(np.float32)).reshape(b.shape[0], -1)
    mins = (-dmin[..., None] * (sc >> 4).astype(np.float32)).reshape(b.shape[0], -1)
    return _centered(2, 16, k, _two_bit_planes(b[..., 16:80]).reshape(b.shape[0], -1, 16), scales, mins)


def _q3_k(rows, k):
    """Q3_K super-blocks of 256: 16 sub-blocks of 16 with 6-bit signed scales under a float16 d, 3-bit codes (two
    low bits, and a high bit in `hmask` that, when clear, subtracts 4): w = d*(sc - 32)*q, kept as 4-bit codes."""
    b = _blocks(rows, k, 110, 256)
    low = _two_bit_planes(b[..., 32:96])
    high = (b[..., 0:32].reshape(*b.shape[:2], 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    q = low.astype(np.int16) - 4 * (1 - high.reshape(*b.shape[:2], 256).astype(np.int16))
    packed = b[..., 96:108]
    lo = (packed[..., :8].reshape(*b.shape[:2], 1, 8) >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F
    hi = (packed[..., 8:].reshape(*b.shape[:2], 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    sc = (lo.reshape(*b.shape[:2], 16) | (hi.reshape(*b.shape[:2], 16) << 4)).astype(np.int16) - 32
    scales = (_f16(b[..., 108:110])[..., None] * sc.astype(np.float32)).reshape(b.shape[0], -1)
    return _symmetric(3, 16, k, q.reshape(b.shape[0], -1, 16), scales)


_BLOCK_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
                   "Q5_K": _q5_k, "Q6_K": _q6_k, "Q2_K": _q2_k, "Q3_K": _q3_k}


# --- tokenizer ---------------------------------------------------------------------------------
# tokenizer.ggml.pre -> the split regex of the original Hugging Face tokenizer (None: GPT-2's own)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str | None) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    split = {"llama-bpe": CL100K_SPLIT, "llama3": CL100K_SPLIT, "qwen2": _QWEN2_SPLIT,
             "deepseek-r1-qwen": _QWEN2_SPLIT}
    if pre not in split:
        raise EdgeLLMError(f"GGUF pre-tokenizer {pre!r} is not supported yet")
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split[pre]}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]}


def gguf_tokenizer(reader, meta: dict, merges_by_rank: bool = False) -> dict:
    """A tokenizer.json equivalent to the GGUF's vocabulary: byte-level BPE ("gpt2") or Gemma's sentencepiece BPE."""
    model = meta.get("tokenizer.ggml.model")
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [_token_text(tokens_field, i) for i in range(len(tokens_field.data))]
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else [1] * len(tokens)
    if model == "gpt2":
        merges_field = reader.fields["tokenizer.ggml.merges"]
        merges = [_token_text(merges_field, i).split(" ", 1) for i in range(len(merges_field.data))]
        parts = _byte_level_parts(meta.get("tokenizer.ggml.pre"))
    elif model == "llama" and merges_by_rank:
        # runs of spaces are stored as spaces but looked up as U+2581 runs, as ordinary vocabulary, not added tokens
        spaces = [bool(t) and not t.strip(" ") for t in tokens]
        tokens = [SPM_SPACE * len(t) if space else t for t, space in zip(tokens, spaces)]
        types = [1 if space else kind for kind, space in zip(types, spaces)]
        merges = implied_merges(tokens)
        parts = _SENTENCEPIECE_PARTS
    else:
        raise EdgeLLMError(f"GGUF tokenizer model {model!r} is not supported yet (supported: gpt2 byte-level BPE, "
                           "and sentencepiece vocabularies whose merges follow the token order, as Gemma 3's)")
    # llama.cpp's CONTROL tokens (3) are special; USER_DEFINED ones (4, e.g. "\n\n" in Gemma) always match whole
    added = [added_token(i, tok, kind == 3) for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)]
    post = None
    if meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        post = bos_prefix(tokens[bos_id], bos_id)
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
           "vocab": {tok: i for i, tok in enumerate(tokens)}, "merges": merges}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "post_processor": post, **parts, "model": {**bpe, **parts.get("model", {})}}


def _byte_level_parts(pre: str | None) -> dict:
    return {"pre_tokenizer": _byte_level_pre_tokenizer(pre),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}


# Gemma's tokenizer: spaces written as U+2581, no prefix space, BPE with unknown bytes spelled <0xNN>
_SENTENCEPIECE_PARTS = {
    "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE},
    "pre_tokenizer": None,
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"}]},
    "model": {"unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True},
}
