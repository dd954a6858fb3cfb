"""InternVL 2.5 / 3: an InternViT vision tower, a pixel-shuffle MLP projector and a Qwen2 (or Llama, Qwen3) decoder.

Names here are the Hugging Face-native ones (InternVLForConditionalGeneration: vision_tower, multi_modal_projector,
language_model). The original remote-code layout (InternVLChatModel: vision_model with a fused qkv, mlp1) is
renamed onto them by `OriginalLayout`, so the graph code below is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...checkpoint import ModelSource, PrefixRename, RenamedSource
from ...errors import EdgeLLMError
from ...modeling import layers
from ...modeling.family import TextFamily, VisionOptions, VisionParts
from ...modeling.layers import MS, VitArgs, activation, patch_embedding, vit_block
from .processing import Settings

if TYPE_CHECKING:
    from ...convert.graph import GraphBuilder

IMAGE_NET_MEAN, IMAGE_NET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class VisionArgs(VitArgs):
    norm_type: str
    layer_norm_eps: float
    attention_bias: bool
    use_qk_norm: bool
    use_mean_pooling: bool
    hidden_act: str
    downsample_ratio: float
    projector_hidden_act: str
    text_hidden_size: int

    @property
    def tokens_per_tile(self) -> int:
        return int(self.grid * self.downsample_ratio) ** 2

    @classmethod
    def from_config(cls, config: dict, text_config: dict) -> VisionArgs:
        v = config["vision_config"]
        side = lambda x: int(x[0] if isinstance(x, (list, tuple)) else x)  # noqa: E731
        if config.get("vision_feature_layer", config.get("select_layer", -1)) != -1:
            raise EdgeLLMError("InternVL with vision features from an inner layer is not supported yet")
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise EdgeLLMError("InternVL keeping the CLS token as an image feature is not supported yet")
        return cls(
            hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=side(config.get("force_image_size") or v.get("image_size", 448)),
            patch_size=side(v.get("patch_size", 14)), norm_type=v.get("norm_type", "layer_norm"),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            attention_bias=bool(v.get("attention_bias", v.get("qkv_bias", False))),
            use_qk_norm=bool(v.get("use_qk_norm", v.get("qk_normalization", False))),
            use_mean_pooling=bool(v.get("use_mean_pooling", True)), hidden_act=v.get("hidden_act", "gelu"),
            downsample_ratio=float(config.get("downsample_ratio", 0.5)),
            projector_hidden_act=config.get("projector_hidden_act", "gelu"),
            text_hidden_size=text_config["hidden_size"])


class OriginalLayout(ModelSource):
    """The remote-code checkpoint (vision_model.*, mlp1.*) under the Hugging Face-native vision names."""

    RENAMES = [("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
               ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
               ("vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding"),
               ("vision_tower.encoder.layer.", "vision_model.encoder.layers."),
               ("multi_modal_projector.layer_norm", "mlp1.0"), ("multi_modal_projector.linear_1", "mlp1.1"),
               ("multi_modal_projector.linear_2", "mlp1.3")]
    PARTS = [(".attention.projection_layer", ".attn.proj"), (".attention.q_norm", ".attn.q_norm"),
             (".attention.k_norm", ".attn.k_norm"), (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
             (".layernorm_before", ".norm1"), (".layernorm_after", ".norm2")]

    def __init__(self, source: ModelSource):
        self.source, self.config = source, source.config

    def _theirs(self, name: str) -> str:
        for mine, theirs in self.RENAMES + self.PARTS:
            name = name.replace(mine, theirs)
        return name

    def names(self):
        return self.source.names()

    def tensor(self, name: str) -> np.ndarray:
        for i, p in enumerate("qkv"):  # q, k, v are thirds of one fused projection
            part = f".attention.{p}_proj."
            if part in name:
                fused = self.source.tensor(self._theirs(name.replace(part, ".attn.qkv.")))
                return np.split(fused, 3)[i]
        return self.source.tensor(self._theirs(name))

    linear = tensor


def split(source: ModelSource, options: VisionOptions) -> VisionParts:
    """An InternVL checkpoint as a decoder of the text family its config names and the vision graph;
    options.max_pixels caps the number of tiles of an image."""
    from .. import family_for

    config = source.config
    original = "llm_config" in config
    text_config = dict(config["llm_config"] if original else config["text_config"])
    names = set(source.names())
    text_prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in names) \
        else "language_model.model."
    lm_head = "lm_head." if "lm_head.weight" in names else "language_model.lm_head."
    text_config.setdefault("architectures", [_TEXT_ARCHITECTURES.get(text_config.get("model_type", ""), "")])
    if "lm_head.weight" not in names and "language_model.lm_head.weight" not in names:
        text_config["tie_word_embeddings"] = True
    text = RenamedSource(source, text_config, PrefixRename({"model.": text_prefix, "lm_head.": lm_head}))
    vision_source = OriginalLayout(source) if original else source
    if not original and any(n.startswith("model.vision_tower.") for n in names):
        vision_source = RenamedSource(source, config, PrefixRename({"vision_tower.": "model.vision_tower.",
                                                                     "multi_modal_projector.":
                                                                         "model.multi_modal_projector."}))
    args = VisionArgs.from_config(config, text_config)
    found = settings(source, args)
    if options.max_pixels:
        found.max_patches = max(1, min(found.max_patches, int(options.max_pixels) // found.tile_size ** 2))
    family = family_for(text_config["architectures"][0])
    if not isinstance(family, TextFamily):
        raise EdgeLLMError(f"InternVL's language model {text_config['architectures'][0]} is a vision-language model")
    return VisionParts(text, family.decoder(text_config), family.name, VisionModel(args), vision_source, found)


_TEXT_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def settings(source: ModelSource, args: VisionArgs) -> Settings:
    """What the runtime needs to turn images into tiles and prompts (the checkpoint's processor settings)."""
    p = source.preprocessor_config()
    size = p.get("size") or {}
    tile = int(size.get("height") or size.get("shortest_edge") or args.image_size)
    if tile != args.image_size:
        raise EdgeLLMError(f"preprocessor_config.json sizes tiles at {tile}px, the vision tower at {args.image_size}")
    return Settings(
        tile_size=tile, tokens_per_tile=args.tokens_per_tile, crop_to_patches=bool(p.get("crop_to_patches", True)),
        min_patches=int(p.get("min_patches", 1)), max_patches=int(p.get("max_patches", 12)),
        resample=int(p.get("resample", 3)), rescale_factor=float(p.get("rescale_factor", 1 / 255)),
        image_mean=list(p.get("image_mean", IMAGE_NET_MEAN)), image_std=list(p.get("image_std", IMAGE_NET_STD)),
        video_frames=8, image_token="<IMG_CONTEXT>", image_start="<img>", image_end="</img>", video_token="<video>")


class VisionModel:
    """pixel_values [tiles, 3, size, size] -> image_embeds [tiles, tokens_per_tile, text hidden size]."""

    def __init__(self, args: VisionArgs):
        self.args = args

    def norm(self, g: GraphBuilder, weights: ModelSource, x: str, name: str) -> str:
        return layers.norm(g, weights, x, name, self.args.layer_norm_eps, self.args.norm_type)

    def embeddings(self, g: GraphBuilder, weights: ModelSource, pixels: str) -> str:
        a, prefix = self.args, "vision_tower.embeddings"
        x = patch_embedding(g, weights, pixels, f"{prefix}.patch_embeddings.projection", a.patch_size,
                            a.hidden_size)
        tiles = g.op("Slice", [g.op("Shape", [pixels], name=f"{prefix}/shape"), g.ints([0], "zero"),
                               g.ints([1], "one")], name=f"{prefix}/tiles")
        cls_shape = g.op("Concat", [tiles, g.ints([1, a.hidden_size], f"{prefix}/cls_dims")],
                         name=f"{prefix}/cls_shape", axis=0)
        cls = g.op("Expand", [g.const(weights.tensor(f"{prefix}.cls_token").reshape(1, 1, -1), f"{prefix}.cls_token"),
                              cls_shape], name=f"{prefix}/cls")
        x = g.op("Concat", [cls, x], name=f"{prefix}/with_cls", axis=1)
        positions = weights.tensor(f"{prefix}.position_embeddings").reshape(1, -1, a.hidden_size)
        if positions.shape[1] != a.grid ** 2 + 1:
            raise EdgeLLMError(f"InternVL position table holds {positions.shape[1] - 1} patches, tiles have "
                               f"{a.grid ** 2}; interpolated positions are not supported")
        return g.add(x, g.const(positions, f"{prefix}.position_embeddings"), name=f"{prefix}/positions")

    def attention(self, g: GraphBuilder, weights: ModelSource, prefix: str, x: str) -> str:
        a = self.args
        q, k, v = (layers.linear(g, weights, x, f"{prefix}.{p}_proj", a.attention_bias) for p in "qkv")
        if a.use_qk_norm:  # RMSNorm over all heads together
            q = g.rms_norm(q, weights.tensor(f"{prefix}.q_norm.weight"), a.layer_norm_eps, f"{prefix}.q_norm")
            k = g.rms_norm(k, weights.tensor(f"{prefix}.k_norm.weight"), a.layer_norm_eps, f"{prefix}.k_norm")
        out = g.op("MultiHeadAttention", [q, k, v], name=f"{prefix}.attn", domain=MS,
                   num_heads=a.num_attention_heads)
        return layers.linear(g, weights, out, f"{prefix}.projection_layer")

    def layer(self, g: GraphBuilder, weights: ModelSource, i: int, x: str) -> str:
        prefix = f"vision_tower.encoder.layer.{i}"
        def mlp(h: str) -> str:
            h = activation(g, layers.linear(g, weights, h, f"{prefix}.mlp.fc1"), self.args.hidden_act,
                           f"{prefix}.mlp.act")
            return layers.linear(g, weights, h, f"{prefix}.mlp.fc2")

        def scale(i: int, h: str) -> str:
            return g.mul(h, g.const(weights.tensor(f"{prefix}.lambda_{i}"), f"{prefix}.lambda_{i}"))

        return vit_block(g, x, prefix, lambda h: self.norm(g, weights, h, f"{prefix}.layernorm_before"),
                         lambda h: self.attention(g, weights, f"{prefix}.attention", h),
                         lambda h: self.norm(g, weights, h, f"{prefix}.layernorm_after"), mlp, scale)

    def pixel_shuffle(self, g: GraphBuilder, x: str) -> str:
        """[tiles, grid*grid, C] -> [tiles, (grid/2)^2, 4C], the same element order as transformers' pixel_shuffle."""
        n, c = self.args.grid, self.args.hidden_size
        half = int(n * self.args.downsample_ratio)
        x = g.reshape(x, [0, n, half, c * n // half], "pixel_shuffle/cols")
        x = g.op("Transpose", [x], name="pixel_shuffle/t1", perm=[0, 2, 1, 3])
        x = g.reshape(x, [0, half, half, c * (n // half) ** 2], "pixel_shuffle/rows")
        x = g.op("Transpose", [x], name="pixel_shuffle/t2", perm=[0, 2, 1, 3])
        return g.reshape(x, [0, half * half, c * (n // half) ** 2], "pixel_shuffle/out")

    def build(self, g: GraphBuilder, weights: ModelSource) -> None:
        a = self.args
        pixels = g.input("pixel_values", np.float32, ["tiles", 3, a.image_size, a.image_size])
        x = self.embeddings(g, weights, pixels)
        for i in range(a.num_hidden_layers):
            x = self.layer(g, weights, i, x)
        if not a.use_mean_pooling:
            x = self.norm(g, weights, x, "vision_tower.layernorm")
        x = g.op("Slice", [x, g.ints([1], "one_start"), g.ints([2 ** 31], "to_end"), g.ints([1], "axis1")],
                 name="drop_cls")
        x = self.pixel_shuffle(g, x)
        p = "multi_modal_projector"
        x = self.norm_projector(g, weights, x)
        x = layers.linear(g, weights, x, f"{p}.linear_1")
        x = layers.linear(g, weights, activation(g, x, a.projector_hidden_act, f"{p}.act"), f"{p}.linear_2")
        g.output("image_embeds", np.float32, ["tiles", a.tokens_per_tile, a.text_hidden_size], value=x)

    def norm_projector(self, g: GraphBuilder, weights: ModelSource, x: str) -> str:
        name = "multi_modal_projector.layer_norm"
        return g.layer_norm(x, weights.tensor(f"{name}.weight"), weights.tensor(f"{name}.bias"), 1e-5, name)
