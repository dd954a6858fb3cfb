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
        a, prefix = self.args, f"model.layers.{i}"
        eps, norm = a.rms_norm_eps, lambda name: self.norm_weight(weights, f"{name}.weight")  # noqa: E731
        after_attention = f"{prefix}.post_self_attn_layernorm"
        attn = g.rms_norm(self.attention(g, weights, i, x, ctx), norm(after_attention), eps, after_attention)
        x, residual = g.add_rms_norm(attn, residual, norm(f"{prefix}.post_attention_layernorm"), eps,
                                     f"{prefix}.post_attention_layernorm")
        after_mlp = f"{prefix}.post_mlp_layernorm"
        return g.rms_norm(self.mlp(g, weights, f"{prefix}.mlp", x), norm(after_mlp), eps, after_mlp), residual


FAMILY = TextFamily(name="glm4", title="GLM-4", architectures=("Glm4ForCausalLM",), model_args=ModelArgs, model=Model)
