"""The shared decoder: the pre-norm transformer (RMSNorm, rotary attention, gated MLP) every text family builds,
and the decoder contract the runtime relies on (inputs_embeds and explicit positions in, logits at chosen
positions out, an in-place KV cache).

A family subclasses `Decoder` and overrides the hooks it needs (norm weights, q/k projections, rotary tables, the MLP,
extra inputs, what follows a layer); this module names no family. Parameter names are the Hugging Face
checkpoint's (model.layers.N.self_attn.q_proj ...); GGUF files are mapped onto them by the reader, so a family
never sees where a tensor came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ..errors import EdgeLLMError
from ..format import ROTARY_LENGTH, DecoderShape, QuantizedWeight
from .layers import activation, longrope_switch, rope_parameters, rope_tables

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder


def qkv_parts(prefix: str, weights: list) -> list[str] | None:
    """The names of q, k and v's projections when they are three weights (for LoRA branches); None when fused."""
    return [f"{prefix}.{p}_proj" for p in "qkv"] if len(weights) == 3 else None


_Args = TypeVar("_Args", bound="ModelArgs")


@dataclass
class ModelArgs:
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: dict
    tie_word_embeddings: bool
    attention_bias: bool
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" or "full_attention" (all full when empty)

    @classmethod
    def from_config(cls: type[_Args], config: dict) -> _Args:
        heads = config["num_attention_heads"]
        window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
        layers = config["num_hidden_layers"]
        if config.get("mlp_bias") or config.get("bias"):  # "bias": InternLM3's name for it
            raise EdgeLLMError("biased MLP and output projections (mlp_bias) are not supported")
        layer_types = config.get("layer_types")
        if not layer_types and window:  # configs written before transformers listed the layer types: the layers
            # from max_window_layers on slide where the config has that switch, otherwise all of them
            first = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
        return cls(
            architecture=config["architectures"][0],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope=rope_parameters(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("qkv_bias", False))),
            hidden_act=config.get("hidden_act", "silu"),
            sliding_window=window,
            layer_types=tuple(layer_types or ()),
        )


class Decoder:
    """Builds the decoder graph: inputs_embeds + explicit positions in, logits at chosen positions out."""

    def __init__(self, args: ModelArgs):
        self.args = args

    # --- pieces a family overrides ----------------------------------------------------------------
    @property
    def embedding_multiplier(self) -> np.float32 | None:
        """Embeddings times a constant (e.g. sqrt(hidden)) where a family says so; None: as they are."""
        return None

    def embedding_table(self, weights: ModelSource) -> np.ndarray | QuantizedWeight:
        """Float rows, or a GGUF's own blocks (kept as they are in a quantized bundle), times embedding_multiplier
        (for blocks, their scales carry it)."""
        table, factor = weights.linear("model.embed_tokens.weight"), self.embedding_multiplier
        if factor is None:
            return table
        return table.scaled(factor) if isinstance(table, QuantizedWeight) else table * factor

    def norm_weight(self, weights: ModelSource, name: str) -> np.ndarray:
        """An RMSNorm's weight as the graph multiplies by it."""
        return weights.tensor(name)

    def final_logits(self, g: GraphBuilder, logits: str) -> str:
        """The lm_head's output as the model returns it (a family may soft-cap it)."""
        return logits

    def lm_head_weight(self, weights: ModelSource):
        if "lm_head.weight" in weights and not self.args.tie_word_embeddings:
            return weights.linear("lm_head.weight")
        return weights.linear("model.embed_tokens.weight")

    # Projections feed rotary directly, so QKV can stay packed and GroupQueryAttention applies rotary itself (fewer
    # ops per layer). Its positions are then past length + i, which is what text decoding uses; families that
    # transform heads before rotary (per-head q/k norms) or need other positions turn this off.
    packed_qkv = True
    rotary_interleaved = False  # rotary turns pairs (0, 1), (2, 3)... instead of (i, i + dim/2) (with packed_qkv)
    position_rows = 1  # rows of position_ids: 1, or 3 for decoders whose positions have (t, h, w) axes

    def qkv_weights(self, weights: ModelSource, prefix: str):
        names = [f"{prefix}.{p}_proj" for p in "qkv"]
        biases = [weights.tensor(f"{n}.bias") for n in names] if self.args.attention_bias else None
        return [weights.linear(f"{n}.weight") for n in names], biases

    def project_qkv(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> list[str]:
        ws, biases = self.qkv_weights(weights, prefix)
        if len(ws) == 1:  # a checkpoint's one qkv_proj: one matmul, split after it
            a, name = self.args, f"{prefix}.qkv_proj"
            sizes = [a.num_attention_heads * a.head_dim] + [a.num_key_value_heads * a.head_dim] * 2
            y = g.linear(x, ws[0], name, None if biases is None else biases[0])
            return g.op("Split", [y, g.ints(sizes, f"{name}/sizes")], name=f"{name}/split", outputs=3, axis=-1)
        return g.fused_linear(x, ws, f"{prefix}.qkv_proj", biases, parts=qkv_parts(prefix, ws))

    def gate_up(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> list[str]:
        """The MLP's gate and up projections of x, as one matmul."""
        return g.fused_linear(x, [weights.linear(f"{prefix}.gate_proj.weight"),
                                  weights.linear(f"{prefix}.up_proj.weight")], f"{prefix}.gate_up_proj",
                              parts=[f"{prefix}.gate_proj", f"{prefix}.up_proj"])

    def mlp(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> str:
        gate, up = self.gate_up(g, weights, prefix, x)
        act = activation(g, gate, self.args.hidden_act, f"{prefix}.act")
        return g.linear(g.mul(act, up, f"{prefix}.act_up"), weights.linear(f"{prefix}.down_proj.weight"),
                        f"{prefix}.down_proj")

    # --- the decoder ---------------------------------------------------------------------------
    def attention(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, ctx: dict) -> str:
        a = self.args
        prefix = f"model.layers.{i}.self_attn"
        gqa = dict(name=f"{prefix}.attn", outputs=[f"{prefix}.attn", f"present_key.{i}", f"present_value.{i}"],
                   domain="com.microsoft", num_heads=a.num_attention_heads, kv_num_heads=a.num_key_value_heads,
                   scale=self.attention_scale(), **self.attention_options(i))
        cache = [f"past_key.{i}", f"past_value.{i}", ctx["seqlens_k"], ctx["total_sequence_length"]]
        cos, sin = self.rotary_tables(i, ctx)
        packed = None
        if self.packed_qkv and self.fused_rotary():
            ws, biases = self.qkv_weights(weights, prefix)
            packed = g.fused_linear(x, ws, f"{prefix}.qkv_proj", biases, split=False, parts=qkv_parts(prefix, ws))
        if packed is not None:
            rotary = self.rotates(i)
            out = g.op("GroupQueryAttention", [packed, "", "", *cache, *([cos, sin] if rotary else [])],
                       do_rotary=int(rotary), rotary_interleaved=int(self.rotary_interleaved), **gqa)[0]
        else:
            q, k, v = self.project_qkv(g, weights, prefix, x)
            if self.rotates(i):
                width = int(self.rotary_head_dim() * a.rope.get("partial_rotary_factor", 1.0))
                turned = width if width != a.head_dim else None
                q = g.rotary(q, ctx["position_ids"], cos, sin, a.num_attention_heads, f"{prefix}.q_rotary",
                             self.rotary_interleaved, turned)
                k = g.rotary(k, ctx["position_ids"], cos, sin, a.num_key_value_heads, f"{prefix}.k_rotary",
                             self.rotary_interleaved, turned)
            out = self.attention_output(g, i, g.op("GroupQueryAttention", [q, k, v, *cache], **gqa)[0], q, ctx)
        return g.linear(out, weights.linear(f"{prefix}.o_proj.weight"), f"{prefix}.o_proj")

    def rotates(self, i: int) -> bool:
        """Whether layer i applies rotary positions (a family may leave some layers without)."""
        return True

    def fused_rotary(self) -> bool:
        """Whether GroupQueryAttention can turn the queries and keys itself: it takes heads and rotary widths of
        multiples of 16 only. Other shapes (heads of 24, 40, 80 or 96; a rotary over 8 dimensions) are turned by
        RotaryEmbedding nodes before it, on separate projections: two nodes more per layer, the same attention."""
        a = self.args
        rotary = int(self.rotary_head_dim() * a.rope.get("partial_rotary_factor", 1.0))
        return a.head_dim % 16 == 0 and rotary % 16 == 0

    def attention_scale(self) -> float:
        return float(self.args.head_dim ** -0.5)

    def rotary_tables(self, i: int, ctx: dict) -> tuple[str, str]:
        """The cos/sin tables layer i rotates with (a family may give sliding and full layers different bases)."""
        return ctx["cos"], ctx["sin"]

    def sliding(self, i: int) -> bool:
        """Whether layer i is a sliding-attention layer."""
        return bool(self.args.layer_types) and self.args.layer_types[i] == "sliding_attention"

    def attention_options(self, i: int) -> dict:
        """Extra GroupQueryAttention attributes for layer i: the sliding window (GroupQueryAttention's local
        window: the last `sliding_window` positions, this one included); a family adds soft-capping."""
        window = self.args.sliding_window
        return {"local_window_size": int(window)} if window and self.sliding(i) else {}

    def attention_output(self, g: GraphBuilder, i: int, out: str, q: str, ctx: dict) -> str:
        """Layer i's attention output, given GroupQueryAttention's and the rotated queries: a family whose mask is
        not causal for some tokens (bidirectional image blocks) computes those chunks another way."""
        return out

    def extra_inputs(self, g: GraphBuilder, ctx: dict) -> None:
        """Declare inputs beyond the decoder contract (into ctx); the runtime feeds them through the family's
        processor (vision.processor.DecoderExtension)."""

    def rotary_head_dim(self) -> int:
        """The head width the rope type's tables are for (the rope's partial factor applies to it): the heads'
        (multi-head latent attention: the keys' rotated part)."""
        return self.args.head_dim

    def rotary(self, g: GraphBuilder, ctx: dict, seq_length: int) -> None:
        """Set ctx's "cos" and "sin" tables (and "position_ids" as rotary reads them)."""
        dim = self.rotary_head_dim()
        cos, sin = rope_tables(self.args.rope, dim, seq_length)
        switch = longrope_switch(self.args.rope, seq_length)
        if switch is None:
            ctx["cos"], ctx["sin"] = g.const(cos, "rope.cos"), g.const(sin, "rope.sin")
            return
        # LongRoPE in a bundle longer than the trained length: as transformers, the short factors while the longest
        # sequence of a call (a whole prompt, however it is chunked: the engine's rotary_length) fits that length,
        # the long ones past it; positions already cached keep the keys they were computed with
        short = rope_tables({**self.args.rope, "longrope_table": "short"}, dim, seq_length)
        long = g.op("Greater", [g.input(ROTARY_LENGTH, np.int32, []), g.const(np.int32(switch), "rope.switch")],
                    name="rope/long")
        ctx["cos"], ctx["sin"] = (
            g.op("Where", [long, g.const(table, f"rope.{kind}.long"), g.const(other, f"rope.{kind}.short")],
                 name=f"rope/{kind}") for kind, table, other in (("cos", cos, short[0]), ("sin", sin, short[1])))

    def rotary_switch(self, seq_length: int) -> int | None:
        """The length past which a call's rotary tables change (LongRoPE longer than its trained length), else None."""
        return longrope_switch(self.args.rope, seq_length)

    def after_layer(self, g: GraphBuilder, i: int, hidden: str, ctx: dict) -> str:
        """Layer i's output (the MLP's, before it joins the residual stream), as the next layer reads it."""
        return hidden

    def shape(self) -> DecoderShape:
        """The dimensions the runtime sizes its KV cache and logits by (the manifest's "model")."""
        a = self.args
        return DecoderShape(a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.num_key_value_heads,
                            a.head_dim, a.vocab_size)

    def check_supported(self, seq_length: int) -> None:
        """Refuse, with the reason, what this family cannot build at this length (nothing in the shared decoder)."""

    def build(self, g: GraphBuilder, weights: ModelSource, seq_length: int, layers: range | None = None) -> None:
        """The decoder graph, or one stage of it (`layers`, contiguous: --num-device): a stage after the first takes
        the residual stream and the last layer's output not yet added to it ("residual", "hidden"), and one before
        the last gives them on ("next_residual", "next_hidden") instead of logits."""
        a = self.args
        layers = layers if layers is not None else range(a.num_hidden_layers)
        self.check_supported(seq_length)
        ctx = self.declare_io(g, seq_length, layers)
        self.rotary(g, ctx, seq_length)

        # a layer's output joins the residual stream in the next norm
        pending, residual = (ctx["inputs_embeds"], None) if layers.start == 0 else (ctx["hidden"], ctx["residual"])
        for i in layers:
            x, residual = self.layer_input(g, weights, i, pending, residual)
            pending, residual = self.layer(g, weights, i, x, residual, ctx)
            pending = self.after_layer(g, i, pending, ctx)
        if layers.stop < a.num_hidden_layers:
            for name, value in (("next_hidden", pending), ("next_residual", residual)):
                g.output(name, np.float32, [self.batch_dim(), self.fixed_rows[0] if self.fixed_rows else "sequence",
                                            a.hidden_size], value=value)
            return

        # Only the requested positions go through the final norm and the (large) lm_head.
        pick = lambda t: g.op("Gather", [t, ctx["logits_index"]], name="gather_logits_rows", axis=1)  # noqa: E731
        x, _ = g.add_rms_norm(pick(pending), pick(residual), self.norm_weight(weights, "model.norm.weight"),
                              a.rms_norm_eps, "model.norm")
        logits = self.final_logits(g, g.linear(x, self.lm_head_weight(weights), "lm_head", policy=g.lm_head_policy))
        n_logits = self.fixed_rows[1] if self.fixed_rows else "n_logits"
        g.output("logits", np.float32, [self.batch_dim(), n_logits, a.vocab_size], value=logits)

    def sandwiched(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict,
                   norms: tuple[str, str, str]) -> tuple[str, str]:
        """layer() for decoders with a norm after attention and after the MLP as well as before each: `norms` are
        the checkpoint's names of the one after attention, the one before the MLP and the one after it."""
        a, prefix = self.args, f"model.layers.{i}"
        after_attention, before_mlp, after_mlp = (f"{prefix}.{n}" for n in norms)
        eps, norm = a.rms_norm_eps, lambda name: self.norm_weight(weights, f"{name}.weight")  # noqa: E731
        attn = g.rms_norm(self.attention(g, weights, i, x, ctx), norm(after_attention), eps, after_attention)
        x, residual = g.add_rms_norm(attn, residual, norm(before_mlp), eps, before_mlp)
        return g.rms_norm(self.mlp(g, weights, f"{prefix}.mlp", x), norm(after_mlp), eps, after_mlp), residual

    def layer_input(self, g: GraphBuilder, weights: ModelSource, i: int, pending: str,
                    residual: str | None) -> tuple[str, str]:
        """Layer i's input (the residual stream, `pending` joined, through the input norm) and the stream."""
        a, name = self.args, f"model.layers.{i}.input_layernorm"
        norm_w = self.norm_weight(weights, f"{name}.weight")
        if residual is None:
            return g.rms_norm(pending, norm_w, a.rms_norm_eps, name), pending
        return g.add_rms_norm(pending, residual, norm_w, a.rms_norm_eps, name)

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        """Layer i after its input norm: (its output, still to join the residual stream; the residual stream)."""
        a, prefix = self.args, f"model.layers.{i}"
        attn = self.attention(g, weights, i, x, ctx)
        post = f"{prefix}.post_attention_layernorm"
        x, residual = g.add_rms_norm(attn, residual, self.norm_weight(weights, f"{post}.weight"), a.rms_norm_eps, post)
        return self.mlp(g, weights, f"{prefix}.mlp", x), residual

    # (sequence, n_logits) of a fixed-shape graph (convert --static), or None for dynamic axes
    fixed_rows: tuple[int, int] | None = None

    def batch_dim(self) -> int | str:
        """The decoder's first dimension: "batch" where several sequences can run in one call (continuous batching
        in the server), else 1. A decoder whose positions have several rows, or that takes family inputs (which
        describe one prompt's media), runs one sequence at a time, as a fixed-shape one does."""
        can_batch = self.position_rows == 1 and type(self).extra_inputs is Decoder.extra_inputs
        return "batch" if can_batch and self.fixed_rows is None else 1

    def declare_io(self, g: GraphBuilder, seq_length: int, layers: range | None = None) -> dict:
        """The decoder contract the runtime relies on, shared by every family.

        past/present KV of every layer are [batch, kv_heads, seq_length, head_dim] and share one buffer: the
        runtime binds the same memory to both, and GroupQueryAttention writes the new positions in place, at each
        sequence's own length (seqlens_k). Positions have `position_rows` rows (one per sequence when batched);
        with three, text positions repeat the same value in each.
        """
        a, batch = self.args, self.batch_dim()
        rows = "batch" if batch == "batch" else self.position_rows
        sequence, n_logits = self.fixed_rows or ("sequence", "n_logits")
        layers = layers if layers is not None else range(a.num_hidden_layers)
        hidden = [batch, sequence, a.hidden_size]
        ctx = {"inputs_embeds": g.input("inputs_embeds", np.float32, hidden)} if layers.start == 0 else {
            "hidden": g.input("hidden", np.float32, hidden), "residual": g.input("residual", np.float32, hidden)}
        ctx.update({
            "position_ids": g.input("position_ids", np.int64, [rows, sequence]),
            "seqlens_k": g.input("seqlens_k", np.int32, [batch]),  # per sequence: its total length - 1
            "total_sequence_length": g.input("total_sequence_length", np.int32, []),
        })
        if layers.stop == a.num_hidden_layers:
            ctx["logits_index"] = g.input("logits_index", np.int64, [n_logits])
        self.extra_inputs(g, ctx)
        kv_shape = [batch, a.num_key_value_heads, seq_length, a.head_dim]
        for i in layers:
            for kind in ("key", "value"):
                g.input(f"past_{kind}.{i}", np.float32, kv_shape)
                g.output(f"present_{kind}.{i}", np.float32, kv_shape)
        return ctx
