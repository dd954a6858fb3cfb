"""Gemma 3 text decoder (Gemma3ForCausalLM, and the decoder of Gemma3ForConditionalGeneration).

Differences from Llama: embeddings scaled by sqrt(hidden size); RMSNorm weights are offsets from 1; q/k RMSNorm per
head; norms after attention and after the MLP as well as before; a GELU (tanh) gate; layers alternate between a
sliding window (local rotary base) and full attention (global base, possibly scaled); the query scale comes from
query_pre_attn_scalar; optional tanh soft-capping of attention scores and of the final logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..convert.graph import GraphBuilder
from ..errors import EdgeLLMError
from . import llama
from .qwen3 import head_norm
from .rope import cos_sin_cache, inv_freq, rope_parameters

ARCHITECTURES = ["Gemma3ForCausalLM"]


@dataclass
class ModelArgs(llama.ModelArgs):
    layer_types: tuple[str, ...] = ()
    local_rope: dict | None = None
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma 3 VLM: each run of image tokens attends to itself in both directions (set by gemma3_vl.split)
    image_blocks: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        if config.get("use_bidirectional_attention"):
            raise EdgeLLMError("Gemma 3 with bidirectional attention (an embedding model) is not a generator")
        args = super().from_config({**config, "hidden_act": config.get("hidden_activation", "gelu_pytorch_tanh"),
                                    "use_sliding_window": True})
        layers = args.num_hidden_layers
        pattern = config.get("sliding_window_pattern", 6)
        args.layer_types = tuple(config.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0
                                                               else "sliding_attention" for i in range(layers)])
        params = config.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: one rope entry per layer type
            args.rope = rope_parameters({"rope_parameters": params["full_attention"]})
            args.local_rope = rope_parameters({"rope_parameters": params["sliding_attention"]})
        else:
            args.local_rope = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}
        args.query_pre_attn_scalar = float(config.get("query_pre_attn_scalar") or args.head_dim)
        args.attn_logit_softcapping = config.get("attn_logit_softcapping")
        args.final_logit_softcapping = config.get("final_logit_softcapping")
        args.image_blocks = bool(config.get("bidirectional_image_blocks"))
        return args


class Model(llama.Model):
    packed_qkv = False  # q/k norms sit between projection and rotary

    @property
    def embedding_multiplier(self) -> np.float32:
        return np.float32(self.args.hidden_size ** 0.5)

    def norm_weight(self, weights, name: str) -> np.ndarray:
        return weights.tensor(name) + np.float32(1.0)

    def project_qkv(self, g, weights, prefix, x):
        q, k, v = super().project_qkv(g, weights, prefix, x)
        a = self.args
        q = head_norm(g, q, self.norm_weight(weights, f"{prefix}.q_norm.weight"), a.num_attention_heads, a,
                      f"{prefix}.q_norm")
        k = head_norm(g, k, self.norm_weight(weights, f"{prefix}.k_norm.weight"), a.num_key_value_heads, a,
                      f"{prefix}.k_norm")
        return q, k, v

    def attention_scale(self) -> float:
        return float(self.args.query_pre_attn_scalar ** -0.5)

    def check_supported(self, seq_length: int) -> None:
        pass  # sliding layers are built with GroupQueryAttention's local window

    def rotary_tables(self, i: int, ctx: dict) -> tuple[str, str]:
        return ctx["local" if self.args.layer_types[i] == "sliding_attention" else "global"]

    def attention_options(self, i: int) -> dict:
        a, options = self.args, {}
        if a.layer_types[i] == "sliding_attention" and a.sliding_window:
            options["local_window_size"] = int(a.sliding_window)
        if a.attn_logit_softcapping:
            options["softcap"] = float(a.attn_logit_softcapping)
        return options

    def attention_output(self, g: GraphBuilder, i: int, out: str, q: str, ctx: dict) -> str:
        if not self.args.image_blocks:
            return out
        # A chunk holding image tokens is recomputed from the cache GroupQueryAttention has just written, with the
        # model's mask; other chunks (all of decoding) keep GroupQueryAttention's causal result.
        name = f"model.layers.{i}.self_attn.image_blocks"
        exact, kept = g.branch(), g.branch()
        window = self.args.sliding_window if self.args.layer_types[i] == "sliding_attention" else None
        value = block_attention(exact, q, f"present_key.{i}", f"present_value.{i}", ctx, self.args, window,
                                self.attention_scale(), name)
        return g.if_then_else(ctx["has_image_blocks"], (exact, value),
                              (kept, kept.op("Identity", [out], name=f"{name}/causal")), name)

    def build(self, g: GraphBuilder, weights, seq_length: int) -> None:
        a = self.args
        ctx = llama.declare_decoder_io(g, a, seq_length)
        if a.image_blocks:  # per token: the image block it belongs to, or -1 for text
            ctx["token_groups"] = g.input("token_groups", np.int64, ["sequence"])
            top = g.op("ReduceMax", [ctx["token_groups"]], name="image_blocks/max", keepdims=0)
            ctx["has_image_blocks"] = g.op("GreaterOrEqual", [top, g.ints(0, "image_blocks/zero")],
                                           name="image_blocks/any")
        for kind, rope in (("global", a.rope), ("local", a.local_rope)):
            cos, sin = cos_sin_cache(inv_freq(rope, a.head_dim), seq_length)
            ctx[kind] = (g.const(cos, f"rope.{kind}.cos"), g.const(sin, f"rope.{kind}.sin"))

        eps, norm = a.rms_norm_eps, lambda name: self.norm_weight(weights, f"{name}.weight")  # noqa: E731
        hidden, branch = ctx["inputs_embeds"], None
        for i in range(a.num_hidden_layers):
            prefix = f"model.layers.{i}"
            if branch is None:
                x = g.rms_norm(hidden, norm(f"{prefix}.input_layernorm"), eps, f"{prefix}.input_layernorm")
            else:  # the previous layer's normed MLP output joins the residual stream here
                x, hidden = g.add_rms_norm(branch, hidden, norm(f"{prefix}.input_layernorm"), eps,
                                           f"{prefix}.input_layernorm")
            attn = self.attention(g, weights, i, x, ctx)
            post = f"{prefix}.post_attention_layernorm"
            attn = g.rms_norm(attn, norm(post), eps, post)
            x, hidden = g.add_rms_norm(attn, hidden, norm(f"{prefix}.pre_feedforward_layernorm"), eps,
                                       f"{prefix}.pre_feedforward_layernorm")
            branch = g.rms_norm(self.mlp(g, weights, f"{prefix}.mlp", x), norm(f"{prefix}.post_feedforward_layernorm"),
                                eps, f"{prefix}.post_feedforward_layernorm")

        pick = lambda t: g.op("Gather", [t, ctx["logits_index"]], name="gather_logits_rows", axis=1)  # noqa: E731
        x, _ = g.add_rms_norm(pick(branch), pick(hidden), norm("model.norm"), eps, "model.norm")
        logits = g.linear(x, self.lm_head_weight(weights), "lm_head", policy=g.lm_head_policy)
        if a.final_logit_softcapping:
            cap = g.const(np.float32(a.final_logit_softcapping), "final_logit_softcapping")
            logits = g.mul(g.op("Tanh", [g.op("Div", [logits, cap], name="softcap/scale")], name="softcap/tanh"), cap,
                           "softcap")
        g.output("logits", np.float32, [1, "n_logits", a.vocab_size], value=logits)


def block_attention(g: GraphBuilder, q: str, key: str, value: str, ctx: dict, a: ModelArgs, window: int | None,
                    scale: float, name: str) -> str:
    """Attention of a chunk's rotated queries over the cache with Gemma 3's multimodal mask: causal (and within
    the sliding window on local layers), and bidirectional between tokens of one image block (equal
    `token_groups` >= 0; a block never spans two chunks, the engine sees to it)."""
    kv, d = a.num_key_value_heads, a.head_dim
    ints = lambda v, n: g.ints(v, f"{name}/{n}")  # noqa: E731
    op = lambda kind, inputs, n, **kw: g.op(kind, inputs, name=f"{name}/{n}", **kw)  # noqa: E731
    total = op("Cast", [ctx["total_sequence_length"]], "total", to=TensorProto.INT64)
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
