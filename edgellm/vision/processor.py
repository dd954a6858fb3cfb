"""What a vision-language family does at run time, as one small interface the runtime calls: turn images and
videos into the vision graph's inputs and the prompt's placeholders into the tokens their embeddings fill, and
say what the family's decoder needs beyond the plain contract (rotary positions of several axes, extra inputs,
spans a prefill chunk must not split). Each family's `processing.Processor` implements it."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError
from .media import Media


@dataclass(kw_only=True)
class MediaTokens:
    """The tokens a family's prompts mark images and videos with (each one token of the tokenizer); every family's
    Settings starts with these."""

    image_token: str
    image_start: str | None = None
    image_end: str | None = None
    video_token: str | None = None

    def to_json(self) -> dict:
        """The settings as the manifest stores them (a marker the family does not use is left out)."""
        marks = ("image_start", "image_end", "video_token")
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in marks and v is None)}


class DecoderExtension:
    """A family's additions to the decoder contract, used by the runtime's engine; this base adds nothing."""

    def chunk_end(self, media_positions: np.ndarray, end: int, length: int) -> int:
        """Where a prefill chunk that would end at `end` must end instead, given the prompt's sorted media
        positions (a family whose media tokens attend to each other keeps a run of them in one chunk)."""
        return end

    def inputs(self, length: int, media: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        """Extra decoder inputs for a run of `length` new positions; `media` holds, per image or video with tokens
        in the run, their offsets in it and the vision graph's features for those tokens (name -> [tokens, ...])."""
        return {}


class Processor(ABC):
    """Made from the bundle's vision settings (the manifest's dict, read into the family's `Settings`)."""

    Settings: type  # the family's settings dataclass

    def __init__(self, settings: dict):
        names = {f.name for f in dataclasses.fields(self.Settings)}
        try:
            self.settings = self.Settings(**{k: v for k, v in settings.items() if k in names})
        except TypeError as e:  # a setting the family needs is missing
            raise EdgeLLMError(f"the bundle's vision settings are incomplete ({e}); reconvert the model") from None

    @abstractmethod
    def image(self, picture) -> Media:
        """A path, bytes or PIL image, preprocessed for the vision graph."""

    @abstractmethod
    def video(self, clip, frames: int | None = None) -> Media:
        """A video file, sampled (at most `frames` frames, or the family's default) and preprocessed."""

    @abstractmethod
    def runs(self, media: Media) -> Iterator[dict[str, np.ndarray]]:
        """The vision graph's inputs for `media`, one dict per run of the graph."""

    @abstractmethod
    def expand_prompt(self, text: str, items: list[Media]) -> str:
        """The rendered chat template with each image/video placeholder, in order, replaced by what the model
        reads: as many media tokens as the item's embeddings have rows, with the family's markers."""

    def template_parts(self, item: Media) -> list[dict]:
        """The content parts the chat template sees for `item`."""
        return [{"type": item.kind}]

    def positions(self, length: int, spans: list[np.ndarray], items: list[Media]) -> np.ndarray | None:
        """Rotary positions [rows, length] of a prompt whose media tokens sit at `spans`; None: 0, 1, 2, ..."""
        return None

    def decoder_extension(self, graph_inputs: dict[str, list]) -> DecoderExtension:
        """The engine's plug-in for this family's decoder, given the decoder graph's inputs (name -> shape)."""
        return DecoderExtension()
