"""Checkpoints that only remote code reads (InternLM2, ChatGLM3 / glm-4-9b-chat) and configs transformers reads as
another model (InternLM3): each tiny model is written in the checkpoint's own layout, from the layout its modeling
code reads, and its bundle is checked against the transformers model that computes the same function."""

from __future__ import annotations

import json

import numpy as np
from test_text_models import check_parity, corpus_ids, tiny_pair

from helpers import reference_logits, relative_error


def rewrite(folder, tensors: dict, config: dict) -> None:
    """Replace the saved checkpoint with `tensors` (torch, under the remote code's names) and `config`."""
    from safetensors.torch import save_file

    for old in folder.glob("*.safetensors"):
        old.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_internlm3_is_a_llama(tmp_path):
    def as_internlm3(folder, model):
        config = json.loads((folder / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["InternLM3ForCausalLM"],
                                                        "qkv_bias": False, "bias": False}))

    check_parity(*tiny_pair(tmp_path, "InternLM3Config", "LlamaForCausalLM", 21, saved_as=as_internlm3,
                            head_dim=16, rope_theta=50000.0))


def as_internlm2(folder, model):
    """InternLM2's layout: its attention reads wqkv's rows as (kv head, [its query heads..., key, value], dim)."""
    c = model.config
    d, kv = c.head_dim, c.num_key_value_heads
    group = c.num_attention_heads // kv
    out = {"model.tok_embeddings.weight": model.model.embed_tokens.weight, "model.norm.weight": model.model.norm.weight,
           "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        a, p = layer.self_attn, f"model.layers.{i}"
        hidden = a.q_proj.weight.shape[1]
        q = a.q_proj.weight.reshape(kv, group, d, hidden)
        k, v = (w.reshape(kv, 1, d, hidden) for w in (a.k_proj.weight, a.v_proj.weight))
        import torch

        out[f"{p}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        out.update({f"{p}.attention.wo.weight": a.o_proj.weight,
                    f"{p}.attention_norm.weight": layer.input_layernorm.weight,
                    f"{p}.ffn_norm.weight": layer.post_attention_layernorm.weight,
                    f"{p}.feed_forward.w1.weight": layer.mlp.gate_proj.weight,
                    f"{p}.feed_forward.w3.weight": layer.mlp.up_proj.weight,
                    f"{p}.feed_forward.w2.weight": layer.mlp.down_proj.weight})
    config = {k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size", "rms_norm_eps",
                                         "max_position_embeddings", "eos_token_id")}
    rewrite(folder, {k: v.detach() for k, v in out.items()},
            {**config, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
             "rope_theta": c.rope_parameters["rope_theta"], "tie_word_embeddings": False})


def test_internlm2_layout_matches_the_llama_it_holds(tmp_path):
    check_parity(*tiny_pair(tmp_path, "LlamaConfig", "LlamaForCausalLM", 22, saved_as=as_internlm2, head_dim=16,
                            rope_theta=1000000.0))


def as_chatglm(folder, model):
    """ChatGLM3's layout and config (modeling_chatglm.py): query_key_value holds all query heads, then the key
    groups, then the value groups; dense_h_to_4h is [gate; up]; rotary over half of each head at 10000 * rope_ratio."""
    c = model.config
    out = {"transformer.embedding.word_embeddings.weight": model.model.embed_tokens.weight,
           "transformer.encoder.final_layernorm.weight": model.model.norm.weight,
           "transformer.output_layer.weight": model.lm_head.weight}
    import torch

    for i, layer in enumerate(model.model.layers):
        a, p = layer.self_attn, f"transformer.encoder.layers.{i}"
        out.update({
            f"{p}.input_layernorm.weight": layer.input_layernorm.weight,
            f"{p}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            f"{p}.self_attention.query_key_value.weight": torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                                    a.v_proj.weight]),
            f"{p}.self_attention.query_key_value.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            f"{p}.self_attention.dense.weight": a.o_proj.weight,
            f"{p}.mlp.dense_h_to_4h.weight": layer.mlp.gate_up_proj.weight,
            f"{p}.mlp.dense_4h_to_h.weight": layer.mlp.down_proj.weight})
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": c.num_hidden_layers,
              "hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
              "multi_query_attention": True, "multi_query_group_num": c.num_key_value_heads,
              "kv_channels": c.head_dim, "ffn_hidden_size": c.intermediate_size, "padded_vocab_size": c.vocab_size,
              "layernorm_epsilon": c.rms_norm_eps, "rope_ratio": c.rope_parameters["rope_theta"] / 10000.0,
              "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
              "apply_residual_connection_post_layernorm": False, "original_rope": True, "seq_length": 1024,
              "eos_token_id": c.eos_token_id, "tie_word_embeddings": False}
    rewrite(folder, {k: v.detach() for k, v in out.items()}, config)


def chatglm_logits(folder, ids) -> np.ndarray:
    """ChatGLM3's forward as its remote code computes it (modeling_chatglm.py: GLMBlock, SelfAttention with
    multi-query groups, RotaryEmbedding(kv_channels // 2) turning interleaved pairs, SwiGLU), written from that code
    over the checkpoint's own tensors: the reference that the layout test's writer is the real layout."""
    import torch
    from safetensors.torch import load_file

    w, c = load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())
    heads, groups, d, eps = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"], \
        c["layernorm_epsilon"]
    n, rot = len(ids), d // 2
    inv_freq = 1.0 / (10000.0 * c["rope_ratio"]) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos()[:, None, :].float(), angles.sin()[:, None, :].float()

    def rotate(t):  # [n, heads, d]: pairs (0, 1), (2, 3)... of the first `rot` dimensions
        pairs, rest = t[..., :rot].reshape(n, t.shape[1], rot // 2, 2), t[..., rot:]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.cat([torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2), rest], -1)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        h = rms(x, w[f"{p}.input_layernorm.weight"])
        qkv = h @ w[f"{p}.self_attention.query_key_value.weight"].T + w[f"{p}.self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=-1)
        q, k = rotate(q.reshape(n, heads, d)), rotate(k.reshape(n, groups, d))
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.reshape(n, groups, d).repeat_interleave(heads // groups, dim=1)
        scores = torch.einsum("shd,thd->hst", q, k) / d ** 0.5 + causal
        attn = torch.einsum("hst,thd->shd", scores.softmax(-1), v).reshape(n, heads * d)
        x = x + attn @ w[f"{p}.self_attention.dense.weight"].T
        h = rms(x, w[f"{p}.post_attention_layernorm.weight"])
        gate, up = (h @ w[f"{p}.mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[f"{p}.mlp.dense_4h_to_h.weight"].T
    return (rms(x, w["transformer.encoder.final_layernorm.weight"]) @ w["transformer.output_layer.weight"].T).numpy()


def test_chatglm_layout_matches_its_own_forward_and_glm(tmp_path):
    import torch

    def with_biases(folder, model):  # random q, k, v biases, so a bias read from the wrong rows would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        as_chatglm(folder, model)

    torch.manual_seed(0)
    ref_model, model = tiny_pair(tmp_path, "GlmConfig", "GlmForCausalLM", 23, saved_as=with_biases, head_dim=32,
                                 pad_token_id=None, rope_theta=500000.0)
    ids = corpus_ids(model, 40)
    own = chatglm_logits(tmp_path, ids)
    assert relative_error(own, reference_logits(ref_model, ids)) < 1e-4  # the writer wrote ChatGLM's layout
    assert relative_error(model.logits(ids), own) < 1e-4
    check_parity(ref_model, model)


def test_layouts_edgellm_cannot_compute_are_one_clear_error(tmp_path):
    import pytest

    import edgellm
    from edgellm.errors import EdgeLLMError

    cases = {
        "InternLM3ForCausalLM": ({"qkv_bias": True, "bias": True}, "biased MLP and output projections"),
        "ChatGLMModel": ({"num_layers": 2, "multi_query_attention": True, "multi_query_group_num": 2,
                          "kv_channels": 16, "ffn_hidden_size": 128, "padded_vocab_size": 512,
                          "add_bias_linear": True}, "add_bias_linear=True"),
    }
    for architecture, (extra, message) in cases.items():
        folder = tmp_path / architecture
        folder.mkdir()
        config = {"architectures": [architecture], "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512, **extra}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(EdgeLLMError, match=message):
            edgellm.convert(folder, tmp_path / f"{architecture}-bundle", progress=False)
        assert not (tmp_path / f"{architecture}-bundle").exists()


def test_a_checkpoint_missing_a_tensor_of_its_layout_is_one_clear_error(tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    import edgellm
    from edgellm.errors import EdgeLLMError

    (tmp_path / "ok").mkdir()
    tiny_pair(tmp_path / "ok", "GlmConfig", "GlmForCausalLM", 24, saved_as=as_chatglm, head_dim=32,
              pad_token_id=None)
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del tensors["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(EdgeLLMError, match="transformer.encoder.layers.1.mlp.dense_4h_to_h.weight .*not found"):
        edgellm.convert(tmp_path / "ok", tmp_path / "broken", quantize="f32", progress=False)
    assert not (tmp_path / "broken").exists()
