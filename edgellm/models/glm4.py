"""GLM-4 (Glm4ForCausalLM, the GLM-4-0414 models): GLM-4 9B's decoder (biased q, k, v, fused gate_up, interleaved
rotary over half of each head) with norms after attention and after the MLP as well as before."""

from __future__ import annotations

from ..modeling.family import TextFamily
from . import glm


class Model(glm.Model):
    def layer(self, g, weights, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        return self.sandwiched(g, weights, i, x, residual, ctx, ("post_self_attn_layernorm",
                                                                 "post_attention_layernorm", "post_mlp_layernorm"))


FAMILY = TextFamily(name="glm4", title="GLM-4-0414", architectures=("Glm4ForCausalLM",), model_args=glm.ModelArgs,
                    model=Model)
