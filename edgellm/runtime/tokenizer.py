"""The bundle's tokenizer (tokenizers' Rust implementation) and UTF-8-safe streaming detokenization."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from ..errors import EdgeLLMError


def check_text(text: str, what: str = "the text") -> int:
    """Text the tokenizer can take: str, encodable as UTF-8 (a lone surrogate such as "\\ud800", which JSON and
    Python allow and undecodable command-line bytes become, is not); returns its size in UTF-8 bytes."""
    if not isinstance(text, str):
        raise EdgeLLMError(f"{what} must be a string, got {type(text).__name__}")
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise EdgeLLMError(f"{what} is not valid Unicode: {e.object[e.start:e.end]!r} at character {e.start} "
                           "(a lone surrogate, or bytes that are not UTF-8)") from None


class Tokenizer:
    def __init__(self, path: Path):
        self._tok = _Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @cached_property
    def longest_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for: its string's own UTF-8 length (byte-level
        BPE writes each byte as one character of one or two bytes, SentencePiece a space as the 3-byte "▁").
        A text over n times this many bytes (doubled for normalizers that drop characters) has more than n tokens:
        a prompt's length is bounded before it is tokenized."""
        return max(len(token.encode("utf-8")) for token in self.vocabulary)

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
        """What is still held back at the end, less an incomplete last character (an answer cut by its length
        inside a multi-byte character ends before it rather than with U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset: self.read_offset])
        now = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before):].rstrip("\ufffd")
