"""Qwen2-VL and Qwen2.5-VL: a ViT over 14px patches of any resolution (2-D rotary positions; window attention in
2.5), a 2x2 patch merger, and a Qwen2 decoder with 3-axis M-RoPE positions."""

from ...modeling.family import VisionLanguageFamily
from .processing import Processor
from .vision import split

FAMILY = VisionLanguageFamily(name="qwen2_vl", title="Qwen2-VL, Qwen2.5-VL",
                              architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
                              split=split, processor=Processor, static_vit=True)
