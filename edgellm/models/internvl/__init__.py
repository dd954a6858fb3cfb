"""InternVL 2.5 / 3: an InternViT vision tower, a pixel-shuffle MLP projector and a Qwen2 (or Llama, Qwen3)
decoder; 448px tiles, up to max_patches tiles plus a thumbnail, 256 tokens per tile."""

from ...modeling.family import VisionLanguageFamily
from .processing import Processor
from .vision import split

FAMILY = VisionLanguageFamily(name="internvl", title="InternVL 2.5 / 3",
                              architectures=("InternVLForConditionalGeneration", "InternVLChatModel"), split=split,
                              processor=Processor)
