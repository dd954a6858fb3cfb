"""Random-weight Hugging Face folders with the shapes of real models, for speed and memory measurements without
downloads (the weights are noise, so the text is too; the timings are those of the real shapes).

    .venv/bin/python benchmarks/random_model.py qwen2.5-0.5b OUT_FOLDER [--gguf Q4_0]
    .venv/bin/python benchmarks/random_model.py internvl3-1b OUT_FOLDER
    .venv/bin/python benchmarks/random_model.py qwen2-vl-2b OUT_FOLDER
    .venv/bin/python benchmarks/random_model.py qwen3-vl-2b OUT_FOLDER
    .venv/bin/python benchmarks/random_model.py gemma3-1b OUT_FOLDER     (text only)
    .venv/bin/python benchmarks/random_model.py gemma3-4b OUT_FOLDER     (SigLIP + Gemma 3 4B: 8.6 GB)
    .venv/bin/python benchmarks/random_model.py qwen2.5-1.5b OUT_FOLDER  (written tensor by tensor: 3.1 GB)
    .venv/bin/python benchmarks/random_model.py qwen3-4b OUT_FOLDER      (8.0 GB)
    .venv/bin/python benchmarks/random_model.py llama3.1-8b OUT_FOLDER   (16.1 GB)

Needs the test dependencies (torch, transformers). The tokenizer is the small one of the tests, so prompts are
made of random ids rather than text. The last three are written with numpy one tensor at a time in bf16 (a
transformers model of 8B parameters would need 32 GB to build), for the conversion's memory and the larger
shapes' speed; --gguf reads the folder back with transformers, so it is for the shapes up to 1.5B.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_gemma3_vl import GEMMA_TEMPLATE  # noqa: E402
from test_gemma3_vl import MARKERS as GEMMA_MARKERS  # noqa: E402
from test_internvl import INTERNVL_TEMPLATE  # noqa: E402

from helpers import QWEN_VL_MARKERS as MARKERS  # noqa: E402
from helpers import QWEN_VL_TEMPLATE, write_random_bf16, write_tokenizer  # noqa: E402

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0)
QWEN2_VL_2B_TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
QWEN2_VL_VIT = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VL_2B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                        rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "rope_theta": 5e6,
                                         "mrope_interleaved": True})
QWEN3_VL_VIT = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17])
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
GEMMA3_1B = dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                 query_pre_attn_scalar=256, max_position_embeddings=32768, rope_parameters=GEMMA3_ROPE)
GEMMA3_4B = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                 query_pre_attn_scalar=256, max_position_embeddings=131072, rope_parameters=GEMMA3_ROPE)
SIGLIP_400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=896, patch_size=14, vision_use_head=False)
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=[448, 448], patch_size=[14, 14], attention_bias=True)


def qwen(out: Path) -> None:
    write_tokenizer(out)
    config = transformers.Qwen2Config(**QWEN25_05B, eos_token_id=2)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def internvl(out: Path) -> None:
    write_tokenizer(out, ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), INTERNVL_TEMPLATE)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text = transformers.Qwen2Config(**QWEN25_05B, eos_token_id=ids["<|im_end|>"])
    config = transformers.InternVLConfig(text_config=text.to_dict(),
                                         vision_config=transformers.InternVLVisionConfig(**INTERNVIT_300M).to_dict(),
                                         image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=256)
    transformers.InternVLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_to_patches": True, "min_patches": 1, "max_patches": 12, "size": {"height": 448, "width": 448},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))


def qwen_vl(out: Path, version: str) -> None:
    """Qwen2-VL-2B or Qwen3-VL-2B: the same tokens and layout, other configs."""
    write_tokenizer(out, MARKERS, QWEN_VL_TEMPLATE)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    text, vit, names = {"2": (QWEN2_VL_2B_TEXT, QWEN2_VL_VIT, "Qwen2VL"),
                        "3": (QWEN3_VL_2B_TEXT, QWEN3_VL_VIT, "Qwen3VL")}[version]
    config = getattr(transformers, f"{names}Config")(
        text_config={**text, "eos_token_id": ids["<|im_end|>"]}, vision_config=vit,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly, half the memory of float32
    getattr(transformers, f"{names}ForConditionalGeneration")(config).save_pretrained(out)
    factor = {"2": 28, "3": 32}[version]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 4 * factor * factor, "max_pixels": 16384 * factor * factor, "patch_size": factor // 2,
        "merge_size": 2, "temporal_patch_size": 2, **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
                                                      if version == "3" else {})}))


def gemma3_1b(out: Path) -> None:
    write_tokenizer(out)
    config = transformers.Gemma3TextConfig(**GEMMA3_1B, eos_token_id=2)
    transformers.Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def gemma3_4b(out: Path) -> None:
    write_tokenizer(out, GEMMA_MARKERS, GEMMA_TEMPLATE)
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = transformers.Gemma3Config(
        text_config={**GEMMA3_4B, "eos_token_id": ids["<end_of_turn>"]}, vision_config=SIGLIP_400M,
        mm_tokens_per_image=256, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"])
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 8.6 GB rather than 17 GB in float32
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 896, "width": 896}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))


# Llama-shaped decoders written tensor by tensor (the config as transformers writes it, less what it defaults)
STREAMED = {
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
                         rms_norm_eps=1e-6),
    "qwen3-4b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2560,
                     intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000.0,
                     rms_norm_eps=1e-6),
    "llama3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        rope_theta=500000.0),
}


def streamed(out: Path, config: dict) -> None:
    """A bf16 safetensors checkpoint of noise, written one tensor at a time."""
    write_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**config, "eos_token_id": 2, "torch_dtype": "bfloat16"}, indent=2))
    h, inter, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_key_value_heads"))
    d = config.get("head_dim", h // heads)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.self_attn.q_proj.weight": (heads * d, h), f"{p}.self_attn.k_proj.weight": (kv * d, h),
                       f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.o_proj.weight": (h, heads * d),
                       f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
                       f"{p}.mlp.down_proj.weight": (h, inter)})
        if config["model_type"] == "qwen2":
            shapes.update({f"{p}.self_attn.{x}_proj.bias": (n * d,) for x, n in (("q", heads), ("k", kv), ("v", kv))})
        if config["model_type"] == "qwen3":
            shapes.update({f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)})
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    write_random_bf16(out / "model.safetensors", shapes)


def write_gguf_beside(folder: Path, qtype: str) -> Path:
    """The folder's model as a GGUF (2-D weights in `qtype`), laid out like llama.cpp's converter does, so that
    llama.cpp and edgellm can run the same blocks."""
    import gguf
    from test_gguf import write_gguf

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = folder.with_name(f"{folder.name}-{qtype.lower()}.gguf")
    write_gguf(model, folder, path, model.config.model_type, gguf.GGMLQuantizationType[qtype])
    return path


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("shape", choices=["qwen2.5-0.5b", "internvl3-1b", "qwen2-vl-2b", "qwen3-vl-2b", "gemma3-1b",
                                        "gemma3-4b", *STREAMED])
    args.add_argument("folder", type=Path)
    args.add_argument("--gguf", metavar="TYPE", choices=["Q4_0", "Q4_1", "Q8_0"],
                      help="also write FOLDER-type.gguf beside it (text models), for llama.cpp in compare.py")
    args = args.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    {"qwen2.5-0.5b": qwen, "internvl3-1b": internvl, "qwen2-vl-2b": lambda out: qwen_vl(out, "2"),
     "qwen3-vl-2b": lambda out: qwen_vl(out, "3"),
     "gemma3-1b": gemma3_1b, "gemma3-4b": gemma3_4b,
     **{name: lambda out, config=config: streamed(out, config) for name, config in STREAMED.items()}}[args.shape](
        args.folder)
    print(f"wrote {args.folder}")
    if args.gguf:
        print(f"wrote {write_gguf_beside(args.folder, args.gguf)}")
