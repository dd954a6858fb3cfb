"""Llama: Llama 2/3, SmolLM2, Mistral, InternLM3 (a Llama under another name), InternLM2 (a Llama in another
layout); the shared decoder as it is."""

from __future__ import annotations

import re

import numpy as np

from ..checkpoint import MappedSource, ModelSource
from ..modeling.decoder import Decoder, ModelArgs
from ..modeling.family import GGUFNames, TextFamily

# llama.cpp's layer tensor names (blk.N.<key>) -> Hugging Face's (model.layers.N.<value>); shared by the families
# whose GGUF files store the same blocks
GGUF_LAYERS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_rotary_rows(name: str, w, config: dict):
    """llama.cpp interleaves the rows of Llama's q/k projections for its rotary layout; undo it (rows only, so
    quantized blocks along K move intact)."""
    if not re.search(r"self_attn\.[qk]_proj\.weight$", name):
        return w
    heads = config["num_attention_heads" if ".q_proj" in name else "num_key_value_heads"]
    n = w.shape[0] if isinstance(w, np.ndarray) else w.n
    forward = np.arange(n).reshape(heads, 2, n // heads // 2).swapaxes(1, 2).reshape(-1)
    rows = np.argsort(forward)
    return w[rows] if isinstance(w, np.ndarray) else w.take_rows(rows)


def internlm2_layout(source: ModelSource) -> ModelSource:
    """InternLM2 / 2.5 as their remote code stores them: q, k and v as one `attention.wqkv` grouped by key-value
    head (each group's query heads, then its key, then its value), `feed_forward.w1/w3/w2` for gate, up and down,
    `tok_embeddings` and `output`; the config is Llama's."""
    c = source.config
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim, group = c["hidden_size"] // heads, heads // kv_heads
    per_group = np.arange((group + 2) * head_dim)
    start = np.arange(kv_heads)[:, None] * (group + 2) * head_dim
    rows = {"q": (start + per_group[: group * head_dim]).reshape(-1),
            "k": (start + per_group[group * head_dim: (group + 1) * head_dim]).reshape(-1),
            "v": (start + per_group[(group + 1) * head_dim:]).reshape(-1)}
    mapping: dict[str, tuple[str, np.ndarray | None]] = {
        "model.embed_tokens.weight": ("model.tok_embeddings.weight", None),
        "model.norm.weight": ("model.norm.weight", None), "lm_head.weight": ("output.weight", None)}
    for i in range(c["num_hidden_layers"]):
        mine, theirs = f"model.layers.{i}", f"model.layers.{i}"
        mapping.update({
            f"{mine}.input_layernorm.weight": (f"{theirs}.attention_norm.weight", None),
            f"{mine}.post_attention_layernorm.weight": (f"{theirs}.ffn_norm.weight", None),
            f"{mine}.self_attn.o_proj.weight": (f"{theirs}.attention.wo.weight", None),
            f"{mine}.mlp.gate_proj.weight": (f"{theirs}.feed_forward.w1.weight", None),
            f"{mine}.mlp.up_proj.weight": (f"{theirs}.feed_forward.w3.weight", None),
            f"{mine}.mlp.down_proj.weight": (f"{theirs}.feed_forward.w2.weight", None),
            **{f"{mine}.self_attn.{p}_proj.weight": (f"{theirs}.attention.wqkv.weight", r) for p, r in rows.items()}})
    return MappedSource(source, c, mapping)


FAMILY = TextFamily(name="llama", title="Llama 2/3, SmolLM2, Mistral, InternLM2/3",
                    architectures=("LlamaForCausalLM", "MistralForCausalLM", "InternLM3ForCausalLM",
                                   "InternLM2ForCausalLM"), model_args=ModelArgs, model=Decoder,
                    # llama.cpp writes InternLM2 as a Llama (wqkv cut, q/k rows permuted) under its own name
                    gguf=GGUFNames("llama", GGUF_LAYERS, tensor=unpermute_rotary_rows, also=("internlm2",)),
                    layouts={"InternLM2ForCausalLM": internlm2_layout})
