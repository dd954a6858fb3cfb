"""The Qwen3-VL decoder: Qwen3 with interleaved M-RoPE (every Qwen3-VL decoder interleaves its axes; transformers
hard-codes it) and DeepStack: the features of K ViT depths (input deepstack_embeds [K, positions, hidden], zero
away from images) are added to the image positions after the first K layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import qwen3
from ..qwen2_vl.language import MRope

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder


class Model(MRope, qwen3.Model):
    interleaved = True

    def __init__(self, args, mrope_section: list[int], deepstack_layers: int):
        super().__init__(args, mrope_section)
        self.deepstack_layers = deepstack_layers

    def extra_inputs(self, g: GraphBuilder, ctx: dict) -> None:
        if self.deepstack_layers:
            ctx["deepstack_embeds"] = g.input("deepstack_embeds", np.float32,
                                              [self.deepstack_layers, "sequence", self.args.hidden_size])

    def after_layer(self, g: GraphBuilder, i: int, hidden: str, ctx: dict) -> str:
        if i >= self.deepstack_layers:
            return hidden
        # zero except at image positions; joins the residual with the next norm
        return g.add(hidden, g.op("Gather", [ctx["deepstack_embeds"], g.ints(i, f"deepstack/{i}")],
                                  name=f"deepstack/layer{i}", axis=0), f"model.layers.{i}/deepstack")
