"""Qwen3-VL against transformers: a tiny random model with DeepStack mergers after ViT blocks 0 and 1, a learned
position table resampled to each grid, and interleaved M-RoPE in a Qwen3 decoder. Patches, position taps, image
features, prompt ids, two-image logits, greedy generation with an image, chat reuse and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import edgellm
from helpers import (
    IMAGE_QUESTION,
    QWEN_VL_TEMPLATE,
    TWO_IMAGES,
    check_chat_keeps_an_image,
    check_image_greedy,
    check_image_logits,
    check_images_on_openvino,
    check_images_with_an_int8_cache,
    check_patches,
    picture,
    qwen_vl_inputs,
    write_tokenizer,
)
from helpers import QWEN_VL_MARKERS as MARKERS
from helpers import qwen_vl_text as hf_text

PREPROCESSOR = {"min_pixels": 32 * 32, "max_pixels": 32 * 32 * 24, "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
                "rescale_factor": 1 / 255}


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory):
    """(transformers model, HF folder, f32 bundle)."""
    folder = tmp_path_factory.mktemp("hf-qwen3-vl")
    vocab = write_tokenizer(folder, MARKERS, QWEN_VL_TEMPLATE)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {name: tok.token_to_id(t) for name, t in zip(("vision_start", "vision_end", "image", "video"), MARKERS)}
    eos = tok.token_to_id("<|im_end|>")
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=eos,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                 "mrope_interleaved": True})
    # a 4x4 position table, resampled to grids of other sizes; DeepStack features from blocks 0 and 1
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    config = transformers.Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], eos_token_id=eos)
    torch.manual_seed(17)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.25 if "visual" in name else 0.12)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    bundle = edgellm.convert(folder, tmp_path_factory.mktemp("b") / "qwen3-vl-f32", quantize="f32", seq_length=320,
                             chunk_length=16, progress=False)
    return model, folder, bundle


def hf_processor(**size):
    from transformers import Qwen2VLImageProcessorPil  # Qwen3-VL's image processor, with 16px patches

    return Qwen2VLImageProcessorPil(**{**{k: v for k, v in PREPROCESSOR.items() if k != "rescale_factor"}, **size})


def hf_inputs(model_hf, folder, messages, images):
    return qwen_vl_inputs(model_hf, folder, messages, images, hf_processor())


@pytest.mark.parametrize("size", [(64, 64), (150, 70), (33, 200), (224, 224)])
def test_patches_equal_the_hf_image_processor(qwen3_vl, size):
    check_patches(edgellm.load(qwen3_vl[2]), hf_processor(), picture(*size))


@pytest.mark.parametrize("grid", [(1, 4, 10), (1, 10, 8), (1, 2, 2), (2, 4, 4)])
def test_position_taps_equal_transformers(grid):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from edgellm.models.qwen3_vl.processing import patch_positions, position_taps

    want_i, want_w = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), num_grid_per_side=4, mode="bilinear", align_corners=True, spatial_merge_size=2)
    _, h, w = grid
    got_i, got_w = position_taps(patch_positions(h, w, 2), h, w, 4)
    per_slice = h * w
    np.testing.assert_array_equal(got_i, want_i[:per_slice].numpy())
    np.testing.assert_allclose(got_w, want_w[:per_slice].numpy(), atol=1e-7)


def test_image_features_and_deepstack_match_transformers(qwen3_vl):
    model_hf, _, bundle = qwen3_vl
    model = edgellm.load(bundle)
    images = [picture(150, 70, 1), picture(112, 168, 2)]
    px = hf_processor()(images, return_tensors="pt")
    with torch.no_grad():
        out = model_hf.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
    want = [torch.cat(list(out.pooler_output)).numpy()] + [torch.cat(list(d)).numpy() for d in out.deepstack_features]
    features = [model.vision.features(model.vision.image(i)) for i in images]  # DeepStack rows: [tokens, K, hidden]
    got = np.concatenate([np.concatenate([f["image_embeds"], f["deepstack_embeds"].reshape(len(f["image_embeds"]), -1)],
                                         axis=1) for f in features])
    for k, w in enumerate(want):  # image embeddings, then one block per DeepStack merger
        np.testing.assert_allclose(got[:, 64 * k:64 * (k + 1)], w, atol=1e-5 * np.abs(w).max(), rtol=0)


def test_text_only_logits_match_transformers(qwen3_vl):
    model_hf, _, bundle = qwen3_vl
    ids = list(range(5, 60))
    with torch.no_grad():
        want = model_hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(edgellm.load(bundle).logits(ids), want, atol=1e-4 * max(1, np.abs(want).max()), rtol=0)


def test_two_image_prompt_ids_and_logits_match_transformers(qwen3_vl):
    model_hf, folder, bundle = qwen3_vl
    images = [picture(150, 70, 1), picture(112, 168, 2)]
    ref = hf_inputs(model_hf, folder, TWO_IMAGES, images)
    model = edgellm.load(bundle)
    assert model.prompt_ids(TWO_IMAGES, images=images) == ref["input_ids"][0].tolist()
    check_image_logits(model, model_hf, ref, TWO_IMAGES, images, picture(150, 70, 3))


def test_greedy_generation_with_an_image_matches_transformers(qwen3_vl):
    model_hf, folder, bundle = qwen3_vl
    image = picture(168, 112, 4)
    check_image_greedy(model_hf, bundle, hf_inputs(model_hf, folder, IMAGE_QUESTION, [image]), image)


def test_chat_reuses_images_across_turns(qwen3_vl):
    check_chat_keeps_an_image(qwen3_vl[2], picture(112, 112, 8))


@pytest.mark.slow  # a whole conversion and answer through the CLI
def test_cli_converts_quantized_and_answers_about_an_image(qwen3_vl, tmp_path, capsys):
    from edgellm.cli import main

    model_hf, folder, _ = qwen3_vl
    out = tmp_path / "w8"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-q", "w8", "-g", "32", "-s", "256",
                 "--vision-quantize", "w8"]) == 0
    image = tmp_path / "a.png"
    picture(200, 120).save(image)
    capsys.readouterr()
    assert main(["run", str(out), "-p", "Describe.", "-i", str(image), "-n", "4"]) == 0
    assert "1 image(s) encoded" in capsys.readouterr().err
    assert main(["bench", str(out), "--prompt-lengths", "8", "--decode-tokens", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "1 image" in table and "4 images" in table and "video" in table
    model = edgellm.load(out)
    images = [picture(150, 70, 1), picture(112, 168, 2)]
    ref = hf_inputs(model_hf, folder, TWO_IMAGES, images)
    with torch.no_grad():
        want = model_hf(**ref).logits[0].numpy()
    assert np.abs(model.logits(TWO_IMAGES, images=images) - want).max() <= 0.05 * np.abs(want).max()


def test_video_prompt_matches_transformers_on_the_same_frames(qwen3_vl, tmp_path):
    """20 frames at 10 fps, sampled at 2 fps: frames 0, 6, 13, 19 (evenly spread), two temporal patches written
    as "<0.3 seconds>" and "<1.6 seconds>" blocks, each placed like an image."""
    import av

    from helpers import write_clip

    model_hf, folder, bundle = qwen3_vl
    clip = tmp_path / "clip.mkv"
    write_clip(clip)
    with av.open(str(clip)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    picked = [decoded[i] for i in (0, 6, 13, 19)]
    model = edgellm.load(bundle)
    s = model.vision.settings
    per_frame = hf_processor(min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels)(picked, return_tensors="np")
    grid = per_frame["image_grid_thw"][0]
    patches = per_frame["pixel_values"].reshape(4, -1, 3, 2, 16, 16)[:, :, :, 0]  # each frame, one copy
    video = np.stack([patches[0::2], patches[1::2]], axis=3).reshape(2 * grid[1] * grid[2], -1)
    per = grid[1] * grid[2] // 4
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    tok, text = hf_text(folder, messages)
    stamps = transformers.Qwen3VLProcessor._calculate_timestamps(None, [0, 6, 13, 19], 10.0, 2)
    blocks = "".join(f"<{t:.1f} seconds><|vision_start|>{'<|video_pad|>' * per}<|vision_end|>" for t in stamps)
    ids = tok(text.replace("<|video_pad|>", blocks), return_tensors="pt")["input_ids"]
    inputs = {"input_ids": ids, "pixel_values_videos": torch.from_numpy(video),
              "video_grid_thw": torch.tensor([[2, grid[1], grid[2]]]),
              "mm_token_type_ids": 2 * (ids == model_hf.config.video_token_id).int()}
    with torch.no_grad():
        want = model_hf.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert [round(t, 2) for t in stamps] == [0.3, 1.6]
    assert model.prompt_ids(messages, videos=[clip]) == ids[0].tolist()
    result = model.generate(messages, videos=[clip], max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == want and result.images == 1


def test_images_on_openvino_match_the_cpu_device(qwen3_vl):
    check_images_on_openvino(qwen3_vl[2], TWO_IMAGES, [picture(150, 70, 1), picture(60, 100, 2)])


def test_an_int8_kv_cache_answers_about_images_like_the_float_one(qwen3_vl, tmp_path):
    check_images_with_an_int8_cache(qwen3_vl[1], qwen3_vl[2], tmp_path, TWO_IMAGES,
                                    [picture(150, 70, 1), picture(60, 100, 2)])
