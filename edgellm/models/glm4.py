"""GLM-4 (Glm4ForCausalLM, the GLM-4-0414 models): GLM-4 9B's decoder (biased q, k, v, fused gate_up, interleaved
rotary over half of each head) with norms after attention and after the MLP as well as before."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..modeling.family import GGUFNames, TextFamily
from . import glm
from .llama import GGUF_LAYERS

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder


class Model(glm.Model):
    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        return self.sandwiched(g, weights, i, x, residual, ctx, ("post_self_attn_layernorm",
                                                                 "post_attention_layernorm", "post_mlp_layernorm"))


# llama.cpp keeps GLM-4-0414's q, k, v apart and its rows as they are; ffn_up holds gate and up
GGUF_LAYERS_GLM4 = {**GGUF_LAYERS, "ffn_up.weight": "mlp.gate_up_proj.weight",
                    "post_attention_norm.weight": "post_self_attn_layernorm.weight",
                    "post_ffw_norm.weight": "post_mlp_layernorm.weight"}
FAMILY = TextFamily(name="glm4", title="GLM-4-0414", architectures=("Glm4ForCausalLM",), model_args=glm.ModelArgs,
                    model=Model, gguf=GGUFNames("glm4", GGUF_LAYERS_GLM4))
