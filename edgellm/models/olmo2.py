"""OLMo 2 (Olmo2ForCausalLM): the Llama decoder with its norms after attention and after the MLP instead of before
them (the residual stream enters each block as it is), and RMSNorms over the whole q and k projections."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling import decoder
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder

ModelArgs = decoder.ModelArgs


class Model(decoder.Decoder):
    packed_qkv = False  # the norms sit between projection and rotary

    def project_qkv(self, g: GraphBuilder, weights: ModelSource, prefix, x):
        q, k, v = super().project_qkv(g, weights, prefix, x)
        eps = self.args.rms_norm_eps
        q = g.rms_norm(q, self.norm_weight(weights, f"{prefix}.q_norm.weight"), eps, f"{prefix}.q_norm")
        k = g.rms_norm(k, self.norm_weight(weights, f"{prefix}.k_norm.weight"), eps, f"{prefix}.k_norm")
        return q, k, v

    def layer_input(self, g: GraphBuilder, weights: ModelSource, i: int, pending: str,
                    residual: str | None) -> tuple[str, str]:
        stream = pending if residual is None else g.add(pending, residual, f"model.layers.{i}.input")
        return stream, stream

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        a, prefix = self.args, f"model.layers.{i}"
        eps, norm = a.rms_norm_eps, lambda name: self.norm_weight(weights, f"{name}.weight")  # noqa: E731
        after_attention = f"{prefix}.post_attention_layernorm"
        attn = g.rms_norm(self.attention(g, weights, i, x, ctx), norm(after_attention), eps, after_attention)
        stream = g.add(attn, residual, f"{prefix}.attention_residual")
        after_mlp = f"{prefix}.post_feedforward_layernorm"
        return g.rms_norm(self.mlp(g, weights, f"{prefix}.mlp", stream), norm(after_mlp), eps, after_mlp), stream


# llama.cpp keeps OLMo 2's rows as they are, and names its norms after the blocks as Gemma's
GGUF_LAYERS_OLMO2 = {**{k: v for k, v in GGUF_LAYERS.items() if "norm" not in k or "_q_" in k or "_k_" in k},
                     "post_attention_norm.weight": "post_attention_layernorm.weight",
                     "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
FAMILY = TextFamily(name="olmo2", title="OLMo 2", architectures=("Olmo2ForCausalLM",), model_args=ModelArgs,
                    model=Model, gguf=GGUFNames("olmo2", GGUF_LAYERS_OLMO2))
