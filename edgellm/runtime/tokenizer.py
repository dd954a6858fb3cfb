"""The bundle's tokenizer (tokenizers' Rust implementation) and UTF-8-safe streaming detokenization."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer


class Tokenizer:
    def __init__(self, path: Path):
        self._tok = _Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def vocabulary(self) -> dict[str, int]:
        """Token -> id, added tokens included (built once: a large vocabulary takes a while)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back bytes of an unfinished UTF-8 character.

    Decoding a window that starts a few tokens back (not each token alone) keeps the spaces and merges that
    depend on the neighbouring token right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset])
        now = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes as U+FFFD, honestly)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset])
        now = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before):]
