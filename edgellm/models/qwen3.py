"""Qwen3: the Llama decoder with an RMSNorm over each query and key head before rotary (q_norm, k_norm)."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.blocks import HeadNormedQK
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS

ModelArgs = decoder.ModelArgs


class Model(HeadNormedQK, decoder.Decoder):
    pass


FAMILY = TextFamily(name="qwen3", title="Qwen3", architectures=("Qwen3ForCausalLM",), model_args=ModelArgs, model=Model,
                    gguf=GGUFNames("qwen3", GGUF_LAYERS))
