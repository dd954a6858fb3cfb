"""Gemma (GemmaForCausalLM, the first Gemma): the Llama layout with Gemma's embeddings scaled by sqrt(hidden size),
RMSNorm weights stored as offsets from 1 and a GELU (tanh) gate; no windows, no soft-capping, no extra norms."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.blocks import SqrtScaledEmbeddings, UnitOffsetNorms
from ..modeling.family import GGUFNames, TextFamily
from . import gemma3
from .llama import GGUF_LAYERS


class ModelArgs(decoder.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        act = config.get("hidden_act") or "gelu_pytorch_tanh"
        return super().from_config({"tie_word_embeddings": True, **config,  # the original releases' "gelu" meant tanh
                                    "hidden_act": "gelu_pytorch_tanh" if act == "gelu" else act})


class Model(SqrtScaledEmbeddings, UnitOffsetNorms, decoder.Decoder):
    pass


FAMILY = TextFamily(name="gemma", title="Gemma", architectures=("GemmaForCausalLM",), model_args=ModelArgs,
                    model=Model, gguf=GGUFNames("gemma", GGUF_LAYERS, tensor=gemma3.gguf_tensor,
                                                merges_by_rank=True))
