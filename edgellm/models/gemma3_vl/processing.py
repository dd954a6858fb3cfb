"""Gemma 3 images: one square resize to the tower's size (no aspect ratio kept, no tiling), and in the prompt
each image's <start_of_image> becomes "\\n\\n<start_of_image>" + 256 soft tokens + "<end_of_image>\\n\\n", as
Gemma3Processor writes it. Gemma 3 reads no video: a clip's frames (at segment midpoints) go in as images. The
tokens of one image attend to each other in both directions, so the decoder takes each token's image block and a
prefill chunk never splits one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...vision import processor
from ...vision.images import load_image, normalize
from ...vision.media import Media
from ...vision.processor import DecoderExtension
from ...vision.video import read_frames, segment_midpoints


@dataclass(kw_only=True)
class Settings(processor.MediaTokens):
    image_size: int
    tokens_per_image: int
    resample: int
    rescale_factor: float
    image_mean: list[float]
    image_std: list[float]
    video_frames: int


def pixels(picture, s: Settings) -> np.ndarray:
    """RGB PIL image -> float32 [3, size, size]."""
    side = s.image_size
    return normalize(picture.resize((side, side), s.resample), s.rescale_factor, s.image_mean, s.image_std)


def image_blocks(spans: list[np.ndarray], length: int) -> np.ndarray:
    """Per position of a run of `length`, the index of the run of consecutive media positions (`spans`) it
    belongs to, or -1 (as transformers' Gemma 3 numbers its bidirectional blocks)."""
    is_image = np.zeros(length, bool)
    for slots in spans:
        is_image[slots] = True
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts) - 1, -1)


class ImageBlocks(DecoderExtension):
    """The decoder's `token_groups`: per position, its image block (-1: text); blocks stay whole in a chunk."""

    def chunk_end(self, media_positions: np.ndarray, end: int, length: int) -> int:
        inside = set(media_positions.tolist())
        while end < length and end in inside and end - 1 in inside:
            end += 1  # the chunk takes the rest of the image block it has started
        return end

    def inputs(self, length: int, media: list) -> dict[str, np.ndarray]:
        return {"token_groups": image_blocks([offsets for offsets, _ in media], length).astype(np.int64)}


class Processor(processor.Processor):
    Settings = Settings

    def image(self, picture) -> Media:
        return Media.of("image", pixels(load_image(picture), self.settings)[None], self.settings.tokens_per_image)

    def video(self, clip, frames: int | None = None) -> Media:
        s = self.settings
        pictures, _, _ = read_frames(clip, lambda total, fps: segment_midpoints(total, frames or s.video_frames))
        values = np.stack([pixels(p, s) for p in pictures])
        return Media.of("video", values, len(pictures) * s.tokens_per_image)

    def runs(self, media: Media):
        """All pictures of one image or clip in one run."""
        yield {"pixel_values": media.pixel_values}

    def template_parts(self, item: Media) -> list[dict]:
        """The template knows images only, so a clip is its frames."""
        return [{"type": "image"}] * item.pixel_values.shape[0]

    def expand_prompt(self, text: str, items: list) -> str:
        """Each <start_of_image> the template wrote, in order, becomes the full image sequence (frames of a clip
        take one each)."""
        s = self.settings
        block = f"\n\n{s.image_start}{s.image_token * s.tokens_per_image}{s.image_end}\n\n"
        wanted = sum(item.pixel_values.shape[0] for item in items)
        pieces = text.split(s.image_start)
        return "".join(piece + (block if i < wanted else s.image_start) for i, piece in enumerate(pieces[:-1])) \
            + pieces[-1]

    def decoder_extension(self, graph_inputs: dict[str, list]) -> DecoderExtension:
        return ImageBlocks()
