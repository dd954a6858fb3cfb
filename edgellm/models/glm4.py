"""GLM-4 (Glm4ForCausalLM, the GLM-4-0414 models): the Llama decoder with biased q, k, v projections, gate and up
stored as one `gate_up_proj` (one matmul, as Phi-3's), rotary over the first half of each head turning interleaved
pairs, and norms after attention and after the MLP as well as before."""

from __future__ import annotations

from ..modeling import decoder
from ..modeling.family import TextFamily
from . import phi3


class ModelArgs(decoder.ModelArgs):
    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        return super().from_config({"attention_bias": True, **config})


class Model(decoder.Model):
    rotary_interleaved = True
    gate_up = phi3.Model.gate_up

    def layer(self, g, weights, i: int, x: str, residual: str, ctx: dict) -> tuple[str, str]:
        return self.sandwiched(g, weights, i, x, residual, ctx, ("post_self_attn_layernorm",
                                                                 "post_attention_layernorm", "post_mlp_layernorm"))


FAMILY = TextFamily(name="glm4", title="GLM-4", architectures=("Glm4ForCausalLM",), model_args=ModelArgs, model=Model)
