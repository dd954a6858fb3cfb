"""SmolLM3 (SmolLM3ForCausalLM): the Llama decoder where some layers (every fourth, by `no_rope_layers`) attend
without rotary positions."""

from __future__ import annotations

from dataclasses import dataclass

from ..modeling import decoder
from ..modeling.family import GGUFNames, TextFamily
from .llama import GGUF_LAYERS, unpermute_rotary_rows


@dataclass
class ModelArgs(decoder.ModelArgs):
    rope_layers: tuple[int, ...] = ()  # per layer: 1 rotates, 0 does not

    @classmethod
    def from_config(cls, config: dict) -> ModelArgs:
        args = super().from_config(config)
        interval = config.get("no_rope_layer_interval", 4)
        args.rope_layers = tuple(config.get("no_rope_layers") or [int((i + 1) % interval != 0)
                                                                  for i in range(args.num_hidden_layers)])
        return args


class Model(decoder.Decoder):
    args: ModelArgs

    def rotates(self, i: int) -> bool:
        return bool(self.args.rope_layers[i])


def gguf_config(meta: dict, config: dict) -> dict:
    """llama.cpp stores no key for the layers without rotary: every fourth, always."""
    return {"no_rope_layer_interval": 4}


FAMILY = TextFamily(name="smollm3", title="SmolLM3", architectures=("SmolLM3ForCausalLM",), model_args=ModelArgs,
                    model=Model, gguf=GGUFNames("smollm3", GGUF_LAYERS, config=gguf_config,
                                                tensor=unpermute_rotary_rows))
