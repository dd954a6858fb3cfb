"""Reading images from whatever the caller has (a path, bytes, a PIL image) into RGB, with clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError


def load_image(image):
    """An RGB PIL image; transparency is composited onto white (as transformers' processors do)."""
    from PIL import Image, UnidentifiedImageError

    what = "image"
    try:
        if isinstance(image, Image.Image):
            image.load()
        elif isinstance(image, (bytes, bytearray, memoryview)):
            what = f"image of {len(image)} bytes"
            image = Image.open(io.BytesIO(bytes(image)))
            image.load()
        elif isinstance(image, (str, Path)):
            what = str(image)
            if not Path(image).is_file():
                raise EdgeLLMError(f"{image}: no such image file")
            image = Image.open(image)
            image.load()
        else:
            raise EdgeLLMError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EdgeLLMError(f"{what}: not a readable image ({e})") from e
    if image.width == 0 or image.height == 0:
        raise EdgeLLMError(f"{what}: the image has zero size ({image.width}x{image.height})")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def normalize(image, rescale: float, mean, std) -> np.ndarray:
    """uint8 RGB PIL image -> float32 [3, H, W], rescaled then normalised with the processor's arithmetic."""
    scaled = (np.asarray(image).astype(np.float64) * rescale).astype(np.float32)
    x = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
