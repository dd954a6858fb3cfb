"""Runtime behaviour: streaming, sampling, stop strings, the CLI, and clear errors on bad input."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest

import edgellm
from edgellm.cli import main
from edgellm.errors import EdgeLLMError
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.runtime.tokenizer import StreamDecoder


class ByteTokenizer:
    """Each id is one UTF-8 byte: the worst case for streaming multi-byte characters."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_decoder_never_emits_broken_utf8():
    text = "naïve café 東京 🙂 ok"
    decoder = StreamDecoder(ByteTokenizer())
    pieces = [decoder.push(b) for b in text.encode("utf-8")] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_pieces_join_to_the_generated_text(bundle):
    model = edgellm.load(bundle("llama", "f32"))
    pieces = list(model.stream("We hold these truths", max_new_tokens=20))
    assert "".join(pieces) == model.last_result.text
    assert model.last_result.text == model.tokenizer.decode(model.last_result.token_ids)


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = lambda **kw: [Sampler(SamplingParams(temperature=1.0, seed=7, **kw))(logits, []) for _ in range(1)]  # noqa
    assert draws() == draws()
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.6, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}  # 0.5 < 0.6: the token crossing top_p is kept
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}  # 0.3 >= 0.5 * 0.5
    assert Sampler(SamplingParams(temperature=0.0))(logits, []) == 0
    penalised = Sampler(SamplingParams(temperature=0.0, repetition_penalty=10.0))
    assert penalised(logits, [0]) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-0.5), dict(temperature=float("nan")), dict(top_k=-1),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2.0),
                                 dict(repetition_penalty=0.0), dict(seed=-1)])
def test_out_of_range_sampling_is_refused(bad, bundle):
    name = next(iter(bad))
    with pytest.raises(EdgeLLMError, match=f"^{name} must be"):
        SamplingParams(**bad)
    model = edgellm.load(bundle("qwen2", "f32"))
    with pytest.raises(EdgeLLMError, match=f"^{name} must be"):
        model.generate("Liberty", max_new_tokens=4, **bad)
    with pytest.raises(EdgeLLMError, match=f"^{name} must be"):
        model.chat(**bad)  # when the conversation starts, not at its first answer
    with pytest.raises(EdgeLLMError, match="max_new_tokens must be 0 or more"):
        model.generate("Liberty", max_new_tokens=-1)
    assert model.generate("Liberty", max_new_tokens=0).token_ids == []


def test_sampled_generation_is_reproducible_with_a_seed(bundle):
    model = edgellm.load(bundle("qwen2", "f32"))
    a = model.generate("Liberty", max_new_tokens=16, temperature=0.9, top_p=0.95, seed=3, ignore_eos=True)
    b = model.generate("Liberty", max_new_tokens=16, temperature=0.9, top_p=0.95, seed=3, ignore_eos=True)
    c = model.generate("Liberty", max_new_tokens=16, temperature=0.9, top_p=0.95, seed=4, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    assert a.token_ids != c.token_ids


def test_stop_strings_cut_the_answer(bundle):
    model = edgellm.load(bundle("llama", "f32"))
    full = model.generate("Four score", max_new_tokens=24, ignore_eos=True).text
    stop = full[5:8]
    assert stop and stop in full
    result = model.generate("Four score", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert result.text == full[: full.index(stop)] and result.finish_reason == "stop"


def test_prompt_prefix_is_reused(bundle):
    model = edgellm.load(bundle("llama", "f32"))
    first = model.generate("He has refused his Assent to Laws", max_new_tokens=4)
    again = model.generate("He has refused his Assent to Laws, the most wholesome", max_new_tokens=4)
    assert first.reused_tokens == 0 and again.reused_tokens > 5
    fresh = edgellm.load(bundle("llama", "f32")).generate("He has refused his Assent to Laws, the most wholesome",
                                                          max_new_tokens=4)
    assert fresh.token_ids == again.token_ids


def test_chat_drops_oldest_turns_when_the_context_is_full(bundle):
    model = edgellm.load(bundle("llama", "f32", seq_length=96))
    chat = model.chat(max_new_tokens=8)
    for i in range(8):
        chat.send(f"turn {i}: When in the Course of human events")
    assert chat.dropped_turns > 0
    assert chat.messages[-1]["role"] == "assistant"
    last = chat.last_result
    assert last.prompt_tokens + len(last.token_ids) <= model.seq_length


# --- bad input ---------------------------------------------------------------------------------------
def test_over_long_prompt_names_both_lengths(bundle):
    model = edgellm.load(bundle("llama", "f32", seq_length=64))
    with pytest.raises(EdgeLLMError, match=r"prompt is \d+ tokens but this bundle holds at most 64"):
        model.generate(list(range(3, 80)), max_new_tokens=4)
    with pytest.raises(EdgeLLMError, match="holds at most 64"):
        model.logits(list(range(3, 80)))


def test_missing_and_unknown_models(tmp_path, tiny):
    with pytest.raises(EdgeLLMError, match="no such file or folder"):
        edgellm.convert(tmp_path / "nope", tmp_path / "out")
    _, folder = tiny("llama")
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeLLMError, match="unknown architecture 'FancyNewForCausalLM'"):
        edgellm.convert(odd, tmp_path / "out")
    (odd / "model.safetensors").unlink()  # the architecture is named before the missing weights
    with pytest.raises(EdgeLLMError, match="unknown architecture 'FancyNewForCausalLM'"):
        edgellm.convert(odd, tmp_path / "out")
    shutil.copy(folder / "config.json", odd / "config.json")
    with pytest.raises(EdgeLLMError, match="no \\*.safetensors weights found"):
        edgellm.convert(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(EdgeLLMError, match="no such bundle folder"):
        edgellm.load(tmp_path / "missing-bundle")


def test_failed_conversion_leaves_nothing_behind(tmp_path, tiny):
    _, folder = tiny("llama")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(EdgeLLMError, match="truncated"):
        edgellm.convert(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_bundle_format_versions(bundle, tmp_path):
    """Bundles of format version 1 (each with its own embedding table) still open; a newer version is refused with
    what to do, not read wrongly."""
    copy = tmp_path / "b"
    shutil.copytree(bundle("llama", "f32"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    for version, opens in [(1, True), (2, True), (5, False)]:
        (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
        if opens:
            assert edgellm.load(copy).engine.embed([1, 2]).shape == (2, manifest["model"]["hidden_size"])
        else:
            with pytest.raises(EdgeLLMError, match=r"format v5, written by a newer edgellm .* upgrade edgellm"):
                edgellm.load(copy)


def test_corrupt_or_truncated_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle("llama", "f32"), copy)
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(raw)
    with pytest.raises(EdgeLLMError, match="CRC32 checksum does not match"):
        edgellm.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for info in manifest["files"].values():
        del info["crc32"]  # a bundle written before CRC-32 was recorded: checked by SHA-256
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeLLMError, match="SHA256 checksum does not match"):
        edgellm.load(copy)
    data.write_bytes(raw[:-10])
    with pytest.raises(EdgeLLMError, match="truncated or replaced"):
        edgellm.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(EdgeLLMError, match="corrupt manifest"):
        edgellm.load(copy)


def test_embedding_rows_are_read_as_asked(tmp_path):
    """RowFile reads .npy rows with pread: the same values as numpy's own reading, in the shape of the ids."""
    from edgellm.format.embeddings import RowFile

    rng = np.random.default_rng(0)
    for name, table in [("f16", rng.standard_normal((50, 12)).astype(np.float16)),
                        ("codes", rng.integers(0, 255, (50, 3, 32), dtype=np.uint8))]:
        np.save(tmp_path / f"{name}.npy", table)
        rows = RowFile(tmp_path / f"{name}.npy")
        ids = np.array([[7, 0, 49], [7, 7, 3]])
        np.testing.assert_array_equal(rows[ids], table[ids])
        np.testing.assert_array_equal(rows[np.array([], np.int64)], table[:0])
        for bad in (-1, 50):
            with pytest.raises(IndexError, match="out of range"):
                rows[np.array([1, bad])]
    (tmp_path / "short.npy").write_bytes((tmp_path / "f16.npy").read_bytes()[:-10])
    with pytest.raises(EdgeLLMError, match="shorter than"):
        RowFile(tmp_path / "short.npy")


def test_bad_messages_are_refused(bundle):
    model = edgellm.load(bundle("llama", "f32"))
    with pytest.raises(EdgeLLMError, match="'role' and 'content'"):
        model.generate([{"text": "hi"}])
    with pytest.raises(EdgeLLMError, match="empty"):
        model.generate("", raw=True)


def test_unknown_precisions_are_refused_before_any_work(tiny, tmp_path):
    _, folder = tiny("llama")
    for option in ("quantize", "vision_quantize", "lm_head"):
        with pytest.raises(EdgeLLMError, match=f"{option}='w3' is not a precision; choose one of f32, f16, w8, w4"):
            edgellm.convert(folder, tmp_path / "out", progress=False, **{option: "w3"})
        assert not (tmp_path / "out").exists()


def test_convert_options_are_one_record_that_names_an_option_as_its_caller_spelled_it(tmp_path, capsys):
    """The Python API, the CLI and the pipeline share ConvertOptions: every option but the key (read from a file or
    the environment on the command line) is a flag whose parser dest is the option's name, and an error names the
    keyword from Python and the flag from the command line."""
    from dataclasses import fields

    from edgellm.cli import build_parser, main
    from edgellm.convert.options import FLAGS, NOT_ON_THE_COMMAND_LINE, ConvertOptions

    convert = build_parser().commands["convert"]
    dests: dict[str, list[str]] = {}
    for action in convert._actions:
        dests.setdefault(action.dest, []).extend(action.option_strings)  # symmetric: --sym and --asym
    for f in fields(ConvertOptions):
        if f.name not in NOT_ON_THE_COMMAND_LINE:
            assert f.name in dests and FLAGS[f.name] in dests[f.name], f.name
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(EdgeLLMError, match=r"^group_size=12 is not a block size: a power of two of 16 or more$"):
        ConvertOptions(group_size=12).checked(folder)
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "b"), "-g", "48"]) == 2
    assert "-g 48 is not a block size" in capsys.readouterr().err
    with pytest.raises(EdgeLLMError, match=r"^reblock=True applies to GGUF files"):
        ConvertOptions(reblock=True).checked(folder)
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "b"), "--reblock"]) == 2
    assert "--reblock applies to GGUF files" in capsys.readouterr().err
    with pytest.raises(EdgeLLMError, match=r"^symmetric=False does not apply to a GGUF's blocks.*add reblock=True"):
        ConvertOptions(symmetric=False).checked(tmp_path / "m.gguf")
    assert main(["convert", "-m", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "b"), "--asym"]) == 2
    assert "--asym does not apply to a GGUF's blocks, which are kept as they are; add --reblock" in \
        capsys.readouterr().err
    checked = ConvertOptions().checked(folder)
    assert (checked.group_size, checked.symmetric) == (128, True) and checked == ConvertOptions(group_size=128,
                                                                                                  symmetric=True)
    assert not (tmp_path / "b").exists()


# --- command line ------------------------------------------------------------------------------------
def test_cli_convert_run_and_bench(tiny, tmp_path, capsys, monkeypatch):
    _, folder = tiny("qwen3")
    out = tmp_path / "cli-bundle"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-q", "w8", "-g", "32", "-s", "256"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "w8" and manifest["quantization"]["group_size"] == 32
    assert manifest["quantization"]["matmuls"] == {"8-bit/32": 2 * 4 + 1}  # fused qkv, o, gate_up, down; lm_head
    assert manifest["seq_length"] == 256
    assert main(["convert", "-m", str(folder), "-o", str(out)]) == 2  # exists: refused, not overwritten
    assert "already exists" in capsys.readouterr().err
    assert main(["run", str(out), "-p", "Liberty", "-n", "5"]) == 0
    captured = capsys.readouterr()
    assert "TTFT" in captured.err and "decode" in captured.err
    greedy = ["-n", "5", "--temperature", "0"]
    assert main(["run", str(out), "-p", "Liberty", *greedy]) == 0
    answer = capsys.readouterr()
    prompt_size = re.search(r"prompt \d+ tok", answer.err).group()
    assert main(["run", str(out), "Liberty", *greedy]) == 0  # the prompt as a positional argument
    again = capsys.readouterr()
    assert again.out == answer.out and prompt_size in again.err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Liberty\n")))
    assert main(["run", str(out), "-", *greedy]) == 0  # - reads standard input, without echo's newline
    again = capsys.readouterr()
    assert again.out == answer.out and prompt_size in again.err
    assert main(["chat", str(out), "--top-p", "1.5"]) == 2
    assert "top_p must be above 0 and at most 1, got 1.5" in capsys.readouterr().err
    for twice_or_never in (["Liberty", "-p", "Liberty"], []):
        assert main(["run", str(out), *twice_or_never]) == 2
        assert "give the prompt once" in capsys.readouterr().err
    assert main(["run", str(out), "-i", "a.png", "Liberty"]) == 2  # the prompt was taken as an image
    assert "put the prompt first" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b" \n")))
    assert main(["run", str(out), "-"]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert main(["bench", str(out), "--prompt-lengths", "8,32", "--decode-tokens", "4", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and "peak RSS" in table and len(table.strip().splitlines()) == 5
    assert f"matmuls: {edgellm.load(out).engine.kernels.describe()}" in table  # which kernels the figures are of
    assert main(["bench", str(out), "--prompt-lengths", "8,40", "--decode-tokens", "2", "--repeats", "1",
                 "--profile"]) == 0
    profile = capsys.readouterr().out
    assert "one decoded token after 40 " in profile and "DecoderAttention" in profile and "MatMulBlocks" in profile
    assert main(["run", str(tmp_path / "nothing"), "-p", "x"]) == 2
    assert "no such bundle folder" in capsys.readouterr().err


def test_cli_chat_keeps_turns_and_clears(bundle, monkeypatch, capsys):
    lines = iter(["We hold these truths", "that all men", "/clear", "Liberty", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(bundle("llama", "f32")), "-n", "6", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    timings = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(timings) == 3 and "conversation cleared" in err
    assert "/clear starts over" in err and "/image" not in err  # a text bundle offers no images
    cached = [int(line.split("(")[1].split()[0]) for line in timings]
    assert cached[0] == 0 and cached[1] > 0  # the second turn reused the first turn's KV cache


def test_quality_command_measures_perplexity_and_agreement(tiny, bundle, capsys):
    import torch

    from edgellm.quality import evaluate
    from helpers import CORPUS

    ref_model, _ = tiny("qwen2")
    model = edgellm.load(bundle("qwen2", "f32", seq_length=64))
    report = evaluate(model, CORPUS.read_text(), reference=model, max_tokens=150)
    assert report["top1_agreement"] == 1.0 and report["tokens"] == 150
    ids = model.tokenizer.encode(CORPUS.read_text())[:150]
    nll = []  # transformers over the same 64-token windows
    for start in range(0, 149, 64):
        chunk = ids[start: start + 64]
        with torch.no_grad():
            logp = torch.log_softmax(ref_model(torch.tensor([chunk])).logits[0, :-1].double(), -1)
        nll += (-logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])]).tolist()
    assert report["perplexity"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)
    w4 = bundle("qwen2", "w4", seq_length=64)
    assert main(["quality", str(w4), "--reference", str(bundle("qwen2", "f32", seq_length=64)),
                 "--text", str(CORPUS), "--max-tokens", "150"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "perplexity" in out


def test_running_a_bundle_never_imports_the_converter(bundle):
    from helpers import converter_modules_loaded_by_running

    assert converter_modules_loaded_by_running(bundle("qwen3", "w4")) == []


@pytest.mark.parametrize("min_ngram", [2, 1])
def test_prompt_lookup_keeps_the_greedy_answer_and_checks_drafts_in_one_run(bundle, monkeypatch, min_ngram):
    """Drafts from earlier text are checked several tokens per decoder run, and the answer is token for token the
    plain greedy one (f32: the multi-row and one-row kernels round alike), for every draft length, with a
    repetition penalty too. The tiny model falls into a loop of one token, where drafts are right; drafting from
    single recurring tokens (min_ngram 1) also makes wrong drafts, which the cache must forget."""
    import functools

    from edgellm.runtime import lookup
    from edgellm.runtime import model as model_module
    from helpers import CORPUS

    monkeypatch.setattr(model_module, "prompt_lookup", functools.partial(lookup.prompt_lookup, min_ngram=min_ngram))
    model = edgellm.load(bundle("qwen3", "f32"))
    text = CORPUS.read_text()[:600]
    prompt = model.tokenizer.encode(text) * 2  # the model has seen the text once: it tends to repeat it
    plain = model.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert plain.drafted == 0
    rejected = 0
    for k in (1, 3, 8):
        for penalty in (1.0, 1.3):
            want = plain if penalty == 1.0 else model.generate(prompt, max_new_tokens=40, ignore_eos=True,
                                                                repetition_penalty=penalty)
            got = model.generate(prompt, max_new_tokens=40, ignore_eos=True, prompt_lookup=k,
                                 repetition_penalty=penalty)
            assert got.token_ids == want.token_ids and got.text == want.text
            assert 0 <= got.accepted <= got.drafted
            rejected += got.drafted - got.accepted
            if penalty == 1.0:
                assert got.accepted > 0  # some drafts were right: fewer decoder runs than tokens
    assert rejected > 0 or min_ngram > 1  # and some wrong: the cache forgot them
    again = model.generate(prompt, max_new_tokens=40, ignore_eos=True)  # the cache is sound after rollbacks
    assert again.token_ids == plain.token_ids and again.reused_tokens > 0
    sampled = model.generate(prompt, max_new_tokens=24, temperature=0.3, seed=1, prompt_lookup=4, ignore_eos=True)
    assert sampled.drafted > 0  # sampled answers are drafted too (test_a_checked_guess_keeps_the_distribution)
    with pytest.raises(EdgeLLMError, match="prompt_lookup must be 0"):
        model.generate(prompt, prompt_lookup=-1)


@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=1.3, top_k=5, top_p=0.95),
                                      dict(temperature=0.6, min_p=0.05, repetition_penalty=1.5)])
@pytest.mark.slow
def test_a_checked_guess_keeps_the_distribution(settings):
    """Speculative sampling's rule: whatever the guess (likely, unlikely, or one the settings exclude), the token
    Sampler.check returns is distributed as Sampler's own choice. 40,000 draws per guess; every token's frequency
    within 5 standard deviations of its probability (a rule that kept every guess, or never did, is off by far
    more)."""
    logits = np.array([2.0, 1.5, 1.4, 0.3, -0.5, -1.0, -3.0, 0.9], np.float32)
    previous = [1, 3]
    sampler = Sampler(SamplingParams(seed=7, **settings))
    tokens, probs = sampler.distribution(logits, previous)
    want = np.zeros(len(logits))
    want[tokens] = probs
    n = 40_000
    for guess in (0, 2, 5, 6):
        counts = np.bincount([sampler.check(logits, previous, guess) for _ in range(n)], minlength=len(logits))
        sigma = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(counts / n - want) <= 5 * sigma + 1e-9), (guess, counts / n, want)
    greedy = Sampler(SamplingParams())
    assert greedy.check(logits, [], 4) == 0 and greedy.check(logits, [], 0) == 0


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    from edgellm.runtime.lookup import prompt_lookup

    assert prompt_lookup([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # the latest 3-gram match wins
    assert prompt_lookup([5, 6, 7, 5, 6], 4) == [7, 5, 6]  # a 2-gram, then what follows up to the end
    assert prompt_lookup([5, 6, 7, 8], 4) == []  # nothing recurs
    assert prompt_lookup([5, 6, 7, 6], 4) == []  # one recurring token is not enough
    assert prompt_lookup([5, 6, 7, 6], 4, min_ngram=1) == [7, 6]
    assert prompt_lookup([4, 4, 4], 3) == [4] and prompt_lookup([4, 4], 3) == [] and prompt_lookup([1, 2, 1], 0) == []


def test_a_bundle_larger_than_the_free_memory_is_refused_before_loading(bundle, tmp_path, monkeypatch, capsys):
    from edgellm.format import open_bundle
    from edgellm.runtime import memory

    path = bundle("llama", "f16")
    read_meminfo = memory.available_bytes
    needs = memory.needed_bytes(open_bundle(path))
    data = open_bundle(path).manifest.files["decoder.onnx.data"].bytes
    assert needs["decoder weights"] == 2 * data  # float16 weights are widened when the session starts
    assert needs["KV cache"] == 2 * 2 * 2 * 512 * 16 * 4  # layers, key and value, kv heads, seq_length, head_dim
    monkeypatch.setattr(memory, "available_bytes", lambda: sum(needs.values()) - 1)
    with pytest.raises(EdgeLLMError, match=r"needs about 0\.\d\d GiB \(decoder weights .*KV cache .*is free; "
                                           r".*--seq-length"):
        edgellm.load(path)
    assert edgellm.load(path, check_memory=False).generate("Liberty", max_new_tokens=2).token_ids
    assert main(["run", str(path), "Liberty", "-n", "2"]) == 2
    assert main(["run", str(path), "Liberty", "-n", "2", "--no-memory-check"]) == 0
    assert "GiB is free" in capsys.readouterr().err
    monkeypatch.setattr(memory, "available_bytes", lambda: sum(needs.values()))
    edgellm.load(path)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert read_meminfo(meminfo) == 1000 * 1024
    assert read_meminfo(tmp_path / "none") is None


def test_a_draft_model_keeps_the_greedy_answer(bundle, tmp_path, capsys):
    """A draft model's guesses are checked several at a time: with itself as the draft every guess is kept, with
    another model some are not; the answer is the plain greedy one either way (f32). A draft of another
    tokenizer is refused."""
    import shutil

    model = edgellm.load(bundle("qwen3", "f32"))
    prompt = "We hold these truths to be self-evident"
    plain = model.generate(prompt, max_new_tokens=24, ignore_eos=True)
    itself = model.generate(prompt, max_new_tokens=24, ignore_eos=True, draft=edgellm.load(bundle("qwen3", "f32")))
    assert itself.token_ids == plain.token_ids and itself.drafted > 0 and itself.accepted == itself.drafted
    other = edgellm.load(bundle("qwen2", "f32"))
    for k in (1, 4):
        got = model.generate(prompt, max_new_tokens=24, ignore_eos=True, draft=other, draft_tokens=k)
        assert got.token_ids == plain.token_ids and got.drafted > got.accepted
    assert main(["run", str(bundle("qwen3", "f32")), prompt, "-n", "24", "--temperature", "0", "--draft",
                 str(bundle("qwen2", "f32"))]) == 0
    assert capsys.readouterr().out.strip() == model.generate(prompt, max_new_tokens=24).text.strip()
    foreign = tmp_path / "foreign"
    shutil.copytree(bundle("qwen2", "f32"), foreign)
    tokenizer = (foreign / "tokenizer.json").read_text()
    (foreign / "tokenizer.json").write_text(tokenizer.replace("<|im_start|>", "<|im_begin|>"))  # same size
    with pytest.raises(EdgeLLMError, match="another tokenizer.*share the model's vocabulary"):
        model.generate(prompt, draft=edgellm.load(foreign, verify=False))
    with pytest.raises(EdgeLLMError, match="not both"):
        model.generate(prompt, draft=other, prompt_lookup=2)


def test_the_timing_line_gives_a_rate_only_over_enough_prefilled_tokens():
    from edgellm.runtime.model import GenerationResult

    after_a_cache_hit = GenerationResult(token_ids=[1, 2], prompt_tokens=64, reused_tokens=63, ttft_s=0.064)
    assert "prefill 1 new tok |" in after_a_cache_hit.timing_line()  # not "16 tok/s"
    whole = GenerationResult(token_ids=[1, 2], prompt_tokens=64, reused_tokens=0, ttft_s=0.064)
    assert "prefill 1000 tok/s |" in whole.timing_line()


def test_the_prefill_bar_ends_its_line_where_stderr_is_not_a_terminal(bundle, capsys):
    """Piped or logged (2>&1), the bar's last state stays on a line of its own: the answer and the timing line
    that follow start on fresh lines."""
    long_prompt = " ".join(["We hold these truths to be self-evident"] * 12)
    assert main(["run", str(bundle("llama", "f32", seq_length=512, chunk_length=16)), long_prompt, "-n", "2",
                 "--raw"]) == 0
    err = capsys.readouterr().err
    assert "prefill" in err
    timing = [line for line in err.splitlines() if "TTFT" in line]
    assert len(timing) == 1 and timing[0].startswith("prompt "), err[-400:]
    bar = [line for line in err.split("\n") if "prefill:" in line or "tok/s]" in line]
    assert bar and bar[-1].rstrip().endswith("]"), err[-400:]  # the bar's last state, then a newline


def test_a_looping_answer_stops_where_asked():
    from edgellm.runtime.model import repeating

    story = list(range(100, 160))
    assert not repeating(story)  # no repetition
    assert not repeating(story + [7, 8, 9] * 10)  # 30 tokens of a loop: under 48
    assert repeating(story + [7, 8, 9] * 16)  # 48 tokens of one 3-token stretch
    assert repeating(story + list(range(40)) * 3)  # a 40-token stretch three times
    assert not repeating(story + list(range(40)) * 2 + list(range(39)) + [999])
    assert repeating([5] * 48) and not repeating([5] * 47)


def test_the_command_line_stops_a_greedy_loop(bundle, capsys):
    """Tiny random models loop at once under greedy decoding: `run` ends such an answer and says so; asked not to,
    it runs to -n."""
    path = str(bundle("llama", "f32", seq_length=512))
    assert main(["run", path, "We hold", "-n", "300", "--temperature", "0", "--raw"]) == 0
    err = capsys.readouterr().err
    assert "stopped: the answer was repeating itself" in err
    generated = int(err.split("decode ")[1].split(" tok")[0])
    assert 48 <= generated < 300
    assert main(["run", path, "We hold", "-n", "300", "--temperature", "0", "--raw", "--no-loop-stop"]) == 0
    assert "decode 300 tok" in capsys.readouterr().err
    model = edgellm.load(path)
    assert not model.generate("We hold", 300, raw=True, ignore_eos=True).looped  # the API's default: as asked


def test_generate_reports_logprobs_where_asked(bundle):
    import numpy as np

    model = edgellm.load(bundle("llama", "f32"))
    result = model.generate("We hold", 6, raw=True, logprobs=2)
    ids = model.tokenizer.encode("We hold")
    logits = model.logits(ids + result.token_ids[:-1], raw=True)[len(ids) - 1:]
    assert [token for token, _, _ in result.logprobs] == result.token_ids
    for (token, logprob, top), row in zip(result.logprobs, logits):
        row = row.astype(np.float64) - np.logaddexp.reduce(row.astype(np.float64))
        assert abs(logprob - row[token]) < 1e-5 and [i for i, _ in top] == list(np.argsort(-row)[:2])
    assert model.generate("We hold", 2, raw=True).logprobs is None
    with pytest.raises(EdgeLLMError, match="logprobs must be 0 to 20"):
        model.generate("We hold", 2, logprobs=21)
    with pytest.raises(EdgeLLMError, match="logprobs cannot be given with prompt_lookup"):
        model.generate("We hold", 2, logprobs=1, prompt_lookup=3)
