"""A checkpoint whose only tokenizer is sentencepiece's tokenizer.model (InternLM2/3, ChatGLM3, Llama 2-era models):
edgellm reads the protobuf itself and gives the ids the sentencepiece library gives (the oracle here)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

import edgellm
from edgellm.errors import EdgeLLMError
from helpers import CORPUS

sentencepiece = pytest.importorskip("sentencepiece", reason="the oracle: pip install sentencepiece")


def train(model_type: str = "bpe", **options) -> bytes:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text().splitlines()), model_writer=model, vocab_size=400,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity", minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], **options)
    return model.getvalue()


TEXTS = [*CORPUS.read_text().splitlines()[:60], "Hello  world, é😀 ünïcödé ß 中文", "tabs\tand\nlines\n\n",
         "x<|im_end|>y", "hi<|im_start|>user\nhow are you?<|im_end|>\n", "trailing spaces   "]


@pytest.mark.parametrize("options", [dict(add_dummy_prefix=True, remove_extra_whitespaces=False),
                                     dict(add_dummy_prefix=False, remove_extra_whitespaces=True)])
def test_sentencepiece_bpe_models_tokenize_as_sentencepiece_does(options):
    from tokenizers import Tokenizer

    from edgellm.convert.sentencepiece import tokenizer_json

    data = train(**options)
    oracle = sentencepiece.SentencePieceProcessor(model_proto=data)
    tok = Tokenizer.from_str(json.dumps(tokenizer_json(data, "tokenizer.model")))
    assert tok.get_vocab_size() == oracle.vocab_size()
    for text in TEXTS:
        want = oracle.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == want, text
        assert tok.decode(want, skip_special_tokens=False) == oracle.decode(want), text
    # the two edges where transformers' fast tokenizers (and edgellm) differ from the library: no second prefix
    # space before a leading space, no lone prefix piece before a leading added token
    if options["add_dummy_prefix"]:
        assert tok.encode(" x", add_special_tokens=False).ids == oracle.encode(" x")[1:]
        assert tok.encode("<|im_end|>x", add_special_tokens=False).ids == oracle.encode("<|im_end|>x")[1:]


def test_a_folder_with_only_tokenizer_model_converts(tiny, tmp_path):
    _, folder = tiny("llama")
    out = tmp_path / "spm"
    shutil.copytree(folder, out)
    (out / "tokenizer.json").unlink()
    data = train(add_dummy_prefix=True, remove_extra_whitespaces=False)
    (out / "tokenizer.model").write_bytes(data)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>", "bos_token": "<s>",
                                                           "add_bos_token": True}))
    model = edgellm.load(edgellm.convert(out, tmp_path / "bundle", quantize="f32", seq_length=64, progress=False))
    oracle = sentencepiece.SentencePieceProcessor(model_proto=data)
    text = CORPUS.read_text()[:300]
    assert model.tokenizer.encode(text) == [oracle.bos_id(), *oracle.encode(text)]  # add_bos_token
    assert model.tokenizer.encode(text, add_special_tokens=False) == oracle.encode(text)
    assert model.prompt_ids("Hi") == model.tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                                                            add_special_tokens=False)
    assert np.isfinite(model.logits(model.tokenizer.encode(text)[:20])).all()


def test_unreadable_or_unigram_models_are_one_clear_error(tmp_path):
    from edgellm.convert.sentencepiece import tokenizer_json

    with pytest.raises(EdgeLLMError, match="a sentencepiece unigram model; edgellm reads sentencepiece BPE"):
        tokenizer_json(train("unigram"), "tokenizer.model")
    with pytest.raises(EdgeLLMError, match="not a readable sentencepiece model"):
        tokenizer_json(b"\x0a\xff\xff\xff", "tokenizer.model")


def tiktoken_ranks(folder) -> dict[bytes, int]:
    """The test tokenizer's byte-level BPE as tiktoken ranks: the 256 bytes, then each merge's result in order."""
    from edgellm.convert.tiktoken_file import _byte_alphabet

    unspell = {c: b for b, c in _byte_alphabet().items()}
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in (m.split(" ") if isinstance(m, str) else m for m in model["merges"]):
        token = bytes(unspell[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def test_a_tiktoken_file_tokenizes_as_tiktoken_does(tiny, tmp_path):
    """glm-4-9b-chat's tokenizer.model is a tiktoken file: read into a byte-level BPE with the same ids as the
    tiktoken library's (the oracle), its special tokens from tokenizer_config.json."""
    import base64

    tiktoken = pytest.importorskip("tiktoken", reason="the oracle: pip install tiktoken")
    from tokenizers import Tokenizer

    from edgellm.convert.tiktoken_file import CL100K_SPLIT, tokenizer_json

    _, folder = tiny("llama")
    ranks = tiktoken_ranks(folder)
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                      key=lambda kv: kv[1])))
    specials = {"<|user|>": len(ranks), "<|assistant|>": len(ranks) + 1}
    oracle = tiktoken.Encoding("test", pat_str=CL100K_SPLIT, mergeable_ranks=ranks, special_tokens=specials)
    config = {"added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in specials.items()}}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json(path, config)))
    for text in TEXTS + ["numbers 1234567 and   spaces\n\n\tend", "<|user|>hi<|assistant|>"]:
        assert tok.encode(text, add_special_tokens=False).ids == oracle.encode(text, allowed_special="all"), text
        assert tok.decode(oracle.encode(text, allowed_special="all"), skip_special_tokens=False) == text
