"""Structured output: answers that are JSON, or JSON that follows a schema, by masking each step's logits to the
tokens a grammar engine allows. The engine is llguidance (the one llama.cpp and onnxruntime-genai use; the
comparison with xgrammar and outlines-core is in docs/benchmarks.md), an optional extra:
`pip install 'edgellm[structured]'`."""

from __future__ import annotations

import json

import numpy as np

from ..errors import EdgeLLMError

ANY_OBJECT = {"type": "object"}  # OpenAI's json_object: any JSON object
# Between JSON tokens: a line break with an indent, and a space; never a run without end (a small model held to
# JSON otherwise may write whitespace until its token limit).
WHITESPACE = r"(\n {0,32})? ?"


def grammar_tokenizer(tokenizer_json: str, eos_token_ids: list[int], vocab_size: int):
    """llguidance's view of the bundle's tokenizer (built once per model: a large vocabulary takes a fraction of a
    second)."""
    try:
        import llguidance
    except ImportError:
        raise EdgeLLMError("structured output needs llguidance: pip install 'edgellm[structured]'") from None
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))


class JsonConstraint:
    """Masks logits to what keeps the answer a prefix of valid JSON for `schema` (a dict; ANY_OBJECT for any
    object), or of the Lark grammar `lark` (llguidance's dialect, which embeds schemas as %json); once that is
    complete only an end-of-sequence token is allowed."""

    def __init__(self, tokenizer, schema: dict | None, vocab_size: int, lark: str | None = None):
        import llguidance

        what = "the JSON schema" if lark is None else "the tool-call grammar"
        try:
            if lark is None:
                assert schema is not None  # (a schema, or a grammar)
                schema = {**schema, "x-guidance": schema.get("x-guidance", {"whitespace_pattern": WHITESPACE})}
                grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except (TypeError, ValueError, RuntimeError) as e:
            raise EdgeLLMError(f"{what} cannot be used: {e}") from None
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise EdgeLLMError(f"{what} cannot be used: {self.matcher.get_error()}")
        self.bits = np.zeros((vocab_size + 31) // 32, np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar does not allow next set to -inf (in place)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: len(logits)].astype(bool)
        logits[~allowed] = -np.inf
        return logits

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise EdgeLLMError(f"structured output: the grammar refused token {token} ({self.matcher.get_error()})")


def schema_of(json_schema) -> dict:
    """generate(json_schema=...): True for any JSON object, or a schema (dict, or its JSON text)."""
    if json_schema is True:
        return ANY_OBJECT
    if isinstance(json_schema, str):
        try:
            json_schema = json.loads(json_schema)
        except json.JSONDecodeError as e:
            raise EdgeLLMError(f"json_schema is not valid JSON ({e})") from None
    if not isinstance(json_schema, dict):
        raise EdgeLLMError(f"json_schema must be True or a JSON schema object, got {type(json_schema).__name__}")
    return json_schema
