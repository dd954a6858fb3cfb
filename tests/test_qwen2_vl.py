"""Qwen2-VL and Qwen2.5-VL against transformers: tiny random models (Qwen2.5-VL with window attention over several
windows), converted with their vision towers; smart resize and patches, M-RoPE positions, logits with two images,
greedy generation for an image and for a video, chat reuse and errors."""

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
    write_clip,
    write_tokenizer,
)
from helpers import QWEN_VL_MARKERS as MARKERS
from helpers import qwen_vl_text as hf_text

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 24  # at most 24 merged tokens (96 patches) per image
PREPROCESSOR = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255}
VERSIONS = {
    "2": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
          dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)),
    # windows of 56px = 4x4 patches, so the test images span several; block 1 attends over the whole image
    "2.5": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
            dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, window_size=56,
                 fullatt_block_indexes=[1], tokens_per_second=2)),
}


@pytest.fixture(scope="module", params=list(VERSIONS))
def qwen_vl(request, tmp_path_factory):
    """(transformers model, HF folder, f32 bundle, version)."""
    version = request.param
    folder = tmp_path_factory.mktemp("hf-qwen-vl")
    vocab = write_tokenizer(folder, MARKERS, QWEN_VL_TEMPLATE)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {name: tok.token_to_id(t) for name, t in zip(("vision_start", "vision_end", "image", "video"), MARKERS)}
    eos = tok.token_to_id("<|im_end|>")
    config_cls, model_cls, vision = VERSIONS[version]
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, eos_token_id=eos, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    config = getattr(transformers, config_cls)(
        text_config=text, vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], eos_token_id=eos)
    torch.manual_seed(11)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.25 if "visual" in name else 0.12)  # sharp logits: greedy text that varies
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    bundle = edgellm.convert(folder, tmp_path_factory.mktemp("b") / "qwen-vl-f32", quantize="f32", seq_length=320,
                             chunk_length=16, progress=False)
    return model, folder, bundle, version


def hf_inputs(model_hf, folder, messages, images, processor=None):
    return qwen_vl_inputs(model_hf, folder, messages, images, processor or hf_processor())


def hf_processor(**size):
    from transformers import Qwen2VLImageProcessorPil

    p = {**PREPROCESSOR, **size}
    return Qwen2VLImageProcessorPil(**{k: v for k, v in p.items() if k not in ("rescale_factor",)})


@pytest.mark.parametrize("size", [(56, 56), (150, 70), (60, 100), (300, 40), (33, 200), (224, 224), (20, 20)])
def test_patches_equal_the_hf_image_processor(qwen_vl, size):
    check_patches(edgellm.load(qwen_vl[2]), hf_processor(), picture(*size))


def test_text_only_logits_match_transformers(qwen_vl):
    model_hf, _, bundle, _ = qwen_vl
    ids = list(range(5, 60))
    with torch.no_grad():
        want = model_hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(edgellm.load(bundle).logits(ids), want, atol=1e-4 * max(1, np.abs(want).max()), rtol=0)


def test_two_image_prompt_ids_and_logits_match_transformers(qwen_vl):
    model_hf, folder, bundle, _ = qwen_vl
    images = [picture(150, 70, 1), picture(112, 168, 2)]  # 168px: three 56px windows down, two across
    ref = hf_inputs(model_hf, folder, TWO_IMAGES, images)
    model = edgellm.load(bundle)
    ids = model.prompt_ids(TWO_IMAGES, images=images)
    assert ids == ref["input_ids"][0].tolist()
    check_image_logits(model, model_hf, ref, TWO_IMAGES, images, picture(150, 70, 3))


def test_greedy_generation_with_an_image_matches_transformers(qwen_vl):
    model_hf, folder, bundle, _ = qwen_vl
    image = picture(168, 112, 4)
    check_image_greedy(model_hf, bundle, hf_inputs(model_hf, folder, IMAGE_QUESTION, [image]), image)


def test_video_prompt_matches_transformers_on_the_same_frames(qwen_vl, tmp_path):
    """20 frames at 10 fps, sampled at 2 fps: frames 0, 5, 10, 15, two temporal patches (Qwen2.5-VL spaces them
    by time: 2 tokens per second x 1 s per patch)."""
    import av

    model_hf, folder, bundle, version = qwen_vl
    clip = tmp_path / "clip.mkv"
    write_clip(clip)
    with av.open(str(clip)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    picked = [decoded[i] for i in (0, 5, 10, 15)]
    model = edgellm.load(bundle)
    s = model.vision.settings
    # transformers' image processor resizes and normalises each frame; pairs of frames fill the temporal patches
    per_frame = hf_processor(min_pixels=s.video_min_pixels, max_pixels=s.video_max_pixels)(
        picked, return_tensors="np")
    grid = per_frame["image_grid_thw"][0]
    patches = per_frame["pixel_values"].reshape(4, -1, 3, 2, 14, 14)[:, :, :, 0]  # each frame, one copy
    video = np.stack([patches[0::2], patches[1::2]], axis=3).reshape(2 * grid[1] * grid[2], -1)
    tokens = 2 * grid[1] * grid[2] // 4
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    tok, text = hf_text(folder, messages)
    ids = tok(text.replace("<|video_pad|>", "<|video_pad|>" * tokens), return_tensors="pt")["input_ids"]
    inputs = {"input_ids": ids, "pixel_values_videos": torch.from_numpy(video),
              "video_grid_thw": torch.tensor([[2, grid[1], grid[2]]]),
              "mm_token_type_ids": 2 * (ids == model_hf.config.video_token_id).int()}
    if version == "2.5":
        inputs["second_per_grid_ts"] = torch.tensor([1.0])
    with torch.no_grad():
        want = model_hf.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert model.prompt_ids(messages, videos=[clip]) == ids[0].tolist()
    result = model.generate(messages, videos=[clip], max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == want and result.images == 1
    assert len(model.prompt_ids(messages, videos=[clip], frames=2)) < len(ids[0])  # --frames caps the count


def test_chat_reuses_images_and_positions_across_turns(qwen_vl):
    check_chat_keeps_an_image(qwen_vl[2], picture(112, 112, 8))


def test_max_pixels_bounds_the_image_tokens(qwen_vl, tmp_path):
    _, folder, _, _ = qwen_vl
    small = edgellm.convert(folder, tmp_path / "small", quantize="f32", seq_length=128, max_pixels=56 * 56,
                            progress=False)
    model = edgellm.load(small)
    ids = model.prompt_ids("Describe.", images=[picture(300, 200)])
    assert ids.count(model.manifest.tokens.image_token_id) <= 4
    with pytest.raises(edgellm.EdgeLLMError, match="holds at most 128"):
        model.generate("Many.", images=[picture(200, 200, i) for i in range(40)], max_new_tokens=2)


def test_mrope_positions_follow_the_image_grid():
    from types import SimpleNamespace

    from edgellm.models.qwen2_vl.processing import mrope_positions as positions
    from edgellm.vision.media import Media

    s = SimpleNamespace(merge_size=2, tokens_per_second=2)
    image = Media("image", np.zeros(1), 6, 0, grid=(1, 4, 6))  # 2 x 3 merged tokens
    got = positions(10, [np.arange(2, 8)], [image], s)
    want = np.array([[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                     [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                     [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # a whole conversion and answer through the CLI
def test_cli_converts_with_a_pixel_budget_and_answers_about_images_and_video(qwen_vl, tmp_path, capsys):
    from edgellm.cli import main

    _, folder, _, version = qwen_vl
    out = tmp_path / "w4"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-q", "w4", "-g", "32", "-s", "256",
                 "--max-pixels", "112,112"]) == 0
    settings = edgellm.load(out).vision.settings
    assert settings.max_pixels == 112 * 112 and settings.version == version
    image, clip = tmp_path / "a.png", tmp_path / "clip.mkv"
    picture(200, 120).save(image)
    write_clip(clip)
    capsys.readouterr()
    assert main(["run", str(out), "-p", "Describe.", "-i", str(image), "--video", str(clip), "-n", "4"]) == 0
    assert "2 image(s) encoded" in capsys.readouterr().err
    assert main(["run", str(out), "-p", "Describe.", "-i", str(tmp_path / "missing.png")]) == 2
    assert main(["bench", str(out), "--prompt-lengths", "8", "--decode-tokens", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "1 image" in table and "4 images" in table and "video" in table
    with pytest.raises(SystemExit) as bad:
        main(["convert", "-m", str(folder), "-o", str(tmp_path / "x"), "--max-pixels", "0,5"])
    assert bad.value.code == 2 and "expected W,H or a pixel count" in capsys.readouterr().err
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "x"), "--max-pixels", "20,20"]) == 2
    assert "below one 28x28 merged patch" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_quantized_vision_graph_stays_close(qwen_vl, tmp_path):
    """w8 vision weights: the patch embedding's 1,176 inputs are not a whole number of 64-wide blocks."""
    model_hf, folder, _, _ = qwen_vl
    out = edgellm.convert(folder, tmp_path / "w8", quantize="w8", vision_quantize="w8", group_size=64,
                          seq_length=256, progress=False)
    model = edgellm.load(out)
    images = [picture(150, 70, 1), picture(112, 168, 2)]
    with torch.no_grad():
        want = model_hf(**hf_inputs(model_hf, folder, TWO_IMAGES, images)).logits[0].numpy()
    got = model.logits(TWO_IMAGES, images=images)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_static_vit_fixes_the_vision_graph_input_size(qwen_vl, tmp_path):
    """--static-vit --max-pixels 112,56: the vision graph takes exactly 8 x 4 patches, every image is resized to
    112x56, and the logits equal transformers' for the image resized so."""
    import onnx

    from edgellm.cli import main

    model_hf, folder, _, _ = qwen_vl
    out = tmp_path / "static"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-q", "f32", "-s", "256", "--max-pixels", "112,56",
                 "--static-vit"]) == 0
    graph = onnx.load(str(out / "vision.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["pixel_values"][0] == 32 and dims["patch_positions"] == [32, 2]
    model = edgellm.load(out)
    image = picture(60, 150, 5)  # portrait, yet resized to the fixed landscape size
    assert model.prompt_ids("Describe.", images=[image]).count(model.manifest.tokens.image_token_id) == 8
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    ref = hf_inputs(model_hf, folder, messages, [image.resize((112, 56), 3)])
    with torch.no_grad():
        want = model_hf(**ref).logits[0].numpy()
    assert np.abs(model.logits(messages, images=[image]) - want).max() <= 1e-4 * np.abs(want).max()


def test_images_on_openvino_match_the_cpu_device(qwen_vl):
    check_images_on_openvino(qwen_vl[2], TWO_IMAGES, [picture(150, 70, 1), picture(60, 100, 2)])


def test_an_int8_kv_cache_answers_about_images_like_the_float_one(qwen_vl, tmp_path):
    check_images_with_an_int8_cache(qwen_vl[1], qwen_vl[2], tmp_path, TWO_IMAGES,
                                    [picture(150, 70, 1), picture(60, 100, 2)])


def test_a_decoder_with_position_axes_serves_one_sequence_at_a_time(qwen_vl):
    """M-RoPE positions have rows of their own, so the decoder has no batch axis: the server's default is one slot,
    and asking for more is one clear error."""
    from edgellm.errors import EdgeLLMError

    assert len(edgellm.load(qwen_vl[2], slots=None).engine.slots) == 1
    with pytest.raises(EdgeLLMError, match="runs one sequence at a time"):
        edgellm.load(qwen_vl[2], slots=2)
