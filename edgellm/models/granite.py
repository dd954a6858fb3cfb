"""Granite 3.x (GraniteForCausalLM): the Llama decoder with four constants of its own: embeddings times
embedding_multiplier, attention scaled by attention_multiplier, each block's output times residual_multiplier before
it joins the residual stream, and the logits divided by logits_scaling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..modeling import decoder
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS, unpermute_rotary_rows


@dataclass
class ModelArgs(decoder.ModelArgs):
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        args = super().from_config(config)
        for name in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"):
            setattr(args, name, float(config.get(name, 1.0)))
        return args


class Model(decoder.Model):
    @property
    def embedding_multiplier(self) -> np.float32:
        return np.float32(self.args.embedding_multiplier)

    def attention_scale(self) -> float:
        return self.args.attention_multiplier

    def layer(self, g, weights, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        a, prefix = self.args, f"model.layers.{i}"
        scaled = lambda t, name: g.mul(t, g.const(np.float32(a.residual_multiplier), f"{name}.m"), name)  # noqa: E731
        attn = scaled(self.attention(g, weights, i, x, ctx), f"{prefix}.attn_residual")
        post = f"{prefix}.post_attention_layernorm"
        x, residual = g.add_rms_norm(attn, residual, self.norm_weight(weights, f"{post}.weight"), a.rms_norm_eps, post)
        return scaled(self.mlp(g, weights, f"{prefix}.mlp", x), f"{prefix}.mlp_residual"), residual

    def final_logits(self, g, logits: str) -> str:
        return g.op("Div", [logits, g.const(np.float32(self.args.logits_scaling), "logits_scaling")],
                    name="logits_scaled")


def gguf_config(meta: dict, config: dict) -> dict:
    """llama.cpp stores the four constants as scales (an absent attention scale is 1/sqrt(head_dim))."""
    return {"attention_multiplier": meta.get("granite.attention.scale") or config["head_dim"] ** -0.5,
            "embedding_multiplier": meta.get("granite.embedding_scale", 1.0),
            "residual_multiplier": meta.get("granite.residual_scale", 1.0),
            "logits_scaling": meta.get("granite.logit_scale", 1.0)}


FAMILY = TextFamily(name="granite", title="Granite 3", architectures=("GraniteForCausalLM",), model_args=ModelArgs,
                    model=Model, gguf=GGUFNames("granite", GGUF_LAYERS, config=gguf_config,
                                                tensor=unpermute_rotary_rows))
