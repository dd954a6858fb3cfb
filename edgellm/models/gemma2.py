"""Gemma 2: the layer Gemma 3 kept (norms on both sides of attention and of the MLP, RMSNorm weights as offsets from
1, embeddings scaled by sqrt(hidden size), a GELU (tanh) gate, the query scale from query_pre_attn_scalar,
soft-capping of attention scores and of the final logits), without per-head q/k norms and with one rotary base for
its alternating sliding and full layers."""

from __future__ import annotations

from ..modeling.family import GGUFNames, TextFamily
from . import gemma3


class ModelArgs(gemma3.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        layers = config["num_hidden_layers"]
        config = {"layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                  **config}
        args = super().from_config(config)
        args.local_rope = args.rope
        return args


class Model(gemma3.GemmaDecoder):
    pass


def gguf_config(meta: dict, config: dict) -> dict:
    """What llama.cpp's Gemma 2 support implies rather than stores: even layers slide, and the query scale of
    1/sqrt(head_dim) (27B, the 46-layer one: hidden/heads)."""
    layers = config["num_hidden_layers"]
    return {"sliding_window": meta.get("gemma2.attention.sliding_window"),
            "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"] if layers == 46
                                      else config["head_dim"]),
            "attn_logit_softcapping": meta.get("gemma2.attn_logit_softcapping"),
            "final_logit_softcapping": meta.get("gemma2.final_logit_softcapping")}


FAMILY = TextFamily(name="gemma2", title="Gemma 2", architectures=("Gemma2ForCausalLM",), model_args=ModelArgs,
                    model=Model,
                    gguf=GGUFNames("gemma2", gemma3.GGUF_LAYERS_GEMMA3, config=gguf_config, tensor=gemma3.gguf_tensor,
                                   merges_by_rank=True))
