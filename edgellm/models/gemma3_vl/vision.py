"""Gemma 3 vision-language models (Gemma3ForConditionalGeneration, 4B and up): a SigLIP tower over 896px images, a
projector that average-pools the 64x64 patch grid to 16x16 = 256 soft tokens, RMS-normalises them and maps them
to the decoder's width, and the Gemma 3 text decoder, in which the tokens of one image attend to each other in
both directions.

Checkpoints name the parts language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.* (or, from
transformers 5, under model.*, and the tower without vision_model.); all are renamed onto the first spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...checkpoint import ModelSource, PrefixRename, RenamedSource
from ...errors import EdgeLLMError
from ...modeling.family import VisionOptions, VisionParts
from .. import gemma3
from .language import Model
from .processing import Settings
from .siglip import SiglipArgs, SiglipVisionTower

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder

TOWER = "vision_tower.vision_model."


@dataclass
class VisionArgs:
    tower: SiglipArgs
    tokens_per_image: int
    text_hidden_size: int

    @property
    def pool(self) -> int:  # patches per side pooled into one soft token
        return self.tower.grid // int(round(self.tokens_per_image ** 0.5))

    @classmethod
    def from_config(cls, config: dict, text_config: dict) -> VisionArgs:
        tower = SiglipArgs.from_config(config["vision_config"])
        tokens = int(config.get("mm_tokens_per_image", 256))
        side = int(round(tokens ** 0.5))
        if side * side != tokens or tower.grid % side:
            raise EdgeLLMError(f"mm_tokens_per_image {tokens} does not pool a {tower.grid}x{tower.grid} patch grid "
                               "evenly")
        return cls(tower, tokens, text_config["hidden_size"])


def _prefix_of(names: set[str], candidates: list[str], probe: str) -> str:
    for prefix in candidates:
        if prefix + probe in names:
            return prefix
    raise EdgeLLMError(f"this Gemma 3 checkpoint has no {probe} under any of {', '.join(candidates)}")


def split(source: ModelSource, options: VisionOptions) -> VisionParts:
    """A Gemma 3 VLM checkpoint as its decoder (with image blocks) and the vision graph."""
    if options.max_pixels is not None:
        raise EdgeLLMError("--max-pixels does not apply to Gemma 3: every image is resized to the tower's size")
    config, names = source.config, set(source.names())
    text_config = dict(config["text_config"])
    text_config["architectures"] = ["Gemma3ForCausalLM"]
    text_config.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
    text_prefix = _prefix_of(names, ["language_model.model.", "model.language_model."], "embed_tokens.weight")
    lm_head = "language_model.lm_head." if "language_model.lm_head.weight" in names else "lm_head."
    text = RenamedSource(source, text_config, PrefixRename({"model.": text_prefix, "lm_head.": lm_head}))
    tower = _prefix_of(names, [TOWER, "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."],
                       "embeddings.patch_embedding.weight")
    projector = _prefix_of(names, ["multi_modal_projector.", "model.multi_modal_projector."],
                           "mm_input_projection_weight")
    vision = RenamedSource(source, config, PrefixRename({TOWER: tower, "multi_modal_projector.": projector}))
    args = VisionArgs.from_config(config, text_config)
    decoder = Model(gemma3.ModelArgs.from_config(text_config))
    return VisionParts(text, decoder, gemma3.FAMILY.name, VisionModel(args), vision, settings(source, args))


def settings(source: ModelSource, args: VisionArgs) -> Settings:
    p = source.preprocessor_config()
    size = p.get("size") or {}
    side = int(size.get("height") or args.tower.image_size)
    if side != args.tower.image_size or int(size.get("width") or side) != side:
        raise EdgeLLMError(f"preprocessor_config.json resizes images to {size}, the vision tower takes "
                           f"{args.tower.image_size}px squares")
    if p.get("do_pan_and_scan"):
        raise EdgeLLMError("Gemma 3 pan-and-scan crops are not supported yet; set do_pan_and_scan to false")
    return Settings(
        image_size=side, tokens_per_image=args.tokens_per_image, resample=int(p.get("resample", 2)),
        rescale_factor=float(p.get("rescale_factor", 1 / 255)), image_mean=list(p.get("image_mean", [0.5] * 3)),
        image_std=list(p.get("image_std", [0.5] * 3)),
        video_frames=8,  # Gemma 3 has no video input: frames at segment midpoints go in as images
        image_token="<image_soft_token>", image_start="<start_of_image>", image_end="<end_of_image>")


class VisionModel:
    """pixel_values [images, 3, size, size] -> image_embeds [images, tokens_per_image, text hidden size]."""

    def __init__(self, args: VisionArgs):
        self.args = args
        self.tower = SiglipVisionTower(args.tower)

    def build(self, g: GraphBuilder, weights: ModelSource) -> None:
        a, t = self.args, self.args.tower
        pixels = g.input("pixel_values", np.float32, ["images", 3, t.image_size, t.image_size])
        x = self.tower.build(g, weights, pixels)
        p = "multi_modal_projector"
        grid = g.reshape(g.op("Transpose", [x], name=f"{p}/channels_first", perm=[0, 2, 1]),
                         [0, t.hidden_size, t.grid, t.grid], f"{p}/grid")
        pooled = g.op("AveragePool", [grid], name=f"{p}/avg_pool", kernel_shape=[a.pool] * 2, strides=[a.pool] * 2)
        x = g.op("Transpose", [g.reshape(pooled, [0, t.hidden_size, -1], f"{p}/flatten")], name=f"{p}/tokens",
                 perm=[0, 2, 1])
        norm = weights.tensor(f"{p}.mm_soft_emb_norm.weight") + np.float32(1.0)  # Gemma's norms scale by 1 + w
        x = g.rms_norm(x, norm, t.layer_norm_eps, f"{p}.mm_soft_emb_norm")
        x = g.linear(x, weights.tensor(f"{p}.mm_input_projection_weight").T, f"{p}.mm_input_projection")
        g.output("image_embeds", np.float32, ["images", a.tokens_per_image, a.text_hidden_size], value=x)
