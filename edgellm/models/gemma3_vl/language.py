"""The Gemma 3 decoder of the vision-language model: the tokens of one image attend to each other in both
directions. The graph takes `token_groups` (per token, its image block or -1); in a prefill chunk that holds image
tokens, each layer recomputes attention over the cache with the model's mask instead of GroupQueryAttention's
causal one. Decoding never takes that path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...modeling.layers import INT64
from .. import gemma3

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder


class Model(gemma3.Model):
    def extra_inputs(self, g: GraphBuilder, ctx: dict) -> None:
        ctx["token_groups"] = g.input("token_groups", np.int64, ["sequence"])
        top = g.op("ReduceMax", [ctx["token_groups"]], name="image_blocks/max", keepdims=0)
        ctx["has_image_blocks"] = g.op("GreaterOrEqual", [top, g.ints(0, "image_blocks/zero")],
                                       name="image_blocks/any")

    def attention_output(self, g: GraphBuilder, i: int, out: str, q: str, ctx: dict) -> str:
        # A chunk holding image tokens is recomputed from the cache GroupQueryAttention has just written, with the
        # model's mask; other chunks (all of decoding) keep GroupQueryAttention's causal result.
        name = f"model.layers.{i}.self_attn.image_blocks"
        exact, kept = g.branch(), g.branch()
        window = self.args.sliding_window if self.sliding(i) else None
        # the branch reads the cache through Identity nodes: OpenVINO's ONNX reader cannot convert an If whose
        # branch reads a graph output directly (ONNX Runtime removes the Identity nodes, copying nothing)
        key, value = (g.op("Identity", [f"present_{kind}.{i}"], name=f"{name}/{kind}_cache")
                      for kind in ("key", "value"))
        value = block_attention(exact, q, key, value, ctx, self.args, window, self.attention_scale(), name)
        return g.if_then_else(ctx["has_image_blocks"], (exact, value),
                              (kept, kept.op("Identity", [out], name=f"{name}/causal")), name)


def block_attention(g: GraphBuilder, q: str, key: str, value: str, ctx: dict, a: gemma3.ModelArgs, window: int | None,
                    scale: float, name: str) -> str:
    """Attention of a chunk's rotated queries over the cache with Gemma 3's multimodal mask: causal (and within
    the sliding window on local layers), and bidirectional between tokens of one image block (equal
    `token_groups` >= 0; a block never spans two chunks, the engine sees to it)."""
    kv, d = a.num_key_value_heads, a.head_dim
    ints = lambda v, n: g.ints(v, f"{name}/{n}")  # noqa: E731
    op = lambda kind, inputs, n, **kw: g.op(kind, inputs, name=f"{name}/{n}", **kw)  # noqa: E731
    total = op("Cast", [ctx["total_sequence_length"]], "total", to=INT64)
    length = op("Gather", [op("Shape", [q], "shape"), ints(1, "dim1")], "length", axis=0)
    past = op("Sub", [total, length], "past")
    q_pos = op("Unsqueeze", [op("Range", [past, total, ints(1, "one")], "q_range"), ints([1], "axis1")], "q_pos")
    k_pos = op("Unsqueeze", [op("Range", [ints(0, "zero"), total, ints(1, "one_k")], "k_range"), ints([0], "axis0")],
               "k_pos")
    allowed = op("LessOrEqual", [k_pos, q_pos], "causal")
    groups = ctx["token_groups"]
    key_groups = op("Pad", [groups, op("Concat", [op("Unsqueeze", [past, ints([0], "axis0b")], "pad_front"),
                                                  ints([0], "pad_end")], "pads", axis=0), ints(-1, "text")],
                    "key_groups")
    same = op("And", [op("Equal", [op("Unsqueeze", [groups, ints([1], "axis1b")], "q_groups"),
                                   op("Unsqueeze", [key_groups, ints([0], "axis0c")], "k_groups")], "same_group"),
                      op("Unsqueeze", [op("GreaterOrEqual", [groups, ints(0, "zero_g")], "is_image"),
                                       ints([1], "axis1c")], "q_is_image")], "same_block")
    allowed = op("Or", [allowed, same], "allowed")
    if window:
        recent = op("Greater", [k_pos, op("Sub", [q_pos, ints(window, "window")], "window_start")], "recent")
        allowed = op("And", [allowed, recent], "allowed_in_window")
    bias = op("Where", [allowed, g.const(np.float32(0), f"{name}/open"), g.const(np.float32(-1e30), f"{name}/shut")],
              "bias")

    # queries [1, S, heads * d] -> [1, kv, group, S, d]; cache [1, kv, seq, d] -> the first `total` positions
    queries = op("Transpose", [g.reshape(q, [0, 0, kv, -1, d], f"{name}/q_heads")], "q_t", perm=[0, 2, 3, 1, 4])
    ends = op("Unsqueeze", [total, ints([0], "axis0d")], "ends")
    cached = [op("Unsqueeze", [op("Slice", [t, ints([0], f"start_{t}"), ends, ints([2], f"axis_{t}")], f"slice_{t}"),
                               ints([2], f"group_axis_{t}")], f"{t}_5d") for t in (key, value)]
    scores = g.mul(op("MatMul", [queries, op("Transpose", [cached[0]], "k_t", perm=[0, 1, 2, 4, 3])], "scores"),
                   g.const(np.float32(scale), f"{name}/scale"), f"{name}/scaled")
    if a.attn_logit_softcapping:
        cap = g.const(np.float32(a.attn_logit_softcapping), f"{name}/softcap")
        scores = g.mul(op("Tanh", [op("Div", [scores, cap], "softcap_in")], "softcap_tanh"), cap, f"{name}/capped")
    weights = op("Softmax", [g.add(scores, bias, f"{name}/masked")], "softmax", axis=-1)
    out = op("Transpose", [op("MatMul", [weights, cached[1]], "mix")], "out_t", perm=[0, 3, 1, 2, 4])
    return g.reshape(out, [0, 0, -1], f"{name}/out")
