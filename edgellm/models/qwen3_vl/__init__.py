"""Qwen3-VL (dense): Qwen2-VL's dynamic resolution with 16px patches and a learned position table resampled to
each grid, a Qwen3 decoder with interleaved M-RoPE, and DeepStack features added after its first layers."""

from ...modeling.family import VisionLanguageFamily
from .processing import Processor
from .vision import split

FAMILY = VisionLanguageFamily(name="qwen3_vl", title="Qwen3-VL", architectures=("Qwen3VLForConditionalGeneration",),
                              split=split, processor=Processor, static_vit=True)
