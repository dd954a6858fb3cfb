"""GLM-4 9B and ChatGLM (GlmForCausalLM; ChatGLM3 and glm-4-9b-chat in their remote-code layout, ChatGLMModel): the
Llama decoder with biased q, k, v projections, gate and up stored as one `gate_up_proj` (one matmul:
blocks.FusedGateUp), and rotary over the first half of each head turning interleaved pairs."""

from __future__ import annotations

import numpy as np

from ..checkpoint import MappedSource, ModelSource
from ..errors import EdgeLLMError
from ..modeling import decoder
from ..modeling.blocks import FusedGateUp
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS


class ModelArgs(decoder.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        return super().from_config({"attention_bias": True, **config})


class Model(FusedGateUp, decoder.Decoder):
    rotary_interleaved = True

    def qkv_weights(self, weights: ModelSource, prefix: str):
        if f"{prefix}.qkv_proj.weight" not in weights:
            return super().qkv_weights(weights, prefix)
        bias = [weights.tensor(f"{prefix}.qkv_proj.bias")] if self.args.attention_bias else None
        return [weights.linear(f"{prefix}.qkv_proj.weight")], bias  # a GGUF's fused attn_qkv


def chatglm_layout(source: ModelSource) -> ModelSource:
    """ChatGLM3 / glm-4-9b-chat as their remote code stores them: `transformer.encoder.layers.N.*`, q, k and v as
    one `query_key_value` (all query heads, then the key groups, then the value groups), the MLP's gate and up as
    one `dense_h_to_4h`, and a config of their own (num_layers, multi_query_group_num, kv_channels, rope_ratio)."""
    c = source.config
    for key, needed in (("rmsnorm", True), ("post_layer_norm", True), ("add_bias_linear", False),
                        ("apply_residual_connection_post_layernorm", False)):
        if bool(c.get(key, needed)) != needed:
            raise EdgeLLMError(f"a ChatGLM checkpoint with {key}={c.get(key)}: edgellm reads ChatGLM2/3 and "
                               f"glm-4-9b-chat, which have {key}={needed}")
    heads = c["num_attention_heads"]
    kv_heads = c["multi_query_group_num"] if c.get("multi_query_attention") else heads
    head_dim = c.get("kv_channels") or c["hidden_size"] // heads
    config = {
        "architectures": c["architectures"], "hidden_size": c["hidden_size"], "num_hidden_layers": c["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "intermediate_size": c["ffn_hidden_size"], "vocab_size": c["padded_vocab_size"],
        "rms_norm_eps": c.get("layernorm_epsilon", 1e-5), "attention_bias": bool(c.get("add_qkv_bias", False)),
        "tie_word_embeddings": False, "max_position_embeddings": c.get("seq_length", 2048),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0 * c.get("rope_ratio", 1),
                            "partial_rotary_factor": 0.5},
        **{k: c[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in c}}
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = {"q": np.arange(q), "k": np.arange(q, q + kv), "v": np.arange(q + kv, q + 2 * kv)}
    mapping: dict[str, tuple[str, np.ndarray | None]] = {
        "model.embed_tokens.weight": ("transformer.embedding.word_embeddings.weight", None),
        "model.norm.weight": ("transformer.encoder.final_layernorm.weight", None),
        "lm_head.weight": ("transformer.output_layer.weight", None)}
    for i in range(c["num_layers"]):
        mine, theirs = f"model.layers.{i}", f"transformer.encoder.layers.{i}"
        mapping.update({
            f"{mine}.input_layernorm.weight": (f"{theirs}.input_layernorm.weight", None),
            f"{mine}.post_attention_layernorm.weight": (f"{theirs}.post_attention_layernorm.weight", None),
            f"{mine}.self_attn.o_proj.weight": (f"{theirs}.self_attention.dense.weight", None),
            f"{mine}.mlp.gate_up_proj.weight": (f"{theirs}.mlp.dense_h_to_4h.weight", None),
            f"{mine}.mlp.down_proj.weight": (f"{theirs}.mlp.dense_4h_to_h.weight", None)})
        for p, r in rows.items():
            for part in ("weight", "bias"):
                mapping[f"{mine}.self_attn.{p}_proj.{part}"] = (f"{theirs}.self_attention.query_key_value.{part}", r)
    return MappedSource(source, config, mapping)


# llama.cpp's "chatglm" files (from ChatGLM3 / glm-4-9b-chat): q, k, v fused as attn_qkv, gate and up as ffn_up, the
# rows as they are (its rotary turns interleaved pairs too)
GGUF_LAYERS_CHATGLM = {**GGUF_LAYERS, "attn_qkv.weight": "self_attn.qkv_proj.weight",
                       "attn_qkv.bias": "self_attn.qkv_proj.bias", "ffn_up.weight": "mlp.gate_up_proj.weight"}
CHATGLM = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
FAMILY = TextFamily(name="glm", title="GLM-4 9B, ChatGLM3", architectures=("GlmForCausalLM", *CHATGLM),
                    model_args=ModelArgs, model=Model, layouts={a: chatglm_layout for a in CHATGLM},
                    gguf=GGUFNames("chatglm", GGUF_LAYERS_CHATGLM))
