"""GGUF files written from the tiny transformers models (as llama.cpp's converter lays them out), converted back
by edgellm and compared with the model they came from: names, Llama's q/k row order, hyper-parameters, tokenizer."""

from __future__ import annotations

import copy
import json

import gguf  # noqa: E402
import numpy as np
import onnx
import pytest
import torch

import edgellm
from edgellm.convert.gguf import _GLOBAL_NAMES
from edgellm.errors import EdgeLLMError
from edgellm.models import text_family
from helpers import CORPUS, DEQUANTIZED_BOUND, TEXT_MODELS, make_tiny_model, reference_logits, relative_error


def gguf_name(hf: str, arch: str) -> str:
    to_gguf = {**{v: k for k, v in _GLOBAL_NAMES.items()}, **{v: k for k, v in text_family(arch).gguf.layers.items()}}
    if hf in to_gguf:
        return to_gguf[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{to_gguf[rest]}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders Llama q/k rows for its rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, folder, path, arch: str, qtype, gguf_arch: str | None = None) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), gguf_arch or text_family(arch).gguf.architecture)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch != "minicpm3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":  # llama.cpp stores the global layers' rotary; the local base and query scale are implied
        rope = cfg.rope_parameters["full_attention"]
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        rope = cfg.rope_parameters
    if arch in ("granite", "minicpm"):  # the multipliers, stored as scales (MiniCPM's attention scale is implied)
        if arch == "granite":
            w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if arch == "phi3":  # rotary dimensions, the trained length, LongRoPE's factors as tensors; 0: no window
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_sliding_window(0)
        for kind in ("long", "short"):
            w.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], np.float32))
    if arch == "minicpm3":  # the latent ranks; the key is nope + rope wide, rope of it rotated
        w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if arch in ("glm", "glm4"):  # rotary over half of each head
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if arch == "gemma2":  # the layer pattern and the query scale are implied
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_rope_freq_base(rope["rope_theta"])
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split
    pad = cfg.vocab_size - len(vocab)  # embedding rows beyond the tokenizer: named like llama.cpp's converter does
    w.add_token_list([t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), len(vocab) + pad)])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab] + [5] * pad)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    eos = model.generation_config.eos_token_id
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])
    state = model.state_dict()
    if arch == "glm":  # llama.cpp's chatglm files hold ChatGLM's fused query_key_value
        for i in range(cfg.num_hidden_layers):
            for part in ("weight", "bias"):
                p = f"model.layers.{i}.self_attn"
                state[f"{p}.qkv_proj.{part}"] = torch.cat([state.pop(f"{p}.{x}_proj.{part}") for x in "qkv"])
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # llama.cpp writes a tied head once, as token_embd
            continue
        data = tensor.float().numpy()
        if arch in ("llama", "granite", "minicpm", "smollm3") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        if arch in ("gemma", "gemma2", "gemma3") and name.endswith("norm.weight"):  # llama.cpp stores 1 + w
            data = data + 1
        if data.ndim == 2 and data.shape[1] % 32 == 0:  # (narrower rows stay float, as llama.cpp keeps them)
            w.add_tensor(gguf_name(name, arch), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name, arch), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_copy(model, qtype):
    """The model holding its 2-D weights as the GGUF type `qtype` rounds them: what a GGUF of it decodes to."""
    copied = type(model)(model.config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            rounded = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), qtype), qtype).reshape(v.shape)
            state[k] = torch.from_numpy(np.ascontiguousarray(rounded, np.float32))
    copied.load_state_dict(state)
    return copied


@pytest.mark.parametrize("arch, qtype, shared, pieces", [("llama", "Q4_0", True, 3), ("gemma3", "Q8_0", True, 1),
                                                         ("qwen2", "Q4_1", False, 1)])
def test_tied_embedding_is_stored_once(tmp_path, monkeypatch, arch, qtype, shared, pieces):
    """A tied GGUF embedding kept in its own blocks is also the lm_head's MatMulNBits weight: the bundle stores it
    once, in the graph's data file, and the table reads its rows from there (4-bit codes two per byte; Gemma's
    sqrt(hidden) applied to the scales at run time; across the row pieces of an lm_head larger than
    LM_HEAD_PIECE_BYTES, here made small). A min format (Q4_1) is reshaped for the matmul (quantize.fold_mins),
    so its table keeps files of its own. Rows and logits as transformers has them."""
    ref_model = make_tiny_model(arch, tmp_path / "hf", tie=True)
    qtype = getattr(gguf.GGMLQuantizationType, qtype)
    write_gguf(ref_model, tmp_path / "hf", tmp_path / "tied.gguf", arch, qtype)
    vocab, hidden = ref_model.config.vocab_size, ref_model.config.hidden_size
    row_bytes = hidden // 2 if qtype.name == "Q4_0" else hidden
    if pieces > 1:
        from edgellm.convert import pipeline

        monkeypatch.setattr(pipeline, "LM_HEAD_PIECE_BYTES", vocab * row_bytes // pieces + row_bytes)
    out = edgellm.convert(tmp_path / "tied.gguf", tmp_path / "bundle", quantize="w4", seq_length=64, progress=False)
    graph = onnx.load(out / "decoder.onnx", load_external_data=False).graph
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head")]
    assert len(heads) == pieces
    entry = json.loads((out / "manifest.json").read_text())["embeddings"]
    assert (not any(out.glob("embed_tokens*"))) == shared
    if shared:
        rows = [next(a.i for a in n.attribute if a.name == "N") for n in heads]
        assert sum(rows) == vocab and [c["shape"] for c in entry["codes"]] == [[r, hidden // 32, row_bytes // (
            hidden // 32)] for r in rows] and {c["file"] for c in entry["codes"]} == {"decoder.onnx.data"}
    else:
        assert entry["codes"] == "embed_tokens.npy"
    model = edgellm.load(out)
    dequantized = dequantized_copy(ref_model, qtype)
    scale = np.float32(ref_model.config.hidden_size ** 0.5) if arch == "gemma3" else np.float32(1)
    table = dequantized.model.embed_tokens.weight.detach().numpy() * scale
    ids = np.arange(ref_model.config.vocab_size)
    np.testing.assert_allclose(model.engine.embed(ids), table, rtol=1e-6, atol=1e-6)
    for outside in (-1, vocab):
        with pytest.raises(IndexError):
            model.engine.embeddings[np.array([0, outside])]
    if arch != "gemma3":  # a GGUF cannot carry the tiny Gemma's query scale (its graph: the test below)
        ids = model.tokenizer.encode(CORPUS.read_text()[:400])[:40]
        assert relative_error(model.logits(ids), reference_logits(dequantized, ids)) < DEQUANTIZED_BOUND[4]


@pytest.mark.slow  # a matrix: every family's GGUF reader
@pytest.mark.parametrize("arch", sorted(a for a in TEXT_MODELS if text_family(a).gguf))  # every GGUF reader
def test_gguf_file_converts_to_the_model_it_came_from(tiny, tmp_path, arch):
    ref_model, folder = tiny(arch)
    config = ref_model.config
    if arch == "minicpm3":  # llama.cpp's MiniCPM3 constants: 12, 1.4 and a base width of 256
        config = copy.deepcopy(ref_model.config)
        config.scale_emb, config.scale_depth, config.dim_model_base = 12, 1.4, 256
        ref_model = type(ref_model)(config).eval()
        ref_model.load_state_dict(tiny(arch)[0].state_dict())
    if arch == "smollm3":  # llama.cpp's layers without rotary: every fourth (here: none of the two)
        config = copy.deepcopy(ref_model.config)
        config.no_rope_layer_interval = 4
        config.no_rope_layers = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
        ref_model = type(ref_model)(config).eval()
        ref_model.load_state_dict(tiny(arch)[0].state_dict())
    if arch in ("gemma2", "gemma3"):  # what a GGUF can say: the query scale llama.cpp implies, soft-caps it stores
        config = copy.deepcopy(ref_model.config)
        config.query_pre_attn_scalar, config.final_logit_softcapping = config.head_dim, 3.0
        ref_model = type(ref_model)(config).eval()
        ref_model.load_state_dict(tiny(arch)[0].state_dict())
    path = tmp_path / f"{arch}.gguf"
    q8 = gguf.GGMLQuantizationType.Q8_0
    write_gguf(ref_model, folder, path, arch, q8)

    dequantized = dequantized_copy(ref_model, q8)  # the reference, holding the Q8_0-rounded weights

    model = edgellm.load(edgellm.convert(path, tmp_path / "bundle", quantize="f32", seq_length=256, progress=False))
    hf_tokens = edgellm.load(edgellm.convert(folder, tmp_path / "hf", quantize="f32", seq_length=256,
                                             progress=False))
    text = CORPUS.read_text()[:400]
    assert model.tokenizer.encode(text) == hf_tokens.tokenizer.encode(text)
    assert model.prompt_ids("Hello there") == hf_tokens.prompt_ids("Hello there")
    ids = model.tokenizer.encode(text)[:40]
    ref = reference_logits(dequantized, ids)
    assert relative_error(model.logits(ids), ref) < 1e-4
    # w8 keeps the Q8_0 blocks as they are: the same weights, exactly so with float activations
    for level in (0, 4):
        kept = edgellm.load(edgellm.convert(path, tmp_path / f"w8-{level}", quantize="w8", seq_length=256,
                                            accuracy_level=level, progress=False))
        err = relative_error(kept.logits(ids), ref)
        assert err < DEQUANTIZED_BOUND[level], f"{arch} w8 at accuracy level {level}: {err:.2e}"
    # and so is the embedding table, as its own codes and scales (Gemma's sqrt(hidden) carried by the scales)
    scale = np.float32(config.hidden_size ** 0.5 if arch in ("gemma", "gemma2", "gemma3") else
                       getattr(config, "embedding_multiplier", None) or getattr(config, "scale_emb", 1.0))
    table = dequantized.model.embed_tokens.weight.detach().numpy() * scale
    np.testing.assert_allclose(kept.engine.embed(ids), table[ids], rtol=1e-6, atol=1e-6)


def test_internlm2_files_read_as_the_llama_they_hold(tiny, tmp_path):
    """llama.cpp writes InternLM2 as a Llama (q, k, v cut out of wqkv, rows permuted) under `internlm2`."""
    ref_model, folder = tiny("llama")
    path = tmp_path / "internlm2.gguf"
    write_gguf(ref_model, folder, path, "llama", gguf.GGMLQuantizationType.Q8_0, gguf_arch="internlm2")
    model = edgellm.load(edgellm.convert(path, tmp_path / "bundle", quantize="f32", seq_length=64, progress=False))
    ids = model.tokenizer.encode(CORPUS.read_text()[:400])[:40]
    ref = reference_logits(dequantized_copy(ref_model, gguf.GGMLQuantizationType.Q8_0), ids)
    assert relative_error(model.logits(ids), ref) < 1e-4


def test_reblock_rounds_small_gguf_blocks_again_to_the_group_size(tiny, tmp_path):
    """--reblock: a Q4_0 file's 32-weight blocks become 4-bit blocks of -g (128 by default), its Q8_0 ones 8-bit
    blocks; the bundle computes the GGUF's weights rounded again that way (float activations: exactly), the
    embedding table's too. Without it the file's blocks are kept; a Hugging Face folder is refused."""
    from edgellm.convert.quantize import quantize

    ref_model, folder = tiny("llama")
    path = tmp_path / "q4.gguf"
    write_gguf(ref_model, folder, path, "llama", gguf.GGMLQuantizationType.Q4_0)
    kept = edgellm.convert(path, tmp_path / "kept", seq_length=64, progress=False)
    out = edgellm.convert(path, tmp_path / "reblocked", seq_length=64, accuracy_level=0, reblock=True,
                          progress=False)
    assert json.loads((kept / "manifest.json").read_text())["quantization"]["matmuls"] == {"4-bit/32": 9}
    assert json.loads((out / "manifest.json").read_text())["quantization"]["matmuls"] == {"4-bit/128": 9}
    reference = dequantized_copy(ref_model, gguf.GGMLQuantizationType.Q4_0)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.from_numpy(quantize(module.weight.numpy(), 4, 128).dequantize()))
    model = edgellm.load(out)
    ids = model.tokenizer.encode(CORPUS.read_text()[:400])[:40]
    assert relative_error(model.logits(ids), reference_logits(reference, ids)) < DEQUANTIZED_BOUND[0]
    q8 = tmp_path / "q8.gguf"
    write_gguf(ref_model, folder, q8, "llama", gguf.GGMLQuantizationType.Q8_0)
    wide = edgellm.convert(q8, tmp_path / "q8-reblocked", seq_length=64, reblock=True, progress=False)
    assert json.loads((wide / "manifest.json").read_text())["quantization"]["matmuls"] == {"8-bit/128": 9}
    with pytest.raises(EdgeLLMError, match="reblock=True applies to GGUF files"):
        edgellm.convert(folder, tmp_path / "hf", reblock=True, progress=False)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("options,message", [
    ({"quantize": "w8"}, "quantize='w8' does not apply to this GGUF's Q4_0 blocks"),
    ({"symmetric": False}, "symmetric=False does not apply to a GGUF's blocks"),
    ({"group_size": 32}, "group_size=32 does not apply to a GGUF's blocks"),
    ({"lm_head": "w4"}, "lm_head='w4' does not apply to a GGUF"),
])
def test_options_a_gguf_cannot_take_are_refused_not_recorded(tiny, tmp_path, options, message):
    """The file's blocks are kept: an option that would change them (without --reblock) is an error, and nothing
    is written; with --reblock, -g and --asym apply."""
    ref_model, folder = tiny("llama")
    path = tmp_path / "q4.gguf"
    write_gguf(ref_model, folder, path, "llama", gguf.GGMLQuantizationType.Q4_0)
    with pytest.raises(EdgeLLMError, match=message):
        edgellm.convert(path, tmp_path / "b", seq_length=64, progress=False, **options)
    assert not (tmp_path / "b").exists()
    if "group_size" in options or "symmetric" in options:
        out = edgellm.convert(path, tmp_path / "b", seq_length=64, progress=False, reblock=True, **options)
        manifest = json.loads((out / "manifest.json").read_text())["quantization"]
        assert manifest["group_size"] == options.get("group_size", 128)
        assert manifest["symmetric"] == options.get("symmetric", True)


def test_blocks_that_cannot_be_kept_are_rounded_again_with_a_warning(tmp_path, monkeypatch, capsys):
    """A GGUF type without an exact MatMulNBits form (the IQ formats...) is dequantized and quantized with -q, and
    the conversion says so; here Q8_0 plays that part."""
    from edgellm.convert import gguf as gguf_reader

    ref_model = make_tiny_model("llama", tmp_path / "hf")
    write_gguf(ref_model, tmp_path / "hf", tmp_path / "m.gguf", "llama", gguf.GGMLQuantizationType.Q8_0)
    monkeypatch.delitem(gguf_reader._BLOCK_DECODERS, "Q8_0")
    out = edgellm.convert(tmp_path / "m.gguf", tmp_path / "bundle", quantize="w8", seq_length=64, progress=False)
    err = capsys.readouterr().err
    assert "warning: m.gguf: its Q8_0 blocks cannot be kept as they are" in err and "-q w8" in err
    assert edgellm.load(out).manifest.quantization.group_size == 128  # rounded again to -g blocks
