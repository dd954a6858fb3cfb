"""GGUF files written from the tiny transformers models (as llama.cpp's converter lays them out), converted back
by edgellm and compared with the model they came from: names, Llama's q/k row order, hyper-parameters, tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgellm
from conftest import CORPUS, reference_logits, torch
from edgellm.convert.gguf import _GLOBAL_NAMES, _LAYER_NAMES

import gguf  # noqa: E402
HF_TO_GGUF = {**{v: k for k, v in _GLOBAL_NAMES.items()}, **{v: k for k, v in _LAYER_NAMES.items()}}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders Llama q/k rows for its rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, folder, path, arch: str, qtype) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    eos = model.generation_config.eos_token_id
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        if data.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_file_converts_to_the_model_it_came_from(tiny, tmp_path, arch):
    ref_model, folder = tiny(arch)
    path = tmp_path / f"{arch}.gguf"
    q8 = gguf.GGMLQuantizationType.Q8_0
    write_gguf(ref_model, folder, path, arch, q8)

    dequantized = type(ref_model)(ref_model.config).eval()  # the reference, holding the Q8_0-rounded weights
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    for k, v in state.items():
        if v.ndim == 2:
            rounded = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q8), q8).reshape(v.shape)
            state[k] = torch.from_numpy(np.ascontiguousarray(rounded, np.float32))
    dequantized.load_state_dict(state)

    model = edgellm.load(edgellm.convert(path, tmp_path / "bundle", quantize="f32", seq_length=256, progress=False))
    hf_tokens = edgellm.load(edgellm.convert(folder, tmp_path / "hf", quantize="f32", seq_length=256,
                                             progress=False))
    text = CORPUS.read_text()[:400]
    assert model.tokenizer.encode(text) == hf_tokens.tokenizer.encode(text)
    assert model.prompt_ids("Hello there") == hf_tokens.prompt_ids("Hello there")
    ids = model.tokenizer.encode(text)[:40]
    ref = reference_logits(dequantized, ids)
    assert np.abs(model.logits(ids) - ref).max() / np.abs(ref).max() < 1e-4
    # w8 keeps the Q8_0 blocks as they are: the same weights, only int8 activations differ
    kept = edgellm.load(edgellm.convert(path, tmp_path / "w8", quantize="w8", seq_length=256, progress=False))
    assert np.abs(kept.logits(ids) - ref).max() / np.abs(ref).max() < 3e-2
