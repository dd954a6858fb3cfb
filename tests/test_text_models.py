"""Bundles of a tiny model of every text family against transformers, the oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgellm
from helpers import CORPUS, DEQUANTIZED_BOUND, TEXT_MODELS, reference_greedy, reference_logits, relative_error

ARCHS = sorted(TEXT_MODELS)  # one tiny model per text family of the registry (test_architecture checks it)
# Max-abs logit error relative to the reference's logit scale (max |logit|), per precision. f32 is the issue's
# bound. Against the float model, the others are what rounding random weights costs (measured: f16 ~1e-3,
# w8 <= 3.4e-2, w4 <= 0.37 on these tiny random models, which amplify weight noise far more than trained ones).
BOUNDS = {"f32": 1e-4, "f16": 5e-3, "w8": 6e-2, "w4": 0.6}


def corpus_ids(model, n: int) -> list[int]:
    return model.tokenizer.encode(CORPUS.read_text())[:n]


def tiny_pair(tmp_path, config_class: str, model_class: str, seed: int, saved_as=None, **config):
    """(a transformers model of `config_class` on TINY's shape with `config` over it, saved (then rewritten by
    `saved_as(folder, model)`, if given); its f32 bundle of 128 positions in chunks of 16, loaded)."""
    import torch
    import transformers

    from helpers import TINY, write_tokenizer

    vocab = write_tokenizer(tmp_path)
    settings = {**TINY, "vocab_size": vocab, "eos_token_id": 2, **config}
    torch.manual_seed(seed)
    ref_model = getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).eval()
    ref_model.save_pretrained(tmp_path)
    if saved_as:
        saved_as(tmp_path, ref_model)
    model = edgellm.load(edgellm.convert(tmp_path, tmp_path / "bundle", quantize="f32", seq_length=128,
                                         chunk_length=16, progress=False))
    return ref_model, model


def check_parity(ref_model, model, prompt_tokens: int = 40) -> None:
    """f32 logits within 1e-4 over a prompt of several chunks; 32 greedy tokens identical."""
    ids = corpus_ids(model, prompt_tokens)
    assert relative_error(model.logits(ids), reference_logits(ref_model, ids)) < 1e-4
    result = model.generate(ids[:12], max_new_tokens=32, ignore_eos=True)
    assert result.token_ids == reference_greedy(ref_model, ids[:12], 32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", list(BOUNDS))
def test_logits_match_transformers(tiny, bundle, arch, quant):
    ref_model, _ = tiny(arch)
    model = edgellm.load(bundle(arch, quant))
    ids = corpus_ids(model, 40)  # chunk length 16: three chunks, the last one partial
    assert len(ids) > 2 * model.manifest.chunk_length
    got, ref = model.logits(ids), reference_logits(ref_model, ids)
    assert got.shape == ref.shape == (len(ids), ref_model.config.vocab_size)
    assert got.dtype == np.float32
    err = relative_error(got, ref)
    assert err < BOUNDS[quant], f"{arch} {quant}: relative max-abs logit error {err:.2e}"


def dequantized_copy(model, quant: str, group: int, lm_head: str):
    """The transformers model with every projection rounded exactly as the converter rounds it at `quant` (w8, w4);
    the lm_head at its own precision (w8, w4 or f16)."""
    import copy

    import torch

    from edgellm.convert.quantize import quantize

    def rounded(w, mode):
        if mode == "f16":
            return w.astype(np.float16).astype(np.float32)
        return quantize(w, int(mode[1]), group).dequantize()

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in clone.named_modules():
            if isinstance(module, torch.nn.Linear):
                mode = lm_head if name == "lm_head" else quant
                module.weight.copy_(torch.from_numpy(rounded(module.weight.numpy(), mode)))
        emb = clone.model.embed_tokens.weight
        # quantized bundles store the float embedding table in float16, times the family's embedding multiplier
        scale = float(getattr(clone.config, "embedding_multiplier", None) or getattr(clone.config, "scale_emb", None)
                      or 1.0)
        emb.copy_((emb * scale).half().float() / scale)
    return clone


@pytest.mark.slow  # a matrix: 14 families x 2 precisions x 2 accuracy levels
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["w8", "w4"])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_quantized_bundle_matches_its_dequantized_weights(tiny, bundle, arch, quant, accuracy_level):
    ref_model, _ = tiny(arch)
    options = {} if accuracy_level == 4 else {"accuracy_level": accuracy_level}  # 4: the default bundle
    model = edgellm.load(bundle(arch, quant, **options))
    assert model.manifest.quantization.lm_head == "w8"  # w4 keeps the output projection at 8 bits
    assert model.manifest.quantization.accuracy_level == accuracy_level
    assert model.manifest.quantization.group_size == 128  # the default
    ids = corpus_ids(model, 40)
    ref = reference_logits(dequantized_copy(ref_model, quant, 128, "w8"), ids)
    err = relative_error(model.logits(ids), ref)
    assert err < DEQUANTIZED_BOUND[accuracy_level], f"{arch} {quant}: {err:.2e} against its own dequantized weights"


@pytest.mark.parametrize("lm_head", ["w4", "f16"])
def test_lm_head_precision_can_be_chosen(tiny, bundle, lm_head):
    ref_model, _ = tiny("qwen2")
    model = edgellm.load(bundle("qwen2", "w4", lm_head=lm_head, accuracy_level=0))  # float activations: exact
    formats = model.manifest.quantization.matmuls
    assert formats == ({"4-bit/128": 4 * 2 + 1} if lm_head == "w4" else {"4-bit/128": 4 * 2})
    ids = corpus_ids(model, 40)
    ref = reference_logits(dequantized_copy(ref_model, "w4", 128, lm_head), ids)
    err = relative_error(model.logits(ids), ref)
    assert err < DEQUANTIZED_BOUND[0], f"lm_head {lm_head}: {err:.2e} against its own dequantized weights"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_transformers(tiny, bundle, arch):
    ref_model, _ = tiny(arch)
    model = edgellm.load(bundle(arch, "f32"))
    ids = model.prompt_ids("Four score and seven years ago")
    expected = reference_greedy(ref_model, ids, 32, stop_at_eos=True)  # edgellm stops at EOS too
    result = model.generate("Four score and seven years ago", max_new_tokens=32)
    assert result.token_ids == expected
    # an answer cut (by max_new_tokens) inside a multi-byte character ends before it, not with U+FFFD
    assert result.text == model.tokenizer.decode(expected).rstrip("\ufffd")


def test_multi_turn_chat_equals_full_rerun(bundle):
    path = bundle("llama", "f32")
    model = edgellm.load(path)
    chat = model.chat(max_new_tokens=12)
    replies = []
    for question in ["When in the Course of human events", "We hold these truths", "He has refused his Assent"]:
        replies.append(chat.send(question))
    assert chat.last_result.reused_tokens > 0  # the earlier turns came from the KV cache
    fresh = edgellm.load(path)
    rerun = fresh.generate(chat.messages[:-1], max_new_tokens=12)
    assert rerun.reused_tokens == 0
    assert rerun.token_ids == chat.last_result.token_ids
    assert rerun.text == replies[-1]


def test_sharded_bfloat16_checkpoint(tiny, tmp_path):
    """Sharded safetensors (with an index) in bfloat16, the usual layout of real checkpoints."""
    import torch

    ref_model, folder = tiny("qwen2")
    bf16 = type(ref_model)(ref_model.config)
    bf16.load_state_dict(ref_model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    shard_dir = tmp_path / "sharded"
    bf16.save_pretrained(shard_dir, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (shard_dir / name).write_bytes((folder / name).read_bytes())
    assert (shard_dir / "model.safetensors.index.json").is_file()
    model = edgellm.load(edgellm.convert(shard_dir, tmp_path / "bundle", quantize="f32", progress=False,
                                         seq_length=128, chunk_length=16))
    ids = corpus_ids(model, 40)
    rounded = type(ref_model)(ref_model.config).eval()  # float32 model holding the bf16-rounded weights
    rounded.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    ref = reference_logits(rounded, ids)
    assert relative_error(model.logits(ids), ref) < 1e-4


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.8, "mscale_all_dim": 0.5},
    {"rope_type": "dynamic", "factor": 2.0},
])
def test_scaled_rope_matches_transformers(tmp_path, rope):
    """Llama 3.x frequency scaling, linear position interpolation, YaRN (its attention factor too) and dynamic NTK
    scaling (which changes nothing within the trained length, the most such a bundle holds)."""
    ref_model, model = tiny_pair(tmp_path, "LlamaConfig", "LlamaForCausalLM", 5,
                                 rope_parameters={"rope_theta": 500000.0, **rope})
    ids = corpus_ids(model, 100)
    assert relative_error(model.logits(ids), reference_logits(ref_model, ids)) < 1e-4


def test_bundle_tokenizer_holds_merges_as_strings(tiny, tmp_path):
    """Merges written as "left right" strings load in about half the memory; the tokenizer stays the same one, and
    merges whose tokens hold a space keep their [left, right] form."""
    from tokenizers import Tokenizer

    from edgellm.convert.pipeline import compact_merges

    _, folder = tiny("llama")
    source = json.loads((folder / "tokenizer.json").read_text())
    assert isinstance(source["model"]["merges"][0], list)  # what the tokenizers library writes
    bundle = edgellm.convert(folder, tmp_path / "bundle", quantize="f32", seq_length=64, progress=False)
    written = json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8"))
    assert written["model"]["merges"] == [" ".join(m) for m in source["model"]["merges"]]
    assert {k: v for k, v in written["model"].items() if k != "merges"} == \
        {k: v for k, v in source["model"].items() if k != "merges"}
    text = CORPUS.read_text()
    assert edgellm.load(bundle).tokenizer.encode(text) == \
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    spaced = json.dumps(dict(source, model=dict(source["model"], merges=[["a b", "c"], *source["model"]["merges"]])))
    assert compact_merges(spaced) == spaced


@pytest.mark.parametrize("config_class,model_class,window", [
    ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),  # every layer slides
    ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
])
def test_sliding_windows_shorter_than_the_bundle_match_transformers(tmp_path, config_class, model_class, window):
    """Mistral's and Qwen2's sliding windows (GroupQueryAttention's local window) over prompts several windows
    long, in chunks, and while decoding past them."""
    check_parity(*tiny_pair(tmp_path, config_class, model_class, 6, **window))


def test_dynamic_rope_past_the_trained_length_is_refused(tmp_path):
    from edgellm.errors import EdgeLLMError
    from edgellm.modeling.layers import rope_parameters, rope_tables

    params = rope_parameters({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                              "max_position_embeddings": 64})
    assert rope_tables(params, 16, 64)[0].shape == (64, 8)
    with pytest.raises(EdgeLLMError, match="convert with --seq-length 64 or less"):
        rope_tables(params, 16, 65)


@pytest.mark.parametrize("rope", [
    {"rope_type": "longrope", "partial_rotary_factor": 0.5, "short_factor": [1 + 0.1 * i for i in range(8)],
     "long_factor": [1 + 0.5 * i for i in range(8)]},  # Phi-4-mini's partial rotary; past 8 positions: long
    {"rope_type": "longrope", "short_factor": [1 + 0.1 * i for i in range(16)],
     "long_factor": [1 + 0.5 * i for i in range(16)]},  # a bundle within the original length: the short factors
])
def test_phi_rotary_variants_match_transformers(tmp_path, rope):
    original = 8 if "partial_rotary_factor" in rope else 256
    check_parity(*tiny_pair(tmp_path, "Phi3Config", "Phi3ForCausalLM", 8, pad_token_id=None, num_attention_heads=2,
                            num_key_value_heads=1,  # heads of 32: 16 rotated when partial
                            original_max_position_embeddings=original,
                            rope_parameters={"rope_theta": 10000.0, **rope}))


@pytest.mark.slow
def test_longrope_switches_tables_at_the_trained_length_as_transformers(tmp_path):
    """A LongRoPE bundle longer than the trained length (64 here, the bundle 128): short factors while a call's
    longest sequence fits it, long ones past it: a prompt longer than it is long in every chunk (as transformers'
    one forward), and an answer that crosses it keeps the short keys it has cached (as transformers' cache)."""
    from helpers import reference_greedy, reference_logits, relative_error

    ref_model, model = tiny_pair(tmp_path, "Phi3Config", "Phi3ForCausalLM", 8, pad_token_id=None,
                                 original_max_position_embeddings=64, rope_parameters={
                                     "rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1 + 0.1 * i for i in range(8)],
                                     "long_factor": [1 + 0.9 * i for i in range(8)]})
    assert model.engine.rotary_switch == 64  # the bundle holds both tables, switched at the trained length
    check_parity(ref_model, model)  # a short chat: within the trained length
    ids = corpus_ids(model, 100)
    assert relative_error(model.logits(ids), reference_logits(ref_model, ids)) < 1e-4  # chunks of 16 across 64
    crossing = model.generate(ids[:50], max_new_tokens=32, ignore_eos=True)  # positions 50-81: the switch at 64
    assert crossing.token_ids == reference_greedy(ref_model, ids[:50], 32)
    # batched beside a sequence on the other side of the trained length, each answer is the one it gets alone
    from test_batching import run_batcher

    batched = edgellm.load(model.bundle.path, slots=2)
    results = run_batcher(batched, [(ids[:20], 16), (ids[:56], 16)])
    assert [r.token_ids for _, r in results] == [reference_greedy(ref_model, ids[:20], 16),
                                                  reference_greedy(ref_model, ids[:56], 16)]


# Shapes ONNX Runtime's fused rotary refuses (heads that are not multiples of 16, rotary widths under 16 or not a
# multiple of it): the decoder turns them with RotaryEmbedding nodes before the attention, chosen at conversion
ODD_SHAPES = {
    "llama, heads of 24": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=96, head_dim=24)),
    "qwen3, heads of 40": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=40)),
    "phi3, heads of 80, fused qkv": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=160, num_attention_heads=2,
                                                                          num_key_value_heads=1, pad_token_id=None)),
    "gemma2, heads of 96": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=96, pad_token_id=None)),
    "glm4, rotary over 8": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16, pad_token_id=None, rope_parameters={
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"})),
    "phi3, rotary over 24 of 48": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=96, num_attention_heads=2, num_key_value_heads=1, pad_token_id=None,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5})),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_odd_head_sizes_and_rotary_widths_match_transformers(tmp_path, shape):
    from test_batching import run_batcher

    config_class, model_class, config = ODD_SHAPES[shape]
    ref_model, model = tiny_pair(tmp_path, config_class, model_class, 5, **config)
    check_parity(ref_model, model)  # f32 logits over three chunks, 32 greedy tokens
    ids = corpus_ids(model, 40)
    batched = edgellm.load(model.bundle.path, slots=2)  # two sequences in one graph call
    results = run_batcher(batched, [(ids[:12], 10), (ids[:30], 10)])
    assert [r.token_ids for _, r in results] == [reference_greedy(ref_model, ids[:12], 10),
                                                  reference_greedy(ref_model, ids[:30], 10)]
    small = edgellm.load(edgellm.convert(tmp_path, tmp_path / "int8", quantize="f32", kv_cache="int8",
                                         seq_length=128, chunk_length=16, progress=False))
    assert relative_error(small.logits(ids), reference_logits(ref_model, ids)) < 0.15  # (the int8 cache's bound)
