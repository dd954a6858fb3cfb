"""Qwen2-VL and Qwen2.5-VL: a ViT over 14px patches of any resolution (2-D rotary positions), a 2x2 patch merger,
and a Qwen2 decoder whose rotary positions have three axes (M-RoPE: time, height, width).

Qwen2.5-VL changes the vision tower: RMSNorm, a gated SiLU MLP, and attention within 112px windows except in
`fullatt_block_indexes`. Names are the checkpoint's (visual.blocks.N.attn.qkv ...); transformers 5's own layout
(model.visual., model.language_model.) is renamed onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...checkpoint import ModelSource, PrefixRename, RenamedSource
from ...errors import EdgeLLMError
from ...modeling import layers
from ...modeling.family import VisionOptions, VisionParts
from ...modeling.layers import FLOAT, MS, activation, rope_parameters, vit_block
from .. import qwen2
from .language import Model
from .processing import Settings

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# Edge defaults: an image of at most 512 merged tokens (about 630x630), video frames of 128 tokens, 16 frames.
DEFAULT_MAX_TOKENS, VIDEO_TOKENS, VIDEO_MAX_FRAMES = 512, 128, 16


@dataclass
class VisionArgs:
    version: str  # "2" or "2.5"
    hidden_size: int  # the ViT's width
    depth: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    rope_theta: float
    text_hidden_size: int
    window_size: int = 0  # 2.5: window side in pixels
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def window_patches(self) -> int:  # window side in patches (a whole number of merged units)
        return self.window_size // self.patch_size // self.spatial_merge_size * self.spatial_merge_size

    @classmethod
    def from_config(cls, config: dict, text_config: dict) -> VisionArgs:
        v = config["vision_config"]
        v25 = config["architectures"][0].startswith("Qwen2_5")
        width = v["hidden_size"] if v25 else v["embed_dim"]
        return cls(
            version="2.5" if v25 else "2", hidden_size=width, depth=v["depth"], num_heads=v["num_heads"],
            intermediate_size=v["intermediate_size"] if v25 else int(width * v.get("mlp_ratio", 4)),
            hidden_act=v.get("hidden_act", "silu" if v25 else "quick_gelu"), patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            text_hidden_size=v["out_hidden_size"] if v25 and "out_hidden_size" in v else text_config["hidden_size"],
            window_size=v.get("window_size", 0) if v25 else 0,
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())) if v25 else ())


def text_part(source: ModelSource, text_config: dict) -> tuple[ModelSource, ModelSource, list[int]]:
    """(the decoder's weights under Qwen text names, the vision tower's under visual.*, the M-RoPE sections) of a
    Qwen-VL checkpoint in the original or the transformers-5 layout."""
    config, names = source.config, set(source.names())
    text_config.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    section = rope_parameters(text_config).get("mrope_section")
    if not section:
        raise EdgeLLMError(f"this {config['architectures'][0]} config names no mrope_section for its rotary positions")
    hf5 = any(n.startswith("model.language_model.") for n in names)
    text = RenamedSource(source, text_config, PrefixRename({"model.": "model.language_model." if hf5 else "model.",
                                                            "lm_head.": "lm_head."}))
    vision = RenamedSource(source, config, PrefixRename({"visual.": "model.visual."})) \
        if any(n.startswith("model.visual.") for n in names) else source
    return text, vision, section


def split(source: ModelSource, options: VisionOptions) -> VisionParts:
    """A Qwen2-VL / Qwen2.5-VL checkpoint as its M-RoPE decoder and the vision graph; options.static_size:
    (width, height), or True for the largest square within max_pixels, fixes the image size."""
    config = source.config
    text_config = dict(config.get("text_config") or {k: v for k, v in config.items() if k != "vision_config"})
    text_config["architectures"] = ["Qwen2ForCausalLM"]
    text, vision, section = text_part(source, text_config)
    args = VisionArgs.from_config(config, text_config)
    found = settings(source, args, config, options.max_pixels, options.static_size)
    return VisionParts(text, Model(qwen2.ModelArgs.from_config(text_config), section), qwen2.FAMILY.name,
                       VisionModel(args, static_patches(found)), vision, found)


def settings(source: ModelSource, args: VisionArgs, config: dict, max_pixels: int | None,
             static_size: tuple[int, int] | bool = False) -> Settings:
    """The processor's rules (smart resize bounds, normalisation, video sampling) and the prompt's tokens."""
    p = source.preprocessor_config()
    size = p.get("size") or {}
    min_px = int(p.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    max_px = int(p.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    factor = args.patch_size * args.spatial_merge_size
    max_px = int(max_pixels) if max_pixels else min(max_px, DEFAULT_MAX_TOKENS * factor * factor)
    if max_px < factor * factor:
        raise EdgeLLMError(f"--max-pixels {max_px} is below one {factor}x{factor} merged patch")
    fixed_size = None
    if static_size:  # one size for every image and frame, in whole merged patches
        w, h = static_size if isinstance(static_size, tuple) else (int(max_px ** 0.5),) * 2
        fixed_size = [max(factor, h // factor * factor), max(factor, w // factor * factor)]
    return Settings(
        version=args.version, static_size=fixed_size, patch_size=args.patch_size,
        temporal_patch_size=args.temporal_patch_size, merge_size=args.spatial_merge_size,
        min_pixels=min(min_px, max_px), max_pixels=max_px, resample=int(p.get("resample", 3)),
        rescale_factor=float(p.get("rescale_factor", 1 / 255)), image_mean=list(p.get("image_mean", CLIP_MEAN)),
        image_std=list(p.get("image_std", CLIP_STD)), video_fps=2.0, video_min_frames=4,
        video_frames=VIDEO_MAX_FRAMES,
        video_min_pixels=min(VIDEO_TOKENS * factor * factor, max_px) if not max_pixels else min(min_px, max_px),
        video_max_pixels=min(VIDEO_TOKENS * factor * factor, max_px) if not max_pixels else max_px,
        # 2.5 spaces video frames' temporal positions by time: tokens_per_second x seconds per temporal patch
        tokens_per_second=config["vision_config"].get("tokens_per_second") if args.version == "2.5" else None,
        image_token="<|image_pad|>", video_token="<|video_pad|>")


def static_patches(settings: Settings) -> int | None:
    """The vision graph's fixed patch count under --static-vit, else None (any count)."""
    size, p = settings.static_size, settings.patch_size
    return size[0] // p * (size[1] // p) if size else None


class VisionModel:
    """pixel_values [patches, 3 x temporal x 14 x 14] + patch_positions [patches, 2] (row, column) of one image or
    one temporal slice of a video -> image_embeds [patches / 4, text hidden size]. `patches` fixes the count."""

    def __init__(self, args: VisionArgs, patches: int | None = None):
        self.args = args
        self.patches = patches or "patches"

    def norm(self, g: GraphBuilder, weights: ModelSource, x: str, name: str) -> str:
        return layers.norm(g, weights, x, name, 1e-6, "rms_norm" if self.args.version == "2.5" else "layer_norm")

    def rotary_tables(self, g: GraphBuilder, positions: str) -> tuple[str, str]:
        """cos/sin [patches, head_dim / 2]: the first half of the frequencies turn with the row, the rest with the
        column."""
        quarter = self.args.head_dim // 4
        freqs = 1.0 / self.args.rope_theta ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / (2 * quarter))
        pos = g.op("Cast", [positions], name="rotary/float", to=FLOAT)
        angles = g.mul(g.op("Unsqueeze", [pos, g.ints([2], "rotary/axis")], name="rotary/unsqueeze"),
                       g.const(freqs.astype(np.float32).reshape(1, 1, quarter), "rotary.inv_freq"), "rotary/angles")
        angles = g.reshape(angles, [0, 2 * quarter], "rotary/rows_then_columns")
        return g.op("Cos", [angles], name="rotary/cos"), g.op("Sin", [angles], name="rotary/sin")

    def rope(self, g: GraphBuilder, pixels: str, positions: str) -> dict:
        """The rotary tables of the patches, and the steps 0..N-1 by which RotaryEmbedding reads row i for patch i."""
        cos, sin = self.rotary_tables(g, positions)
        count = g.op("Gather", [g.op("Shape", [pixels], name="patches/shape"), g.ints(0, "patches/dim0")],
                     name="patches/count", axis=0)
        steps = g.op("Range", [g.ints(0, "patches/zero"), count, g.ints(1, "patches/one")], name="patches/steps")
        return {"cos": cos, "sin": sin,
                "steps": g.op("Unsqueeze", [steps, g.ints([0], "patches/ax0")], name="patches/positions")}

    def window_bias(self, g: GraphBuilder, positions: str) -> str:
        """[1, 1, patches, patches]: 0 where two patches share a window, a large negative number elsewhere."""
        window = g.op("Div", [positions, g.ints(self.args.window_patches, "window/side")], name="window/index")
        row, col = (g.op("Gather", [window, g.ints(i, f"window/axis{i}")], name=f"window/{n}", axis=1)
                    for i, n in enumerate(("row", "col")))
        key = g.add(g.mul(row, g.ints(1 << 20, "window/stride"), "window/row_key"), col, "window/key")
        same = g.op("Equal", [g.op("Unsqueeze", [key, g.ints([1], "window/ax1")], name="window/rows"),
                              g.op("Unsqueeze", [key, g.ints([0], "window/ax0")], name="window/cols")],
                    name="window/same")
        bias = g.op("Where", [same, g.const(np.float32(0), "window/zero"), g.const(np.float32(-1e30), "window/masked")],
                    name="window/bias")
        return g.op("Unsqueeze", [bias, g.ints([0, 1], "window/ax01")], name="window/bias4d")

    def attention(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str, rope: dict,
                  bias: str | None) -> str:
        a = self.args
        qkv = layers.linear(g, weights, x, f"{prefix}.qkv")
        q, k, v = g.op("Split", [qkv, g.ints([a.hidden_size] * 3, f"{prefix}/sizes")], name=f"{prefix}/split",
                       outputs=3, axis=-1)
        q, k, v = (g.op("Unsqueeze", [t, g.ints([0], f"{prefix}/batch")], name=f"{prefix}/{n}3d")
                   for t, n in zip((q, k, v), "qkv"))
        q, k = (g.op("RotaryEmbedding", [t, rope["steps"], rope["cos"], rope["sin"]], name=f"{prefix}/{n}_rotary",
                     domain=MS, num_heads=a.num_heads, interleaved=0) for t, n in zip((q, k), "qk"))
        inputs = [q, k, v] + (["", "", bias] if bias else [])
        out = g.op("MultiHeadAttention", inputs, name=f"{prefix}/mha", domain=MS, num_heads=a.num_heads)
        return layers.linear(g, weights, g.reshape(out, [-1, a.hidden_size], f"{prefix}/2d"), f"{prefix}.proj")

    def mlp(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> str:
        if self.args.version == "2.5":
            gate = activation(g, layers.linear(g, weights, x, f"{prefix}.gate_proj"), self.args.hidden_act,
                              f"{prefix}.act")
            return layers.linear(g, weights, g.mul(gate, layers.linear(g, weights, x, f"{prefix}.up_proj")),
                               f"{prefix}.down_proj")
        h = activation(g, layers.linear(g, weights, x, f"{prefix}.fc1"), self.args.hidden_act, f"{prefix}.act")
        return layers.linear(g, weights, h, f"{prefix}.fc2")

    def block(self, g: GraphBuilder, weights: ModelSource, i: int, x: str, rope: dict, bias: str | None) -> str:
        prefix = f"visual.blocks.{i}"
        return vit_block(g, x, prefix, lambda h: self.norm(g, weights, h, f"{prefix}.norm1"),
                         lambda h: self.attention(g, weights, f"{prefix}.attn", h, rope, bias),
                         lambda h: self.norm(g, weights, h, f"{prefix}.norm2"),
                         lambda h: self.mlp(g, weights, f"{prefix}.mlp", h))

    def build(self, g: GraphBuilder, weights: ModelSource) -> None:
        a = self.args
        patch_dim = 3 * a.temporal_patch_size * a.patch_size ** 2
        pixels = g.input("pixel_values", np.float32, [self.patches, patch_dim])
        positions = g.input("patch_positions", np.int64, [self.patches, 2])
        # The 3-D convolution over non-overlapping patches is a matmul with the flattened kernel.
        kernel = weights.tensor("visual.patch_embed.proj.weight").reshape(a.hidden_size, patch_dim)
        x = g.linear(pixels, kernel, "visual.patch_embed.proj")
        rope = self.rope(g, pixels, positions)
        windowed = self.window_bias(g, positions) if a.window_size else None
        for i in range(a.depth):
            x = self.block(g, weights, i, x, rope, None if i in a.fullatt_block_indexes else windowed)
        # Patches come in 2x2 groups (the preprocessor's order), so merging is a reshape.
        x = self.norm(g, weights, x, "visual.merger.ln_q")
        x = g.reshape(x, [-1, a.hidden_size * a.spatial_merge_size ** 2], "visual.merger/group")
        x = layers.linear(g, weights, x, "visual.merger.mlp.0")
        x = layers.linear(g, weights, activation(g, x, "gelu", "visual.merger.act"), "visual.merger.mlp.2")
        g.output("image_embeds", np.float32, ["tokens", a.text_hidden_size], value=x)
