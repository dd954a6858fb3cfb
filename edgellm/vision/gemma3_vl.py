"""Gemma 3 images: one square resize to the tower's size (no aspect ratio kept, no tiling), and in the prompt
each image's <start_of_image> becomes "\\n\\n<start_of_image>" + 256 soft tokens + "<end_of_image>\\n\\n", as
Gemma3Processor writes it. Gemma 3 reads no video: a clip's frames (at segment midpoints) go in as images."""

from __future__ import annotations

import numpy as np

from .images import load_image, normalize
from .media import Media
from .video import read_frames, segment_midpoints


def pixels(picture, s: dict) -> np.ndarray:
    """RGB PIL image -> float32 [3, size, size]."""
    side = s["image_size"]
    return normalize(picture.resize((side, side), s["resample"]), s["rescale_factor"], s["image_mean"],
                     s["image_std"])


def image(picture, s: dict) -> Media:
    return Media.of("image", pixels(load_image(picture), s)[None], s["tokens_per_image"])


def video(clip, s: dict, frames: int | None = None) -> Media:
    pictures, _, _ = read_frames(clip, lambda total, fps: segment_midpoints(total, frames or s["video_frames"]))
    values = np.stack([pixels(p, s) for p in pictures])
    return Media.of("video", values, len(pictures) * s["tokens_per_image"])


def runs(media: Media, s: dict):
    """The vision graph's inputs: all pictures of one image or clip in one run."""
    yield {"pixel_values": media.pixel_values}


def template_parts(item: Media) -> list[dict]:
    """The chat-template parts that stand for `item`: the template knows images only, so a clip is its frames."""
    return [{"type": "image"}] * item.pixel_values.shape[0]


def expand_prompt(text: str, items: list, s: dict) -> str:
    """Each <start_of_image> the template wrote, in order, becomes the full image sequence (frames of a clip
    take one each)."""
    block = f"\n\n{s['image_start']}{s['image_token'] * s['tokens_per_image']}{s['image_end']}\n\n"
    wanted = sum(item.pixel_values.shape[0] for item in items)
    pieces = text.split(s["image_start"])
    return "".join(piece + (block if i < wanted else s["image_start"]) for i, piece in enumerate(pieces[:-1])) \
        + pieces[-1]
