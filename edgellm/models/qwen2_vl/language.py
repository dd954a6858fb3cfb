"""The Qwen2-VL decoder: Qwen2 whose rotary positions have three axes (M-RoPE: time, height, width). Each band of
rotary frequencies turns with one axis; text advances all three together, an image's tokens take (t, row, col)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...format import DecoderShape
from ...modeling.decoder import Decoder
from ...modeling.layers import inv_freq, mrope_tables
from .. import qwen2

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder


class MRope(Decoder):
    """Decoder hooks for 3-axis rotary positions; listed before a text family's Model, whose decoder it extends."""

    position_rows = 3
    packed_qkv = False  # GroupQueryAttention's own rotary counts positions from the cache length: not these
    interleaved = False  # Qwen3-VL: the axes take turns over the frequencies instead of bands

    def __init__(self, args, mrope_section: list[int]):
        super().__init__(args)
        self.mrope_section = list(mrope_section)

    def rotary(self, g: GraphBuilder, ctx: dict, seq_length: int) -> None:
        ctx["cos"], ctx["sin"], ctx["position_ids"] = mrope_tables(
            g, ctx["position_ids"], ctx["inputs_embeds"], inv_freq(self.args.rope, self.args.head_dim),
            self.mrope_section, self.interleaved)

    def shape(self) -> DecoderShape:
        shape = super().shape()
        shape.mrope_section = self.mrope_section
        return shape


class Model(MRope, qwen2.Model):
    pass
