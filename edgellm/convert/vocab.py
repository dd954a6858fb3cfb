"""Pieces of a tokenizer.json that the readers of other vocabularies (GGUF metadata, a sentencepiece model, a
tiktoken file) write alike."""

from __future__ import annotations

from ..errors import EdgeLLMError


def added_token(token_id: int, content: str, special: bool) -> dict:
    """A token matched whole in the text, before the model splits the rest (`special`: dropped when decoding)."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def bos_prefix(bos: str, bos_id: int) -> dict:
    """The post-processor that puts the BOS token before every text (and before the first of a pair)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def add_config_tokens(tok: dict, tokenizer_config: dict, where: str) -> None:
    """Add to `tok` the tokens of tokenizer_config.json's `added_tokens_decoder` it lacks (a chat format's markers,
    which remote-code tokenizers add beside their vocabulary file)."""
    vocab, known = tok["model"]["vocab"], {a["id"] for a in tok["added_tokens"]}
    for key, entry in sorted((tokenizer_config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if int(key) not in known and isinstance(entry, dict) and entry.get("content"):
            if int(key) < len(vocab) and entry["content"] not in vocab:
                raise EdgeLLMError(f"{where}: tokenizer_config.json names token {key} {entry['content']!r}, which the "
                                   "vocabulary file holds as another piece")
            tok["added_tokens"].append(added_token(int(key), entry["content"], bool(entry.get("special", True))))
