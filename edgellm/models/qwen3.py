"""Qwen3: the Llama decoder with an RMSNorm over each query and key head before rotary (q_norm, k_norm)."""

from __future__ import annotations

from . import llama

ARCHITECTURES = ["Qwen3ForCausalLM"]
ModelArgs = llama.ModelArgs


class Model(llama.Model):
    packed_qkv = False  # the norms sit between projection and rotary

    def project_qkv(self, g, weights, prefix, x):
        q, k, v = super().project_qkv(g, weights, prefix, x)
        a = self.args
        q = head_norm(g, q, weights.tensor(f"{prefix}.q_norm.weight"), a.num_attention_heads, a, f"{prefix}.q_norm")
        k = head_norm(g, k, weights.tensor(f"{prefix}.k_norm.weight"), a.num_key_value_heads, a, f"{prefix}.k_norm")
        return q, k, v


def head_norm(g, x, weight, heads, a, name):
    per_head = g.reshape(x, [0, 0, heads, a.head_dim], name=f"{name}/split_heads")
    normed = g.rms_norm(per_head, weight, a.rms_norm_eps, name)
    return g.reshape(normed, [0, 0, heads * a.head_dim], name=f"{name}/merge_heads")
