"""Qwen3-VL: the Qwen2-VL recipe with a learned position table (resampled bilinearly to each image's patch grid),
16px patches, a GELU MLP in the ViT, a Qwen3 decoder whose M-RoPE axes interleave over the frequencies, and
DeepStack: mergers at some ViT depths whose features are added to the image positions after the decoder's first
layers. Names are the checkpoint's (model.visual.blocks.N.attn.qkv, model.language_model.layers.N ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...checkpoint import ModelSource
from ...modeling import layers
from ...modeling.family import VisionOptions, VisionParts
from ...modeling.layers import activation
from .. import qwen3
from ..qwen2_vl import vision as qwen2_vl
from .language import Model
from .processing import Settings

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder


@dataclass
class VisionArgs(qwen2_vl.VisionArgs):
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def grid_per_side(self) -> int:  # the learned position table is a square grid
        return int(round(self.num_position_embeddings ** 0.5))

    @classmethod
    def from_config(cls, config: dict, text_config: dict) -> VisionArgs:
        v = config["vision_config"]
        return cls(version="3", hidden_size=v["hidden_size"], depth=v["depth"], num_heads=v["num_heads"],
                   intermediate_size=v["intermediate_size"], hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
                   patch_size=v.get("patch_size", 16), temporal_patch_size=v.get("temporal_patch_size", 2),
                   spatial_merge_size=v.get("spatial_merge_size", 2),
                   rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                   text_hidden_size=v.get("out_hidden_size", text_config["hidden_size"]),
                   num_position_embeddings=v["num_position_embeddings"],
                   deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", ())))


def split(source: ModelSource, options: VisionOptions) -> VisionParts:
    """A Qwen3-VL checkpoint as its decoder (interleaved M-RoPE, DeepStack) and the vision graph."""
    config = source.config
    args = VisionArgs.from_config(config, config["text_config"])
    text_config = dict(config["text_config"])
    text_config["architectures"] = ["Qwen3ForCausalLM"]
    text, vision, section = qwen2_vl.text_part(source, text_config)
    found = qwen2_vl.settings(source, args, config, options.max_pixels, options.static_size)
    found = Settings(**{**asdict(found), "grid_per_side": args.grid_per_side, "image_start": "<|vision_start|>",
                        "image_end": "<|vision_end|>", "tokens_per_second": None})
    decoder = Model(qwen3.ModelArgs.from_config(text_config), section, len(args.deepstack_visual_indexes))
    vit = VisionModel(args, qwen2_vl.static_patches(found))
    return VisionParts(text, decoder, qwen3.FAMILY.name, vit, vision, found)


class VisionModel(qwen2_vl.VisionModel):
    """pixel_values [patches, 3 x 2 x 16 x 16], patch_positions [patches, 2] and the bilinear taps into the
    position table (position_indices, position_weights [patches, 4]) of one image or temporal slice ->
    image_embeds [patches / 4, text hidden] and deepstack_embeds [K, patches / 4, text hidden]."""

    args: VisionArgs

    def mlp(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> str:
        h = activation(g, layers.linear(g, weights, x, f"{prefix}.linear_fc1"), self.args.hidden_act, f"{prefix}.act")
        return layers.linear(g, weights, h, f"{prefix}.linear_fc2")

    def merger(self, g: GraphBuilder, weights: ModelSource, x: str, prefix: str, norm_after_grouping: bool) -> str:
        """2x2 patch groups (consecutive in the preprocessor's order) -> LayerNorm, GELU MLP -> text width; the
        DeepStack mergers normalise the grouped vector, the final one each patch before grouping."""
        width = self.args.hidden_size * self.args.spatial_merge_size ** 2
        if not norm_after_grouping:
            x = self.norm(g, weights, x, f"{prefix}.norm")
        x = g.reshape(x, [-1, width], f"{prefix}/group")
        if norm_after_grouping:
            x = self.norm(g, weights, x, f"{prefix}.norm")
        x = activation(g, layers.linear(g, weights, x, f"{prefix}.linear_fc1"), "gelu", f"{prefix}.act")
        return layers.linear(g, weights, x, f"{prefix}.linear_fc2")

    def build(self, g: GraphBuilder, weights: ModelSource) -> None:
        a = self.args
        patch_dim = 3 * a.temporal_patch_size * a.patch_size ** 2
        pixels = g.input("pixel_values", np.float32, [self.patches, patch_dim])
        positions = g.input("patch_positions", np.int64, [self.patches, 2])
        taps = g.input("position_indices", np.int64, [self.patches, 4])
        tap_weights = g.input("position_weights", np.float32, [self.patches, 4])
        kernel = weights.tensor("visual.patch_embed.proj.weight").reshape(a.hidden_size, patch_dim)
        x = g.linear(pixels, kernel, "visual.patch_embed.proj", weights.tensor("visual.patch_embed.proj.bias"))
        table = g.const(weights.tensor("visual.pos_embed.weight"), "visual.pos_embed.weight")
        picked = g.op("Gather", [table, taps], name="visual.pos_embed/taps", axis=0)  # [patches, 4, hidden]
        weighted = g.mul(picked, g.op("Unsqueeze", [tap_weights, g.ints([2], "visual.pos_embed/axis")],
                                      name="visual.pos_embed/weights"), "visual.pos_embed/weighted")
        x = g.add(x, g.op("ReduceSum", [weighted, g.ints([1], "visual.pos_embed/sum_axis")],
                          name="visual.pos_embed/bilinear", keepdims=0), "visual.pos_embed/add")
        rope = self.rope(g, pixels, positions)
        deep = []
        for i in range(a.depth):
            x = self.block(g, weights, i, x, rope, None)
            if i in a.deepstack_visual_indexes:
                k = a.deepstack_visual_indexes.index(i)
                merged = self.merger(g, weights, x, f"visual.deepstack_merger_list.{k}", norm_after_grouping=True)
                deep.append(g.op("Unsqueeze", [merged, g.ints([0], f"deepstack/{k}/axis")], name=f"deepstack/{k}"))
        x = self.merger(g, weights, x, "visual.merger", norm_after_grouping=False)
        g.output("image_embeds", np.float32, ["tokens", a.text_hidden_size], value=x)
        if deep:
            g.output("deepstack_embeds", np.float32, [len(deep), "tokens", a.text_hidden_size],
                     value=g.op("Concat", deep, name="deepstack/stack", axis=0))
