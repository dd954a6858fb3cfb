"""MiniCPM 1/2/4 (MiniCPMForCausalLM, remote code): the Llama decoder with muP's three constants, which are
Granite's under other names: embeddings times scale_emb, each block's output times scale_depth / sqrt(layers)
before it joins the residual stream, and the last hidden state divided by hidden_size / dim_model_base before the
lm_head (the same as dividing the logits)."""

from __future__ import annotations

import math

from ..modeling.family import TextFamily
from . import granite


class ModelArgs(granite.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        return super().from_config({
            **config, "embedding_multiplier": config.get("scale_emb", 1.0),
            "residual_multiplier": config.get("scale_depth", math.sqrt(layers)) / math.sqrt(layers),
            "logits_scaling": hidden / config.get("dim_model_base", hidden), "attention_multiplier": head_dim ** -0.5})


FAMILY = TextFamily(name="minicpm", title="MiniCPM 1/2/4", architectures=("MiniCPMForCausalLM",),
                    model_args=ModelArgs, model=granite.Model)
