"""Images and video for vision-language models: reading them (images.py, video.py), the preprocessed item
(media.py), and the interface each family's processor implements (processor.py)."""

from .images import load_image, normalize

__all__ = ["load_image", "normalize"]
