"""MiniCPM 1/2/4 (MiniCPMForCausalLM, remote code): the Llama decoder with muP's three constants, which are Granite's
under other names (blocks.ScaledStreams): embeddings times scale_emb, each block's output times scale_depth /
sqrt(layers) before it joins the residual stream, and the last hidden state divided by hidden_size / dim_model_base
before the lm_head (the same as dividing the logits)."""

from __future__ import annotations

import math
from typing import TypeVar

from ..modeling import decoder
from ..modeling.blocks import ScaledArgs, ScaledStreams
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS, unpermute_rotary_rows

_Args = TypeVar("_Args", bound="ModelArgs")


class ModelArgs(ScaledArgs):
    @classmethod
    def from_config(cls: type[_Args], config: dict) -> _Args:
        layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        return super().from_config({
            **config, "embedding_multiplier": config.get("scale_emb", 1.0),
            "residual_multiplier": config.get("scale_depth", math.sqrt(layers)) / math.sqrt(layers),
            "logits_scaling": hidden / config.get("dim_model_base", hidden), "attention_multiplier": head_dim ** -0.5})


def gguf_config(meta: dict, config: dict) -> dict:
    """llama.cpp stores the constants as Granite's scales; back to MiniCPM's names."""
    layers = config["num_hidden_layers"]
    return {"scale_emb": meta.get("minicpm.embedding_scale", 1.0),
            "scale_depth": meta.get("minicpm.residual_scale", 1.0) * math.sqrt(layers),
            "dim_model_base": config["hidden_size"] / meta.get("minicpm.logit_scale", 1.0)}


class Model(ScaledStreams, decoder.Decoder):
    pass


FAMILY = TextFamily(name="minicpm", title="MiniCPM 1/2/4", architectures=("MiniCPMForCausalLM",),
                    model_args=ModelArgs, model=Model,
                    gguf=GGUFNames("minicpm", GGUF_LAYERS, config=gguf_config, tensor=unpermute_rotary_rows))
