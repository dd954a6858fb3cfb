"""Granite 3.x (GraniteForCausalLM): the Llama decoder with four constants of its own: embeddings times
embedding_multiplier, attention scaled by attention_multiplier, each block's output times residual_multiplier before
it joins the residual stream, and the logits divided by logits_scaling."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.blocks import ScaledArgs, ScaledStreams
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS, unpermute_rotary_rows

# Granite's config names are the muP constants' own (blocks.ScaledArgs)
ModelArgs = ScaledArgs


class Model(ScaledStreams, decoder.Decoder):
    pass


def gguf_config(meta: dict, config: dict) -> dict:
    """llama.cpp stores the four constants as scales (an absent attention scale is 1/sqrt(head_dim))."""
    return {"attention_multiplier": meta.get("granite.attention.scale") or config["head_dim"] ** -0.5,
            "embedding_multiplier": meta.get("granite.embedding_scale", 1.0),
            "residual_multiplier": meta.get("granite.residual_scale", 1.0),
            "logits_scaling": meta.get("granite.logit_scale", 1.0)}


FAMILY = TextFamily(name="granite", title="Granite 3", architectures=("GraniteForCausalLM",), model_args=ModelArgs,
                    model=Model, gguf=GGUFNames("granite", GGUF_LAYERS, config=gguf_config,
                                                tensor=unpermute_rotary_rows))
