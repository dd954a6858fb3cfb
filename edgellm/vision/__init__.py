"""Image and video preprocessing, one module per model family, matching each model's Hugging Face processor."""

from .images import load_image, normalize

__all__ = ["load_image", "normalize"]
