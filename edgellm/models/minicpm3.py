"""MiniCPM3 (MiniCPM3ForCausalLM): MiniCPM's muP constants around multi-head latent attention (MLA, DeepSeek-V2's).

Each token's keys and values come from one latent c (kv_lora_rank wide, normed) and one rotated key part k_rot
(qk_rope_head_dim) shared by all heads: head h's key is [W_uk_h c, k_rot], its value W_uv_h c. The graph keeps the
latent form, so the KV cache holds c and k_rot once per token rather than every head's keys and values (for
MiniCPM3-4B 288 floats instead of 40 x 160): the query's non-rotated part is multiplied into latent space
(q_nope_h W_uk_h, "absorbed"), attention runs as one key-value head [k_rot, c] of rank + rope dimensions, and each
head's output is brought back through W_uv_h before o_proj. The value is that same [k_rot, c] (its first rope
dimensions are dropped from the output), so GroupQueryAttention rotates the leading rope dimensions of the query and
key itself, as for every other family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..modeling.family import GGUFNames, TextFamily
from . import minicpm
from .llama import GGUF_LAYERS

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder


@dataclass
class ModelArgs(minicpm.ModelArgs):
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        rank, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
        # the cache's one key-value head: [k_rot, c]
        args = super().from_config({**config, "num_key_value_heads": 1, "head_dim": rope + rank,
                                    "tie_word_embeddings": config.get("tie_word_embeddings", True)})
        args.q_lora_rank, args.kv_lora_rank = config.get("q_lora_rank"), rank
        args.qk_nope_head_dim, args.qk_rope_head_dim = config["qk_nope_head_dim"], rope
        args.v_head_dim = config.get("v_head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return args


class Model(minicpm.Model):
    args: ModelArgs

    def attention_scale(self) -> float:
        a = self.args
        scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
        if a.rope["rope_type"] == "yarn" and a.rope.get("mscale_all_dim"):  # as DeepSeek-V2 scales it
            scale *= (0.1 * a.rope["mscale_all_dim"] * math.log(a.rope["factor"]) + 1.0) ** 2
        return float(scale)

    def rotary_head_dim(self) -> int:
        return self.args.qk_rope_head_dim

    def attention(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, ctx: dict) -> str:
        a, prefix = self.args, f"model.layers.{i}.self_attn"
        heads, nope, rope, rank, v_dim = (a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim,
                                          a.kv_lora_rank, a.v_head_dim)
        if a.q_lora_rank:
            q = g.linear(x, weights.linear(f"{prefix}.q_a_proj.weight"), f"{prefix}.q_a_proj")
            q = g.rms_norm(q, self.norm_weight(weights, f"{prefix}.q_a_layernorm.weight"), a.rms_norm_eps,
                           f"{prefix}.q_a_layernorm")
            q = g.linear(q, weights.linear(f"{prefix}.q_b_proj.weight"), f"{prefix}.q_b_proj")
        else:
            q = g.linear(x, weights.linear(f"{prefix}.q_proj.weight"), f"{prefix}.q_proj")
        q = g.reshape(q, [0, 0, heads, nope + rope], f"{prefix}.q_heads")
        q_nope, q_rot = g.op("Split", [q, g.ints([nope, rope], f"{prefix}.q_parts")], name=f"{prefix}.q_split",
                             outputs=2, axis=-1)
        latent = g.linear(x, weights.linear(f"{prefix}.kv_a_proj_with_mqa.weight"), f"{prefix}.kv_a_proj_with_mqa")
        c, k_rot = g.op("Split", [latent, g.ints([rank, rope], f"{prefix}.kv_parts")], name=f"{prefix}.kv_split",
                        outputs=2, axis=-1)
        c = g.rms_norm(c, self.norm_weight(weights, f"{prefix}.kv_a_layernorm.weight"), a.rms_norm_eps,
                       f"{prefix}.kv_a_layernorm")
        kv_b = g.rounded(weights.linear(f"{prefix}.kv_b_proj.weight")).reshape(heads, nope + v_dim, rank)
        per_head = lambda t, name: g.op("Transpose", [t], name=name, perm=[0, 2, 1, 3])  # noqa: E731
        # [B, S, H, nope] -> [B, H, S, nope] @ W_uk [H, nope, rank] -> [B, S, H, rank]
        q_latent = g.op("MatMul", [per_head(q_nope, f"{prefix}.q_nope_t"),
                                   g.const(np.ascontiguousarray(kv_b[:, :nope, :]), f"{prefix}.w_uk")],
                        name=f"{prefix}.q_absorbed")
        query = g.op("Concat", [q_rot, per_head(q_latent, f"{prefix}.q_absorbed_t")], name=f"{prefix}.query",
                     axis=-1)
        query = g.reshape(query, [0, 0, heads * (rope + rank)], f"{prefix}.query_flat")
        key = g.op("Concat", [k_rot, c], name=f"{prefix}.key", axis=-1)
        cache = [f"past_key.{i}", f"past_value.{i}", ctx["seqlens_k"], ctx["total_sequence_length"]]
        out = g.op("GroupQueryAttention", [query, key, key, *cache, ctx["cos"], ctx["sin"]], name=f"{prefix}.attn",
                   outputs=[f"{prefix}.attn", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft",
                   num_heads=heads, kv_num_heads=1, scale=self.attention_scale(), do_rotary=1,
                   rotary_interleaved=0)[0]
        out = g.reshape(out, [0, 0, heads, rope + rank], f"{prefix}.attn_heads")
        bounds = [g.ints([rope], f"{prefix}.latent_start"), g.ints([rope + rank], f"{prefix}.latent_end"),
                  g.ints([-1], f"{prefix}.latent_axis")]
        out = g.op("Slice", [out, *bounds], name=f"{prefix}.attn_latent")
        # [B, H, S, rank] @ W_uv^T [H, rank, v] -> [B, S, H * v]
        out = g.op("MatMul", [per_head(out, f"{prefix}.attn_latent_t"),
                              g.const(np.ascontiguousarray(kv_b[:, nope:, :].transpose(0, 2, 1)), f"{prefix}.w_uv")],
                   name=f"{prefix}.attn_values")
        out = g.reshape(per_head(out, f"{prefix}.attn_values_t"), [0, 0, heads * v_dim], f"{prefix}.attn_flat")
        return g.linear(out, weights.linear(f"{prefix}.o_proj.weight"), f"{prefix}.o_proj")


def gguf_config(meta: dict, config: dict) -> dict:
    """llama.cpp stores the latent ranks and the key width; MiniCPM3's muP constants it takes as given (12, 1.4,
    256), as it does the rotary width being the key's rotated part rather than a partial rotary."""
    rope = meta["minicpm3.rope.dimension_count"]
    return {"q_lora_rank": meta.get("minicpm3.attention.q_lora_rank"),
            "kv_lora_rank": meta["minicpm3.attention.kv_lora_rank"], "qk_rope_head_dim": rope,
            "qk_nope_head_dim": meta["minicpm3.attention.key_length"] - rope, "partial_rotary_factor": None,
            "scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}


# llama.cpp's MLA tensors, rows as they are
GGUF_LAYERS_MINICPM3 = {**GGUF_LAYERS, "attn_q_a.weight": "self_attn.q_a_proj.weight",
                        "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
                        "attn_q_b.weight": "self_attn.q_b_proj.weight",
                        "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
                        "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                        "attn_kv_b.weight": "self_attn.kv_b_proj.weight"}
FAMILY = TextFamily(name="minicpm3", title="MiniCPM3", architectures=("MiniCPM3ForCausalLM",),
                    model_args=ModelArgs, model=Model, gguf=GGUFNames("minicpm3", GGUF_LAYERS_MINICPM3,
                                                                      config=gguf_config))
