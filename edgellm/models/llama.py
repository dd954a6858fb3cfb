"""Llama family: Llama 2/3, SmolLM2, Mistral-style decoders. The reference decoder the other families extend.

Parameter names are the Hugging Face checkpoint's (model.layers.N.self_attn.q_proj ...); GGUF files are mapped
onto them by the reader, so this file never sees where a tensor came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..convert.graph import GraphBuilder
from ..convert.quantize import QuantizedWeight
from ..errors import EdgeLLMError
from .rope import cos_sin_cache, inv_freq, rope_parameters

ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM"]


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
    mrope_section: list[int] | None = None  # M-RoPE (Qwen2-VL): rotary frequencies split over t, h, w positions
    mrope_interleaved: bool = False  # Qwen3-VL: the axes take turns over the frequencies instead of bands
    deepstack_layers: int = 0  # Qwen3-VL: vision features added to the image positions after the first N layers

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        heads = config["num_attention_heads"]
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
            attention_bias=bool(config.get("attention_bias", False)),
            hidden_act=config.get("hidden_act", "silu"),
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
            mrope_section=rope_parameters(config).get("mrope_section"),
            mrope_interleaved=bool(rope_parameters(config).get("mrope_interleaved")),
            deepstack_layers=int(config.get("deepstack_layers", 0)),
        )


class Model:
    """Builds the decoder graph: inputs_embeds + explicit positions in, logits at chosen positions out."""

    def __init__(self, args: ModelArgs):
        self.args = args

    # --- pieces a neighbouring family overrides ------------------------------------------------
    embedding_multiplier: np.float32 | None = None  # embeddings times a constant (Gemma: sqrt(hidden))

    def embedding_table(self, weights) -> np.ndarray | QuantizedWeight:
        """Float rows, or a GGUF's own blocks (kept as they are in a quantized bundle), times embedding_multiplier
        (for blocks, their scales carry it)."""
        table, factor = weights.linear("model.embed_tokens.weight"), self.embedding_multiplier
        if factor is None:
            return table
        return table.scaled(factor) if isinstance(table, QuantizedWeight) else table * factor

    def lm_head_weight(self, weights):
        if "lm_head.weight" in weights and not self.args.tie_word_embeddings:
            return weights.linear("lm_head.weight")
        return weights.linear("model.embed_tokens.weight")

    # Projections feed rotary directly, so QKV can stay packed and GroupQueryAttention applies rotary itself (fewer
    # ops per layer). Its positions are then past length + i, which is what text decoding uses; families that
    # transform heads before rotary (Qwen3's q/k norm) or need other positions turn this off.
    packed_qkv = True

    def qkv_weights(self, weights, prefix: str):
        names = [f"{prefix}.{p}_proj" for p in "qkv"]
        biases = [weights.tensor(f"{n}.bias") for n in names] if self.args.attention_bias else None
        return [weights.linear(f"{n}.weight") for n in names], biases

    def project_qkv(self, g: GraphBuilder, weights, prefix: str, x: str) -> list[str]:
        ws, biases = self.qkv_weights(weights, prefix)
        return g.fused_linear(x, ws, f"{prefix}.qkv_proj", biases)

    def mlp(self, g: GraphBuilder, weights, prefix: str, x: str) -> str:
        gate, up = g.fused_linear(x, [weights.linear(f"{prefix}.gate_proj.weight"),
                                      weights.linear(f"{prefix}.up_proj.weight")], f"{prefix}.gate_up_proj")
        act = activation(g, gate, self.args.hidden_act, f"{prefix}.act")
        return g.linear(g.mul(act, up, f"{prefix}.act_up"), weights.linear(f"{prefix}.down_proj.weight"),
                        f"{prefix}.down_proj")

    # --- the decoder ---------------------------------------------------------------------------
    def attention(self, g: GraphBuilder, weights, i: int, x: str, ctx: dict) -> str:
        a = self.args
        prefix = f"model.layers.{i}.self_attn"
        gqa = dict(name=f"{prefix}.attn", outputs=[f"{prefix}.attn", f"present_key.{i}", f"present_value.{i}"],
                   domain="com.microsoft", num_heads=a.num_attention_heads, kv_num_heads=a.num_key_value_heads,
                   scale=self.attention_scale(), **self.attention_options(i))
        cache = [f"past_key.{i}", f"past_value.{i}", ctx["seqlens_k"], ctx["total_sequence_length"]]
        cos, sin = self.rotary_tables(i, ctx)
        packed = None
        if self.packed_qkv and not a.mrope_section:
            ws, biases = self.qkv_weights(weights, prefix)
            packed = g.fused_linear(x, ws, f"{prefix}.qkv_proj", biases, split=False)
        if packed is not None:
            out = g.op("GroupQueryAttention", [packed, "", "", *cache, cos, sin], do_rotary=1, rotary_interleaved=0,
                       **gqa)[0]
        else:
            q, k, v = self.project_qkv(g, weights, prefix, x)
            q = g.rotary(q, ctx["position_ids"], cos, sin, a.num_attention_heads, f"{prefix}.q_rotary")
            k = g.rotary(k, ctx["position_ids"], cos, sin, a.num_key_value_heads, f"{prefix}.k_rotary")
            out = self.attention_output(g, i, g.op("GroupQueryAttention", [q, k, v, *cache], **gqa)[0], q, ctx)
        return g.linear(out, weights.linear(f"{prefix}.o_proj.weight"), f"{prefix}.o_proj")

    def attention_scale(self) -> float:
        return float(self.args.head_dim ** -0.5)

    def rotary_tables(self, i: int, ctx: dict) -> tuple[str, str]:
        """The cos/sin tables layer i rotates with (Gemma 3 gives sliding and full layers different bases)."""
        return ctx["cos"], ctx["sin"]

    def attention_options(self, i: int) -> dict:
        """Extra GroupQueryAttention attributes for layer i (a local window, soft-capping)."""
        return {}

    def attention_output(self, g: GraphBuilder, i: int, out: str, q: str, ctx: dict) -> str:
        """Layer i's attention output, given GroupQueryAttention's and the rotated queries: a family whose mask is
        not causal for some tokens (Gemma 3's image blocks) computes those chunks another way."""
        return out

    def check_supported(self, seq_length: int) -> None:
        w = self.args.sliding_window
        if w and w < seq_length:
            raise EdgeLLMError(f"{self.args.architecture} uses a {w}-token sliding attention window, which edgellm "
                               f"does not build yet; convert with --seq-length {w} or less")

    def build(self, g: GraphBuilder, weights, seq_length: int) -> None:
        a = self.args
        self.check_supported(seq_length)
        ctx = declare_decoder_io(g, a, seq_length)
        if a.mrope_section:
            mrope_tables(g, ctx, inv_freq(a.rope, a.head_dim), a.mrope_section, a.mrope_interleaved)
        else:
            cos, sin = cos_sin_cache(inv_freq(a.rope, a.head_dim), seq_length)
            ctx["cos"], ctx["sin"] = g.const(cos, "rope.cos"), g.const(sin, "rope.sin")

        hidden, residual = ctx["inputs_embeds"], None
        for i in range(a.num_hidden_layers):
            prefix = f"model.layers.{i}"
            norm_w = weights.tensor(f"{prefix}.input_layernorm.weight")
            if residual is None:
                x, residual = g.rms_norm(hidden, norm_w, a.rms_norm_eps, f"{prefix}.input_layernorm"), hidden
            else:
                x, residual = g.add_rms_norm(hidden, residual, norm_w, a.rms_norm_eps, f"{prefix}.input_layernorm")
            attn = self.attention(g, weights, i, x, ctx)
            x, residual = g.add_rms_norm(attn, residual, weights.tensor(f"{prefix}.post_attention_layernorm.weight"),
                                         a.rms_norm_eps, f"{prefix}.post_attention_layernorm")
            hidden = self.mlp(g, weights, f"{prefix}.mlp", x)
            if i < a.deepstack_layers:  # zero except at image positions; joins the residual with the next norm
                hidden = g.add(hidden, g.op("Gather", [ctx["deepstack_embeds"], g.ints(i, f"deepstack/{i}")],
                                            name=f"deepstack/layer{i}", axis=0), f"{prefix}/deepstack")

        # Only the requested positions go through the final norm and the (large) lm_head.
        pick = lambda t: g.op("Gather", [t, ctx["logits_index"]], name="gather_logits_rows", axis=1)  # noqa: E731
        x, _ = g.add_rms_norm(pick(hidden), pick(residual), weights.tensor("model.norm.weight"), a.rms_norm_eps,
                              "model.norm")
        logits = g.linear(x, self.lm_head_weight(weights), "lm_head", policy=g.lm_head_policy)
        g.output("logits", np.float32, [1, "n_logits", a.vocab_size], value=logits)


def activation(g: GraphBuilder, x: str, kind: str, name: str) -> str:
    if kind in ("silu", "swish"):
        return g.mul(x, g.op("Sigmoid", [x], name=f"{name}/sigmoid"), name)
    if kind in ("gelu_pytorch_tanh", "gelu_new"):
        return g.op("FastGelu", [x], name=name, domain="com.microsoft")
    if kind == "quick_gelu":
        return g.op("QuickGelu", [x], name=name, domain="com.microsoft", alpha=1.702)
    if kind == "gelu":
        return g.op("Gelu", [x], name=name, domain="com.microsoft")
    raise ValueError(f"unsupported activation {kind!r}")


def mrope_tables(g: GraphBuilder, ctx: dict, freqs: np.ndarray, sections: list[int], interleaved: bool = False) -> None:
    """M-RoPE: each token has (t, h, w) positions and each band of frequencies turns with one of them (section i
    with axis i % 3); interleaved (Qwen3-VL), frequency j turns with axis j % 3 while that axis's section lasts,
    else with time. The angles are computed per token in the graph, so rotary then reads row i for token i."""
    half = len(freqs)
    if sum(sections) != half:
        raise EdgeLLMError(f"mrope_section {sections} does not cover the {half} rotary frequencies")
    if interleaved:
        j = np.arange(half)
        axis = np.where((j % 3 == 1) & (j < 3 * sections[1]), 1, np.where((j % 3 == 2) & (j < 3 * sections[2]), 2, 0))
    else:
        axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)])
    pick = (axis[None, :] == np.arange(3)[:, None]).astype(np.float32)[:, None, :]  # [3, 1, half]
    positions = g.op("Cast", [ctx["position_ids"]], name="rope/positions", to=TensorProto.FLOAT)
    angles = g.mul(g.op("Unsqueeze", [positions, g.ints([2], "rope/axis2")], name="rope/unsqueeze"),
                   g.const(freqs.astype(np.float32).reshape(1, 1, half), "rope.inv_freq"), "rope/angles")
    angles = g.op("ReduceSum", [g.mul(angles, g.const(pick, "rope.sections"), "rope/pick"), g.ints([0], "rope/axis0")],
                  name="rope/select", keepdims=0)
    ctx["cos"], ctx["sin"] = g.op("Cos", [angles], name="rope/cos"), g.op("Sin", [angles], name="rope/sin")
    # RotaryEmbedding then indexes these per-token tables by the token's place in the chunk.
    length = g.op("Gather", [g.op("Shape", [ctx["inputs_embeds"]], name="rope/shape"), g.ints(1, "rope/dim1")],
                  name="rope/length", axis=0)
    steps = g.op("Range", [g.ints(0, "rope/zero"), length, g.ints(1, "rope/one")], name="rope/steps")
    ctx["position_ids"] = g.op("Unsqueeze", [steps, g.ints([0], "rope/axis0b")], name="rope/local_positions")


def declare_decoder_io(g: GraphBuilder, a, seq_length: int) -> dict:
    """The decoder contract the runtime relies on, shared by every family.

    past/present KV of every layer are [1, kv_heads, seq_length, head_dim] and share one buffer: the runtime
    binds the same memory to both, and GroupQueryAttention writes the new positions in place.
    """
    ctx = {
        "inputs_embeds": g.input("inputs_embeds", np.float32, [1, "sequence", a.hidden_size]),
        # M-RoPE decoders take (t, h, w) rows; text positions repeat the same value in all three.
        "position_ids": g.input("position_ids", np.int64, [3 if getattr(a, "mrope_section", None) else 1, "sequence"]),
        "seqlens_k": g.input("seqlens_k", np.int32, [1]),  # total length - 1
        "total_sequence_length": g.input("total_sequence_length", np.int32, []),
        "logits_index": g.input("logits_index", np.int64, ["n_logits"]),
    }
    if a.deepstack_layers:
        ctx["deepstack_embeds"] = g.input("deepstack_embeds", np.float32, [a.deepstack_layers, "sequence",
                                                                            a.hidden_size])
    kv_shape = [1, a.num_key_value_heads, seq_length, a.head_dim]
    for i in range(a.num_hidden_layers):
        for kind in ("key", "value"):
            g.input(f"past_{kind}.{i}", np.float32, kv_shape)
            g.output(f"present_{kind}.{i}", np.float32, kv_shape)
    return ctx
