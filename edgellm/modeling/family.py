"""What a model family declares: the typed records the registry (edgellm.models) collects.

A text family module defines `FAMILY = TextFamily(...)`: its architectures, its ModelArgs and decoder Model, and
how llama.cpp names its tensors in a GGUF file. A vision-language family folder defines
`FAMILY = VisionLanguageFamily(...)`: its architectures, the `split` that turns a checkpoint into a decoder and a
vision graph, and the processor the runtime prepares images and prompts with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..checkpoint import ModelSource
    from ..convert.graph import GraphBuilder
    from ..vision.processor import Processor
    from .decoder import Decoder, ModelArgs


def _no_config(meta: dict, config: dict) -> dict:
    return {}


def _as_read(name: str, weight: Any, config: dict) -> Any:
    return weight


@dataclass(frozen=True)
class GGUFNames:
    """How llama.cpp stores this family: its `general.architecture`, the layer tensors' names (blk.N.<key> ->
    model.layers.N.<value>), the config keys it implies rather than stores, and a fix-up of tensors as read
    (a float array or format.QuantizedWeight) into what the Hugging Face names hold."""

    architecture: str
    layers: Mapping[str, str]
    config: Callable[[dict, dict], dict] = _no_config  # (GGUF metadata, config read so far) -> more config keys
    tensor: Callable[[str, Any, dict], Any] = _as_read  # (Hugging Face name, tensor, config) -> tensor
    merges_by_rank: bool = False  # a sentencepiece vocabulary whose BPE merges follow the token order
    also: tuple[str, ...] = ()  # other `general.architecture` values stored the same way


@dataclass(frozen=True)
class TextFamily:
    name: str
    title: str  # how users know it, for messages and the docs
    architectures: tuple[str, ...]
    model_args: type[ModelArgs]  # decoder.ModelArgs or a subclass: .from_config(config dict)
    model: type[Decoder]  # decoder.Decoder or a subclass: model(args).build(g, weights, seq_length)
    gguf: GGUFNames | None = None
    # checkpoints of some of `architectures` stored in another layout (remote code): architecture -> the view of
    # such a source under this family's names, with its config translated
    layouts: Mapping[str, Callable[[ModelSource], ModelSource]] = field(default_factory=dict)

    def decoder(self, config: dict) -> Decoder:
        return self.model(self.model_args.from_config(config))


@dataclass(frozen=True)
class VisionOptions:
    """What `edgellm convert` lets a user choose about the vision side."""

    max_pixels: int | None = None  # the largest image, in pixels (the family decides what that bounds)
    static_size: tuple[int, int] | bool = False  # a vision graph of one input size: (width, height), or True


class VisionGraph(Protocol):
    """A family's vision graph builder: the tower and projector, pixels in, the decoder's embeddings out."""

    def build(self, g: GraphBuilder, weights: ModelSource) -> None: ...


@dataclass
class VisionParts:
    """A vision-language checkpoint taken apart by its family's `split`."""

    text: ModelSource  # the decoder's weights under text-family names, with the decoder's own config
    decoder: Decoder  # the decoder graph builder, with the family's extensions
    text_family: str  # the text family the decoder extends (the manifest's "family")
    vision: VisionGraph
    vision_weights: ModelSource
    settings: Any  # the family's processor settings (a dataclass), stored in the manifest


@dataclass(frozen=True)
class VisionLanguageFamily:
    name: str
    title: str
    architectures: tuple[str, ...]
    split: Callable[[ModelSource, VisionOptions], VisionParts]
    processor: type[Processor]  # made from the manifest's vision settings at run time
    static_vit: bool = False  # the vision graph can be built for one fixed input size
