"""Gemma 3 text decoder (Gemma3ForCausalLM, and the decoder of Gemma3ForConditionalGeneration).

Differences from Llama: embeddings scaled by sqrt(hidden size); RMSNorm weights are offsets from 1; q/k RMSNorm per
head (blocks.HeadNormedQK); norms after attention and after the MLP as well as before; a GELU (tanh) gate; layers
alternate between a sliding window (local rotary base) and full attention (global base, possibly scaled); the query
scale comes from query_pre_attn_scalar; optional tanh soft-capping of attention scores and of the final logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..errors import EdgeLLMError
from ..modeling import decoder
from ..modeling.blocks import HeadNormedQK, SqrtScaledEmbeddings, UnitOffsetNorms
from ..modeling.family import GGUFNames, TextFamily
from ..modeling.layers import rope_parameters, rope_tables
from .llama import GGUF_LAYERS

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder

_GemmaArgs = TypeVar("_GemmaArgs", bound="ModelArgs")


@dataclass
class ModelArgs(decoder.ModelArgs):
    local_rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    @classmethod
    def from_config(cls: type[_GemmaArgs], config: dict) -> _GemmaArgs:
        if config.get("use_bidirectional_attention"):
            raise EdgeLLMError("Gemma 3 with bidirectional attention (an embedding model) is not a generator")
        args = super().from_config({**config, "hidden_act": config.get("hidden_activation", "gelu_pytorch_tanh"),
                                    "use_sliding_window": True})
        layers = args.num_hidden_layers
        pattern = config.get("sliding_window_pattern", 6)
        if not config.get("layer_types"):
            args.layer_types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                     for i in range(layers))
        params = config.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: one rope entry per layer type
            args.rope = rope_parameters({"rope_parameters": params["full_attention"]})
            args.local_rope = rope_parameters({"rope_parameters": params["sliding_attention"]})
        else:
            args.local_rope = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}
        args.query_pre_attn_scalar = float(config.get("query_pre_attn_scalar") or args.head_dim)
        args.attn_logit_softcapping = config.get("attn_logit_softcapping")
        args.final_logit_softcapping = config.get("final_logit_softcapping")
        return args


class GemmaDecoder(SqrtScaledEmbeddings, UnitOffsetNorms, decoder.Decoder):
    """The decoder of Gemma 2 and 3 (this module's docstring, less the per-head q/k norms only Gemma 3 has)."""

    args: ModelArgs

    def attention_scale(self) -> float:
        return float(self.args.query_pre_attn_scalar ** -0.5)

    def rotary(self, g: GraphBuilder, ctx: dict, seq_length: int) -> None:
        a = self.args
        for kind, rope in (("global", a.rope), ("local", a.local_rope)):
            cos, sin = rope_tables(rope, a.head_dim, seq_length)
            ctx[kind] = (g.const(cos, f"rope.{kind}.cos"), g.const(sin, f"rope.{kind}.sin"))

    def rotary_tables(self, i: int, ctx: dict) -> tuple[str, str]:
        return ctx["local" if self.sliding(i) else "global"]

    def attention_options(self, i: int) -> dict:
        a, options = self.args, super().attention_options(i)
        if a.attn_logit_softcapping:
            options["softcap"] = float(a.attn_logit_softcapping)
        return options

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        return self.sandwiched(g, weights, i, x, residual, ctx, ("post_attention_layernorm",
                                                                 "pre_feedforward_layernorm",
                                                                 "post_feedforward_layernorm"))

    def final_logits(self, g: GraphBuilder, logits: str) -> str:
        if not self.args.final_logit_softcapping:
            return logits
        cap = g.const(np.float32(self.args.final_logit_softcapping), "final_logit_softcapping")
        return g.mul(g.op("Tanh", [g.op("Div", [logits, cap], name="softcap/scale")], name="softcap/tanh"), cap,
                     "softcap")


class Model(HeadNormedQK, GemmaDecoder):
    args: ModelArgs


def gguf_config(meta: dict, config: dict) -> dict:
    """What llama.cpp's Gemma 3 support takes as given rather than storing: every 6th layer global, a local rotary
    base of 10,000, and the query scale of 1/sqrt(head_dim) (27B, the 62-layer one: hidden/heads)."""
    layers = config["num_hidden_layers"]
    extra = {"sliding_window": meta.get("gemma3.attention.sliding_window"), "rope_local_base_freq": 10000.0,
             "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"] if layers == 62
                                       else config["head_dim"]),
             "attn_logit_softcapping": meta.get("gemma3.attn_logit_softcapping"),
             "final_logit_softcapping": meta.get("gemma3.final_logit_softcapping")}
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: sliding or not
        extra["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        extra["sliding_window_pattern"] = int(pattern)
    return extra


def gguf_tensor(name: str, w, config: dict):
    """llama.cpp stores Gemma's (1 + w) norm weights with the 1 added."""
    return w - np.float32(1.0) if name.endswith("norm.weight") else w


# Gemma 3 norms both sides of attention and of the MLP; llama.cpp's "ffn_norm" is the one before the MLP
GGUF_LAYERS_GEMMA3 = {**GGUF_LAYERS, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                      "post_attention_norm.weight": "post_attention_layernorm.weight",
                      "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}

FAMILY = TextFamily(name="gemma3", title="Gemma 3 text", architectures=("Gemma3ForCausalLM",),
                    model_args=ModelArgs, model=Model,
                    gguf=GGUFNames("gemma3", GGUF_LAYERS_GEMMA3, config=gguf_config, tensor=gguf_tensor,
                                   merges_by_rank=True))
