"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): the Llama decoder with biases on the q, k, v projections."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS


class ModelArgs(decoder.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        args = super().from_config(config)
        args.attention_bias = True
        return args


Model = decoder.Decoder

FAMILY = TextFamily(name="qwen2", title="Qwen2, Qwen2.5", architectures=("Qwen2ForCausalLM",), model_args=ModelArgs,
                    model=Model,
                    gguf=GGUFNames("qwen2", GGUF_LAYERS))
