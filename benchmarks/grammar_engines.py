"""Structured-output engines compared on the bundle's own tokenizer: the time to compile a JSON schema and the time
per decoded token to compute the allowed-token mask and advance, along a real JSON answer.

    .venv/bin/python benchmarks/grammar_engines.py BUNDLE [BUNDLE...]

Engines, each used when installed: llguidance (what edgellm uses), xgrammar, outlines-core. The answer is a fixed
JSON document of the schema, tokenized by the bundle; each engine walks it token by token (mask, then accept);
medians over the tokens, best of 3 walks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import cpu_flags  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "address", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                                      "city": {"type": "string"}},
                                     "required": ["street", "city"]},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "address": {"street": "12 St James's Square",
                                                                    "city": "London"},
                     "tags": ["mathematician", "writer", "analytical engine"]})


def walk(step, tokens) -> float:
    """Median seconds per token of step(token) (mask, then accept), best of 3 walks; step() raises if the engine
    refuses the answer's token."""
    best = None
    for _ in range(3):
        times = step(None, tokens)
        median = statistics.median(times)
        best = median if best is None else min(best, median)
    return best


def llguidance_engine(tokenizer_json: str, vocab: int, eos: int):
    import llguidance

    tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    bits = np.zeros((vocab + 31) // 32, np.int32)

    def compile_once():
        return llguidance.LLMatcher(tokenizer, grammar, log_level=0)

    def step(_, tokens):
        matcher, times = compile_once(), []
        for t in tokens:
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            assert (bits[t // 32] >> (t % 32)) & 1 and matcher.consume_token(t)
            times.append(time.perf_counter() - started)
        return times

    return compile_once, step


def xgrammar_engine(tokenizer_json: str, vocab: int, eos: int):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile_once():
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))

    def step(_, tokens):
        matcher, times = compile_once(), []
        for t in tokens:
            started = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(t)
            times.append(time.perf_counter() - started)
        return times

    return compile_once, step


def outlines_engine(tokenizer_json: str, vocab: int, eos: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_json)
    tokens: dict[bytes, list[int]] = {}
    for i in range(tokenizer.get_vocab_size()):
        if i == eos:
            continue
        piece = tokenizer.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass")
        tokens.setdefault(piece, []).append(i)
    vocabulary = Vocabulary(eos, {k: v for k, v in tokens.items() if k})
    regex = build_regex_from_schema(json.dumps(SCHEMA))

    def compile_once():
        return Guide(Index(regex, vocabulary))

    def step(_, answer):
        guide, times = compile_once(), []
        for t in answer:
            started = time.perf_counter()
            allowed = guide.get_tokens()
            assert t in allowed
            guide.advance(t)
            times.append(time.perf_counter() - started)
        return times

    return compile_once, step


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+")
    args = p.parse_args()
    from tokenizers import Tokenizer

    print(f"host: {cpu_flags()}\n")
    print("| bundle (vocabulary) | engine | tokenizer setup s | compile ms | mask + accept per token, us (median) |")
    print("|---|---|---:|---:|---:|")
    for bundle in args.bundles:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
        vocab, eos = manifest["model"]["vocab_size"], manifest["tokens"]["eos_token_ids"][0]
        tokenizer_json = str(Path(bundle) / "tokenizer.json")
        answer = Tokenizer.from_file(tokenizer_json).encode(ANSWER, add_special_tokens=False).ids
        for name, make in ENGINES.items():
            try:
                started = time.perf_counter()
                compile_once, step = make(tokenizer_json, vocab, eos)
                setup = time.perf_counter() - started
            except ImportError:
                print(f"| {Path(bundle).name} | {name} | not installed | | |")
                continue
            started = time.perf_counter()
            compile_once()
            compiled = time.perf_counter() - started
            try:
                per_token = walk(step, answer)
                print(f"| {Path(bundle).name} ({vocab:,}) | {name} | {setup:.2f} | {compiled * 1e3:.1f} | "
                      f"{per_token * 1e6:.0f} |")
            except AssertionError:
                print(f"| {Path(bundle).name} ({vocab:,}) | {name} | {setup:.2f} | {compiled * 1e3:.1f} | "
                      "refused the answer's tokens |")


if __name__ == "__main__":
    main()
