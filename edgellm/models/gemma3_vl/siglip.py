"""SigLIP vision tower (SiglipVisionModel): 14px patch convolution, learned absolute positions, pre-norm encoder
layers with biased attention and a GELU MLP, and a final LayerNorm. Gemma 3 reads its patch features; names are
the checkpoint's (vision_tower.vision_model.encoder.layers.N.self_attn.q_proj ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import EdgeLLMError
from ...modeling import layers
from ...modeling.layers import MS, VitArgs, activation, patch_embedding, vit_block

if TYPE_CHECKING:
    from ...checkpoint import ModelSource
    from ...convert.graph import GraphBuilder


@dataclass
class SiglipArgs(VitArgs):
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_config(cls, v: dict) -> SiglipArgs:
        return cls(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                   num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                   image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)),
                   layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
                   hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"))


class SiglipVisionTower:
    """pixel_values [images, 3, size, size] -> patch features [images, grid * grid, hidden] (post-LayerNorm)."""

    prefix = "vision_tower.vision_model"

    def __init__(self, args: SiglipArgs):
        self.args = args

    def norm(self, g: GraphBuilder, weights: ModelSource, x: str, name: str) -> str:
        return layers.norm(g, weights, x, name, self.args.layer_norm_eps)

    def embeddings(self, g: GraphBuilder, weights: ModelSource, pixels: str) -> str:
        a, prefix = self.args, f"{self.prefix}.embeddings"
        x = patch_embedding(g, weights, pixels, f"{prefix}.patch_embedding", a.patch_size, a.hidden_size)
        positions = weights.tensor(f"{prefix}.position_embedding.weight")
        if positions.shape[0] != a.grid ** 2:
            raise EdgeLLMError(f"SigLIP position table holds {positions.shape[0]} patches, {a.image_size}px images "
                               f"have {a.grid ** 2}; interpolated positions are not supported")
        return g.add(x, g.const(positions[None], f"{prefix}.position_embedding"), f"{prefix}/positions")

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str) -> str:
        a, prefix = self.args, f"{self.prefix}.encoder.layers.{i}"

        def attention(h: str) -> str:
            q, k, v = (layers.linear(g, weights, h, f"{prefix}.self_attn.{p}_proj") for p in "qkv")
            h = g.op("MultiHeadAttention", [q, k, v], name=f"{prefix}.self_attn", domain=MS,
                     num_heads=a.num_attention_heads)
            return layers.linear(g, weights, h, f"{prefix}.self_attn.out_proj")

        def mlp(h: str) -> str:
            h = activation(g, layers.linear(g, weights, h, f"{prefix}.mlp.fc1"), a.hidden_act, f"{prefix}.mlp.act")
            return layers.linear(g, weights, h, f"{prefix}.mlp.fc2")

        return vit_block(g, x, prefix, lambda h: self.norm(g, weights, h, f"{prefix}.layer_norm1"), attention,
                         lambda h: self.norm(g, weights, h, f"{prefix}.layer_norm2"), mlp)

    def build(self, g: GraphBuilder, weights: ModelSource, pixels: str) -> str:
        x = self.embeddings(g, weights, pixels)
        for i in range(self.args.num_hidden_layers):
            x = self.layer(g, weights, i, x)
        return self.norm(g, weights, x, f"{self.prefix}.post_layernorm")

