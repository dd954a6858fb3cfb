"""SigLIP vision tower (SiglipVisionModel): 14px patch convolution, learned absolute positions, pre-norm encoder
layers with biased attention and a GELU MLP, and a final LayerNorm. Gemma 3 reads its patch features; names are
the checkpoint's (vision_tower.vision_model.encoder.layers.N.self_attn.q_proj ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..convert.graph import MS, GraphBuilder
from ..errors import EdgeLLMError
from .llama import activation


@dataclass
class SiglipArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, v: dict) -> "SiglipArgs":
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

    def linear(self, g: GraphBuilder, weights, x: str, name: str) -> str:
        return g.linear(x, weights.linear(f"{name}.weight"), name, weights.tensor(f"{name}.bias"))

    def norm(self, g: GraphBuilder, weights, x: str, name: str) -> str:
        return g.layer_norm(x, weights.tensor(f"{name}.weight"), weights.tensor(f"{name}.bias"),
                            self.args.layer_norm_eps, name)

    def embeddings(self, g: GraphBuilder, weights, pixels: str) -> str:
        a, prefix = self.args, f"{self.prefix}.embeddings"
        x = patch_embedding(g, weights, pixels, f"{prefix}.patch_embedding", a.patch_size, a.hidden_size)
        positions = weights.tensor(f"{prefix}.position_embedding.weight")
        if positions.shape[0] != a.grid ** 2:
            raise EdgeLLMError(f"SigLIP position table holds {positions.shape[0]} patches, {a.image_size}px images "
                               f"have {a.grid ** 2}; interpolated positions are not supported")
        return g.add(x, g.const(positions[None], f"{prefix}.position_embedding"), f"{prefix}/positions")

    def layer(self, g: GraphBuilder, weights, i: int, x: str) -> str:
        a, prefix = self.args, f"{self.prefix}.encoder.layers.{i}"
        h = self.norm(g, weights, x, f"{prefix}.layer_norm1")
        q, k, v = (self.linear(g, weights, h, f"{prefix}.self_attn.{p}_proj") for p in "qkv")
        h = g.op("MultiHeadAttention", [q, k, v], name=f"{prefix}.self_attn", domain=MS,
                 num_heads=a.num_attention_heads)
        x = g.add(x, self.linear(g, weights, h, f"{prefix}.self_attn.out_proj"), f"{prefix}/res1")
        h = self.norm(g, weights, x, f"{prefix}.layer_norm2")
        h = activation(g, self.linear(g, weights, h, f"{prefix}.mlp.fc1"), a.hidden_act, f"{prefix}.mlp.act")
        return g.add(x, self.linear(g, weights, h, f"{prefix}.mlp.fc2"), f"{prefix}/res2")

    def build(self, g: GraphBuilder, weights, pixels: str) -> str:
        x = self.embeddings(g, weights, pixels)
        for i in range(self.args.num_hidden_layers):
            x = self.layer(g, weights, i, x)
        return self.norm(g, weights, x, f"{self.prefix}.post_layernorm")


def patch_embedding(g: GraphBuilder, weights, pixels: str, name: str, patch: int, hidden: int) -> str:
    """[images, 3, H, W] -> [images, patches, hidden]: a stride-`patch` convolution, patches in row-major order."""
    x = g.op("Conv", [pixels, g.const(weights.tensor(f"{name}.weight"), f"{name}.weight"),
                      g.const(weights.tensor(f"{name}.bias"), f"{name}.bias")], name=name,
             kernel_shape=[patch] * 2, strides=[patch] * 2)
    return g.op("Transpose", [g.reshape(x, [0, hidden, -1], f"{name}/flatten")], name=f"{name}/nlc", perm=[0, 2, 1])
