"""Named building blocks that decoder families share. Each is a mixin that overrides hooks of the shared decoder
(decoder.Decoder) one documented way, so a family states what it is made of, `class Model(FusedGateUp, Decoder)`,
instead of borrowing another family's class or methods: a change to one family then never changes another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from . import decoder
from .layers import head_norm

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder


class FusedGateUp(decoder.Decoder):
    """The MLP's gate and up projections stored as one `gate_up_proj` [2 * intermediate, hidden]: one matmul,
    split in two after it."""

    def gate_up(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> list[str]:
        n = self.args.intermediate_size
        fused = g.linear(x, weights.linear(f"{prefix}.gate_up_proj.weight"), f"{prefix}.gate_up_proj")
        return g.op("Split", [fused, g.ints([n, n], f"{prefix}.gate_up_proj/sizes")], name=f"{prefix}.gate_up_split",
                    outputs=2, axis=-1)


class HeadNormedQK(decoder.Decoder):
    """An RMSNorm over each query and each key head between the projections and rotary (`q_norm`, `k_norm`
    weights of one head's width); the projections stay apart, since the norms sit between them and rotary."""

    packed_qkv = False

    def project_qkv(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> list[str]:
        q, k, v = super().project_qkv(g, weights, prefix, x)
        a = self.args
        q = head_norm(g, q, self.norm_weight(weights, f"{prefix}.q_norm.weight"),
                      a.num_attention_heads, a.head_dim, a.rms_norm_eps, f"{prefix}.q_norm")
        k = head_norm(g, k, self.norm_weight(weights, f"{prefix}.k_norm.weight"),
                      a.num_key_value_heads, a.head_dim, a.rms_norm_eps, f"{prefix}.k_norm")
        return [q, k, v]


_Scaled = TypeVar("_Scaled", bound="ScaledArgs")


@dataclass
class ScaledArgs(decoder.ModelArgs):
    """The four constants of muP-style decoders, under the names ScaledStreams reads (a family maps its own)."""

    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_config(cls: type[_Scaled], config: dict) -> _Scaled:
        args = super().from_config(config)
        for name in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"):
            setattr(args, name, float(config.get(name, 1.0)))
        return args


class ScaledStreams(decoder.Decoder):
    """muP's constants (ScaledArgs): embeddings times embedding_multiplier, attention scores scaled by
    attention_multiplier, each block's output times residual_multiplier before it joins the residual stream, and
    the logits divided by logits_scaling."""

    args: ScaledArgs

    @property
    def embedding_multiplier(self) -> np.float32:
        return np.float32(self.args.embedding_multiplier)

    def attention_scale(self) -> float:
        return self.args.attention_multiplier

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        a, prefix = self.args, f"model.layers.{i}"
        scaled = lambda t, name: g.mul(t, g.const(np.float32(a.residual_multiplier), f"{name}.m"), name)  # noqa: E731
        attn = scaled(self.attention(g, weights, i, x, ctx), f"{prefix}.attn_residual")
        post = f"{prefix}.post_attention_layernorm"
        x, residual = g.add_rms_norm(attn, residual, self.norm_weight(weights, f"{post}.weight"), a.rms_norm_eps, post)
        return scaled(self.mlp(g, weights, f"{prefix}.mlp", x), f"{prefix}.mlp_residual"), residual

    def final_logits(self, g: GraphBuilder, logits: str) -> str:
        return g.op("Div", [logits, g.const(np.float32(self.args.logits_scaling), "logits_scaling")],
                    name="logits_scaled")


class SqrtScaledEmbeddings(decoder.Decoder):
    """Token embeddings multiplied by sqrt(hidden size) as they enter the decoder."""

    @property
    def embedding_multiplier(self) -> np.float32:
        return np.float32(self.args.hidden_size ** 0.5)


class UnitOffsetNorms(decoder.Decoder):
    """RMSNorm weights stored as offsets from 1: the norm multiplies by (1 + w)."""

    def norm_weight(self, weights: ModelSource, name: str) -> np.ndarray:
        return weights.tensor(name) + np.float32(1.0)
