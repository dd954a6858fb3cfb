"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): the Llama decoder with biases on the q, k, v projections."""

from __future__ import annotations

from . import llama

ARCHITECTURES = ["Qwen2ForCausalLM"]


class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = super().from_config(config)
        args.attention_bias = True
        return args


Model = llama.Model
