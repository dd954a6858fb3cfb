"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder with its q, k, v projections stored as one `qkv_proj` and gate and
up as one `gate_up_proj` (kept as they are: each is one matmul in the graph), LongRoPE, and Phi-4-mini's partial
rotary (a quarter of each head is not rotated)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling.blocks import FusedGateUp
from ..modeling.decoder import Decoder, ModelArgs
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS

if TYPE_CHECKING:
    from ..checkpoint import ModelSource


class Model(FusedGateUp, Decoder):
    def qkv_weights(self, weights: ModelSource, prefix: str):
        return [weights.linear(f"{prefix}.qkv_proj.weight")], None


# llama.cpp keeps the fused projections fused (its ffn_up holds gate and up) and the rows as they are; the LongRoPE
# factors are tensors of their own (read by the GGUF reader for every family)
GGUF_LAYERS_PHI3 = {**GGUF_LAYERS, "attn_qkv.weight": "self_attn.qkv_proj.weight",
                    "ffn_up.weight": "mlp.gate_up_proj.weight"}


def gguf_config(meta: dict, config: dict) -> dict:
    """Phi-4-mini's files say "no window" with a sliding window of 0."""
    return {"sliding_window": meta.get("phi3.attention.sliding_window") or None}


FAMILY = TextFamily(name="phi3", title="Phi-3, Phi-3.5, Phi-4-mini", architectures=("Phi3ForCausalLM",),
                    model_args=ModelArgs, model=Model, gguf=GGUFNames("phi3", GGUF_LAYERS_PHI3, config=gguf_config))
