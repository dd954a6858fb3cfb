"""Gemma 3 VLM against transformers: a tiny random Gemma3ForConditionalGeneration (SigLIP tower, 4x4-pooled 16
soft tokens per image, an 8-token sliding window shorter than an image block, 16-token prefill chunks that image
blocks straddle). Preprocessing, prompt ids, two-image logits with the bidirectional image mask, greedy
generation for an image and for a clip (its frames as images), chat reuse, the CLI and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import edgellm
from helpers import (
    IMAGE_QUESTION,
    TWO_IMAGES,
    check_chat_keeps_an_image,
    check_image_greedy,
    check_image_logits,
    check_images_on_openvino,
    check_images_with_an_int8_cache,
    picture,
    write_clip,
    write_tokenizer,
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MARKERS = ("<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
SIZE, TOKENS = 56, 16  # 8x8 patches of 7px pooled 2x2 into 16 soft tokens
PREPROCESSOR = {"size": {"height": SIZE, "width": SIZE}, "resample": 2, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "do_pan_and_scan": False}
BLOCK = f"\n\n<start_of_image>{'<image_soft_token>' * TOKENS}<end_of_image>\n\n"


@pytest.fixture(scope="module")
def gemma_vl(tmp_path_factory):
    """(transformers model, HF folder, f32 bundle)."""
    folder = tmp_path_factory.mktemp("hf-gemma3-vl")
    vocab = write_tokenizer(folder, MARKERS, GEMMA_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<bos>",
                                                              "eos_token": "<end_of_turn>"}))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in MARKERS}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                bos_token_id=ids["<bos>"], eos_token_id=ids["<end_of_turn>"], pad_token_id=0,
                tie_word_embeddings=False)  # tied random embeddings make greedy text repeat one token
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                  patch_size=7, vision_use_head=False)
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        eos_token_id=ids["<end_of_turn>"], tie_word_embeddings=False)
    torch.manual_seed(13)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma norms scale by 1 + w; SigLIP's LayerNorms by w (+ bias)
                p.normal_(0, 0.3) if "language_model" in name or "soft_emb" in name or not name.endswith(
                    "weight") else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.25 if "vision" in name or "projector" in name else 0.12)
    model.generation_config.eos_token_id = ids["<end_of_turn>"]
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    bundle = edgellm.convert(folder, tmp_path_factory.mktemp("b") / "gemma3-vl-f32", quantize="f32", seq_length=320,
                             chunk_length=16, progress=False)
    return model, folder, bundle


def hf_inputs(model_hf, folder, messages, images):
    """What Gemma3Processor produces (built by hand: the processor class wants a Gemma tokenizer)."""
    from transformers import Gemma3ImageProcessorPil, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<bos>")
    tok.chat_template = GEMMA_TEMPLATE
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text.replace("<start_of_image>", BLOCK), return_tensors="pt", add_special_tokens=False)["input_ids"]
    pixels = Gemma3ImageProcessorPil(**PREPROCESSOR)(images, return_tensors="pt")["pixel_values"]
    return {"input_ids": ids, "pixel_values": pixels, "token_type_ids": (ids == model_hf.config.image_token_id).long()}


@pytest.mark.parametrize("size", [(56, 56), (150, 70), (60, 100), (300, 40), (20, 20)])
def test_pixels_equal_the_hf_image_processor(gemma_vl, size):
    from transformers import Gemma3ImageProcessorPil

    model = edgellm.load(gemma_vl[2])
    image = picture(*size)
    ref = Gemma3ImageProcessorPil(**PREPROCESSOR)([image], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(model.vision.image(image).pixel_values, ref, atol=1e-5, rtol=0)


def test_image_embeddings_match_transformers(gemma_vl):
    model_hf, folder, bundle = gemma_vl
    model = edgellm.load(bundle)
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    pixels = hf_inputs(model_hf, folder, TWO_IMAGES, images)["pixel_values"]
    with torch.no_grad():
        want = model_hf.get_image_features(pixels).pooler_output.numpy()
    got = np.stack([model.vision.features(model.vision.image(i))["image_embeds"] for i in images])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_two_image_prompt_ids_and_logits_match_transformers(gemma_vl):
    """The image blocks straddle 16-token chunks and are longer than the 8-token window: the mask is the model's
    (a causal-only decoder gives other logits, checked too)."""
    model_hf, folder, bundle = gemma_vl
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    ref = hf_inputs(model_hf, folder, TWO_IMAGES, images)
    model = edgellm.load(bundle)
    assert model.prompt_ids(TWO_IMAGES, images=images) == ref["input_ids"][0].tolist()
    check_image_logits(model, model_hf, ref, TWO_IMAGES, images, picture(150, 70, 3))
    with torch.no_grad():
        causal = model_hf(**{k: v for k, v in ref.items() if k != "token_type_ids"}).logits[0].numpy()
    assert np.abs(model.logits(TWO_IMAGES, images=images) - causal).max() > 1e-2


def test_image_blocks_are_whole_within_a_chunk():
    from edgellm.models.gemma3_vl.processing import image_blocks

    got = image_blocks([np.arange(2, 5), np.arange(5, 7), np.arange(9, 10)], 11)
    np.testing.assert_array_equal(got, [-1, -1, 0, 0, 0, 0, 0, -1, -1, 1, -1])  # adjacent runs merge, as in HF


def test_greedy_generation_with_an_image_matches_transformers(gemma_vl):
    model_hf, folder, bundle = gemma_vl
    image = picture(168, 112, 4)
    check_image_greedy(model_hf, bundle, hf_inputs(model_hf, folder, IMAGE_QUESTION, [image]), image)


def test_video_goes_in_as_its_frames(gemma_vl, tmp_path):
    """Gemma 3 reads no video: 4 frames at segment midpoints (of 20) are given as 4 images, as transformers would
    be given them."""
    import av

    model_hf, folder, bundle = gemma_vl
    clip = tmp_path / "clip.mkv"
    write_clip(clip)
    with av.open(str(clip)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    frames = [decoded[i] for i in (2, 7, 12, 16)]
    as_images = [{"role": "user", "content": [*[{"type": "image"}] * 4, {"type": "text", "text": "What happens?"}]}]
    ref = hf_inputs(model_hf, folder, as_images, frames)
    with torch.no_grad():
        want = model_hf.generate(**ref, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, ref["input_ids"].shape[1]:].tolist()
    model = edgellm.load(bundle)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert model.prompt_ids(messages, videos=[clip], frames=4) == ref["input_ids"][0].tolist()
    result = model.generate(messages, videos=[clip], frames=4, max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == want and result.images == 1


def test_chat_reuses_images_across_turns(gemma_vl):
    check_chat_keeps_an_image(gemma_vl[2], picture(112, 112, 8))


@pytest.mark.slow  # a whole conversion and answer through the CLI
def test_cli_converts_quantized_and_answers_about_images_and_video(gemma_vl, tmp_path, capsys):
    from edgellm.cli import main

    model_hf, folder, _ = gemma_vl
    out = tmp_path / "w8"
    assert main(["convert", "-m", str(folder), "-o", str(out), "-q", "w8", "-g", "32", "-s", "128",
                 "--vision-quantize", "w8"]) == 0
    image, clip = tmp_path / "a.png", tmp_path / "clip.mkv"
    picture(200, 120).save(image)
    write_clip(clip)
    capsys.readouterr()
    assert main(["run", str(out), "-p", "Describe.", "-i", str(image), "--video", str(clip), "--frames", "2",
                 "-n", "4"]) == 0
    assert "2 image(s) encoded" in capsys.readouterr().err
    assert main(["bench", str(out), "--prompt-lengths", "8", "--decode-tokens", "2", "--repeats", "1"]) == 0
    table = capsys.readouterr().out  # 8 frames of 16 tokens do not fit 128 positions: that row says so
    assert "1 image" in table and "4 images" in table and "holds at most 128" in table.split("video")[1]
    model = edgellm.load(out)
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    with torch.no_grad():
        want = model_hf(**hf_inputs(model_hf, folder, TWO_IMAGES, images)).logits[0].numpy()
    assert np.abs(model.logits(TWO_IMAGES, images=images) - want).max() <= 0.05 * np.abs(want).max()
    with pytest.raises(edgellm.EdgeLLMError, match="holds at most 128"):
        model.generate("Many.", images=[picture(40, 40, i) for i in range(8)], max_new_tokens=2)
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "x"), "--max-pixels", "100,100"]) == 2
    assert "does not apply to Gemma 3" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["convert", "-m", str(folder), "-o", str(tmp_path / "x"), "--static-vit"]) == 2
    assert "--static-vit applies to Qwen2-VL" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_images_on_openvino_match_the_cpu_device(gemma_vl):
    check_images_on_openvino(gemma_vl[2], TWO_IMAGES, [picture(150, 70, 1), picture(60, 100, 2)])


def test_an_int8_kv_cache_answers_about_images_like_the_float_one(gemma_vl, tmp_path):
    check_images_with_an_int8_cache(gemma_vl[1], gemma_vl[2], tmp_path, TWO_IMAGES,
                                    [picture(150, 70, 1), picture(60, 100, 2)])
