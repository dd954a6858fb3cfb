"""Qwen3: the Llama decoder with an RMSNorm over each query and key head before rotary (q_norm, k_norm)."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.family import GGUFNames, TextFamily
from ..modeling.layers import head_norm
from .llama import GGUF_LAYERS

ModelArgs = decoder.ModelArgs


class Model(decoder.Model):
    packed_qkv = False  # the norms sit between projection and rotary

    def project_qkv(self, g, weights, prefix, x):
        q, k, v = super().project_qkv(g, weights, prefix, x)
        a = self.args
        q = head_norm(g, q, self.norm_weight(weights, f"{prefix}.q_norm.weight"), a.num_attention_heads, a.head_dim,
                      a.rms_norm_eps, f"{prefix}.q_norm")
        k = head_norm(g, k, self.norm_weight(weights, f"{prefix}.k_norm.weight"), a.num_key_value_heads, a.head_dim,
                      a.rms_norm_eps, f"{prefix}.k_norm")
        return q, k, v


FAMILY = TextFamily(name="qwen3", title="Qwen3", architectures=("Qwen3ForCausalLM",), model_args=ModelArgs, model=Model,
                    gguf=GGUFNames("qwen3", GGUF_LAYERS))
