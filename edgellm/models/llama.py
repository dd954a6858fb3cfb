"""Llama: Llama 2/3, SmolLM2, Mistral-style decoders; the shared decoder as it is."""

from __future__ import annotations

import re

import numpy as np

from ..modeling.decoder import Model, ModelArgs
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


FAMILY = TextFamily(name="llama", title="Llama 2/3, SmolLM2, Mistral",
                    architectures=("LlamaForCausalLM", "MistralForCausalLM"), model_args=ModelArgs, model=Model,
                    gguf=GGUFNames("llama", GGUF_LAYERS, tensor=unpermute_rotary_rows))
