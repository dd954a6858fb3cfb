"""A sentencepiece `tokenizer.model` (the only tokenizer file of many remote-code checkpoints: InternLM2/3,
ChatGLM3, Llama 2-era models) read into the tokenizer.json that the runtime's `tokenizers` library loads.

The file is a protobuf ModelProto, read here field by field (no protobuf or sentencepiece package at run time):
its pieces (text, score, type), the trainer's model type and byte fallback, and the normalizer's dummy prefix and
whitespace rules. A BPE model becomes a `tokenizers` BPE whose merges are implied by the vocabulary (a piece's rank
is its place: sentencepiece merges the pair whose piece scores highest, and BPE vocabularies are stored best
first), with byte fallback, spaces as U+2581 and the dummy prefix before the text; control pieces (<s>, </s>) are
special added tokens, user-defined ones added tokens matched whole. Unigram models are refused.

Ids are sentencepiece's for any text except two edges, where they are what transformers' fast tokenizers give: a
text that starts with a space gets no second prefix space, and one that starts with an added token no lone prefix
piece before it (sentencepiece itself adds both).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from ..errors import EdgeLLMError
from .vocab import add_config_tokens, added_token, bos_prefix

SPM_SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise EdgeLLMError("truncated")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i = 0
    value: int | bytes
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise EdgeLLMError(f"wire type {wire}")
        if i > len(data):
            raise EdgeLLMError("truncated")
        yield field, value


def read_model(data: bytes) -> dict:
    """The parts of a ModelProto a tokenizer needs: pieces [(text, score, type)], model_type, byte_fallback,
    add_dummy_prefix, remove_extra_whitespaces, normalizer name."""
    model: dict[str, Any] = {"pieces": [], "model_type": 1, "byte_fallback": False, "add_dummy_prefix": True,
             "remove_extra_whitespaces": True, "normalizer": "identity"}
    for field, value in _fields(data):
        if field == 1:
            piece: dict[int, Any] = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
            piece.update(_fields(value))
            model["pieces"].append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0], piece[3]))
        elif field == 2:
            trainer = dict(_fields(value))
            model["model_type"] = trainer.get(3, 1)
            model["byte_fallback"] = bool(trainer.get(35, 0))
        elif field == 3:
            normalizer = dict(_fields(value))
            model["normalizer"] = normalizer.get(1, b"identity").decode("utf-8") or "identity"
            model["add_dummy_prefix"] = bool(normalizer.get(3, 1))
            model["remove_extra_whitespaces"] = bool(normalizer.get(4, 1))
    return model


def implied_merges(tokens: list[str]) -> list[list[str]]:
    """A sentencepiece BPE vocabulary stores no merges: every token that splits into two tokens is one, ranked by
    the merged token's place in the vocabulary (Gemma's scores do not follow the merge order; its token order
    does), and, for one merged token, the split with the longer left part first (transformers' rule)."""
    index = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for _rank, tok in sorted((i, t) for t, i in index.items()):
        for cut in range(len(tok) - 1, 0, -1):
            left, right = tok[:cut], tok[cut:]
            if left in index and right in index:
                merges.append([left, right])
    return merges


def tokenizer_json(data: bytes, where: str) -> dict:
    """tokenizer.json for the sentencepiece model `data` (read from `where`, named in messages)."""
    try:
        model = read_model(data)
    except (EdgeLLMError, UnicodeDecodeError, struct.error) as e:
        raise EdgeLLMError(f"{where}: not a readable sentencepiece model ({e})") from None
    if not model["pieces"]:
        raise EdgeLLMError(f"{where}: a sentencepiece model without pieces")
    if model["model_type"] != BPE:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(model["model_type"], str(model["model_type"]))
        raise EdgeLLMError(f"{where}: a sentencepiece {kind} model; edgellm reads sentencepiece BPE models (or a "
                           "tokenizer.json)")
    tokens = [text for text, _, _ in model["pieces"]]
    kinds = [kind for _, _, kind in model["pieces"]]
    unk = next((text for text, _, kind in model["pieces"] if kind == UNKNOWN), None)
    added = [added_token(i, tok, kind == CONTROL) for i, (tok, kind) in enumerate(zip(tokens, kinds))
             if kind in (CONTROL, USER_DEFINED)]
    # only normal pieces are merged into and from (a placeholder that joins nothing stands for the others)
    mergeable = [tok if kind == NORMAL else f"\0{i}\0" for i, (tok, kind) in enumerate(zip(tokens, kinds))]
    normalizers: list[dict[str, Any]] = []
    if model["normalizer"] in ("nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"):
        normalizers.append({"type": "NFKC"})  # (nmt_ also maps a few control characters; not repeated here)
    elif model["normalizer"] != "identity":
        raise EdgeLLMError(f"{where}: sentencepiece normalization {model['normalizer']!r} is not supported")
    if model["remove_extra_whitespaces"]:
        normalizers += [{"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},  # spaces only
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    prefix = model["add_dummy_prefix"]
    decoders = [{"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        # spaces as U+2581 and the dummy prefix at the start of the text only (not after an added token), without
        # splitting: sentencepiece merges across spaces where its vocabulary joins them
        "pre_tokenizer": {"type": "Metaspace", "replacement": SPM_SPACE, "prepend_scheme": "first" if prefix else
                          "never", "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": model["byte_fallback"],
                  "ignore_merges": False, "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": implied_merges(mergeable)},
    }


def checkpoint_tokenizer(data: bytes, where: str, tokenizer_config: dict) -> dict:
    """tokenizer_json() with what a checkpoint's tokenizer_config.json adds: tokens of `added_tokens_decoder` the
    model file lacks (a chat format's markers), and the BOS token before every text where `add_bos_token` (the
    default of sentencepiece-based tokenizers) asks for it."""
    tok = tokenizer_json(data, where)
    add_config_tokens(tok, tokenizer_config, where)
    vocab = tok["model"]["vocab"]
    bos = tokenizer_config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    if isinstance(bos, str) and bos in vocab and tokenizer_config.get("add_bos_token", True):
        tok["post_processor"] = bos_prefix(bos, vocab[bos])
    return tok
