"""A tiktoken vocabulary file as `tokenizer.model` (glm-4-9b-chat's remote code, and others): one
"<base64 token> <rank>" line per token, read into the byte-level BPE tokenizer.json the runtime loads.

tiktoken encodes a piece whole when it is a token, else merges the lowest-ranked pair of its parts until none
merges; the same tokenizer as a BPE has each token of two or more bytes as the merge of the two parts that merging
its bytes by rank ends with (ranked by the token's own rank), and `ignore_merges` for whole-token pieces. Pieces
are split by the cl100k pattern (GLM-4's), then spelled in GPT-2's byte-to-character alphabet.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

from ..errors import EdgeLLMError
from .vocab import add_config_tokens

# the cl100k pre-tokenization pattern (Llama 3 and GLM-4 use it too)
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+$")


def is_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        return bool(_LINE.match(f.readline().strip()))


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters (what byte-level BPE vocabularies are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that merging `token`'s bytes by rank (only ranks below its own) ends with."""
    parts, limit = [token[i:i + 1] for i in range(len(token))], ranks[token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise EdgeLLMError(f"token {token!r} cannot be made by merging tokens of lower rank")
    return parts[0], parts[1]


def tokenizer_json(path: Path, tokenizer_config: dict) -> dict:
    ranks: dict[bytes, int] = {}
    try:
        for number, line in enumerate(path.read_bytes().splitlines(), 1):  # noqa: B007 (the error names it)
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error) as e:
        raise EdgeLLMError(f"{path}: line {number} is not '<base64 token> <rank>' ({e})") from None
    alphabet = _byte_alphabet()
    spell = lambda b: "".join(alphabet[x] for x in b)  # noqa: E731
    merges = [[spell(left), spell(right)] for token in sorted(ranks, key=ranks.__getitem__) if len(token) > 1
              for left, right in [_last_merge(token, ranks)]]
    vocab = {spell(token): rank for token, rank in ranks.items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    tok: dict = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": CL100K_SPLIT}, "behavior": "Isolated", "invert": False},
               byte_level]},
           "post_processor": None, "decoder": {**byte_level, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                     "vocab": vocab, "merges": merges}}
    add_config_tokens(tok, tokenizer_config, str(path))
    return tok
