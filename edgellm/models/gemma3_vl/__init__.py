"""Gemma 3 vision-language models (Gemma3ForConditionalGeneration, 4B and up): a SigLIP tower over 896px images,
a 4x4 average-pooling projector (256 soft tokens per image) and the Gemma 3 decoder with bidirectional image
blocks."""

from ...modeling.family import VisionLanguageFamily
from .processing import Processor
from .vision import split

FAMILY = VisionLanguageFamily(name="gemma3_vl", title="Gemma 3 vision-language",
                              architectures=("Gemma3ForConditionalGeneration",), split=split, processor=Processor)
