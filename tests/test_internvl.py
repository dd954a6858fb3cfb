"""InternVL against transformers: a tiny random InternVLForConditionalGeneration (Qwen2 decoder), converted with its
vision tower; tiling, prompt expansion, logits with two images, greedy generation, errors and multi-turn reuse."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

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

INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
TILE, PER_TILE = 56, 4  # 56px tiles of 14px patches: a 4x4 grid, pixel-shuffled to 2x2 = 4 tokens per tile
PREPROCESSOR = {"crop_to_patches": True, "min_patches": 1, "max_patches": 6, "size": {"height": TILE, "width": TILE},
                "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
                "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True,
                "do_convert_rgb": True}


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """(transformers model, HF folder, f32 bundle)."""
    folder = tmp_path_factory.mktemp("hf-internvl")
    vocab = write_tokenizer(folder, ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), INTERNVL_TEMPLATE)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    text = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, eos_token_id=eos,
                                    initializer_range=0.08)
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=[TILE, TILE], patch_size=[14, 14],
                                               use_qk_norm=True, attention_bias=True, initializer_range=0.08)
    config = transformers.InternVLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         image_token_id=tok.token_to_id("<IMG_CONTEXT>"), image_seq_length=PER_TILE,
                                         initializer_range=0.08)
    torch.manual_seed(7)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero-initialised tables and unit scales would hide a dropped term
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif any(k in name for k in ("lambda", "position_embeddings", "cls_token", "bias")):
                p.normal_(0, 0.5)
            elif "language_model" in name:
                p.mul_(3)  # sharper logits: greedy text that varies, so a wrong position or cache would show
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    bundle = edgellm.convert(folder, tmp_path_factory.mktemp("b") / "internvl-f32", quantize="f32", seq_length=256,
                             chunk_length=16, progress=False)
    return model, folder, bundle


def hf_image_processor():
    from transformers import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(**PREPROCESSOR)


def hf_inputs(folder, messages, images):
    """What InternVLProcessor produces (built by hand: its video processor needs torchvision)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok.chat_template = INTERNVL_TEMPLATE
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pixels = hf_image_processor()(images, return_tensors="pt")
    for n in pixels["num_patches"]:
        text = text.replace("<IMG_CONTEXT>", "<img>" + "\0" * (PER_TILE * int(n)) + "</img>", 1)
    ids = tok(text.replace("\0", "<IMG_CONTEXT>"), return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "pixel_values": pixels["pixel_values"]}


@pytest.mark.parametrize("size", [(56, 56), (150, 70), (60, 100), (300, 40), (33, 200), (224, 224)])
def test_tiles_equal_the_hf_image_processor(internvl, size):
    from edgellm.models.internvl import processing as tiling

    settings = edgellm.load(internvl[2]).vision.settings
    image = picture(*size)
    ours = tiling.tiles(image, settings)
    ref = hf_image_processor()([image], return_tensors="np")
    assert ours.shape == ref["pixel_values"].shape and ours.shape[0] == ref["num_patches"][0]
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5, rtol=0)


def test_transparent_and_grey_images_become_rgb_like_hf(internvl):
    from edgellm.models.internvl import processing as tiling
    from edgellm.vision import load_image

    settings = edgellm.load(internvl[2]).vision.settings
    rgba = picture(90, 60).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(90, dtype=np.uint8) * 2, (60, 1))))
    for image in (rgba, picture(70, 70).convert("L")):
        ref = hf_image_processor()([image], return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(tiling.tiles(load_image(image), settings), ref, atol=1e-5, rtol=0)


def test_two_image_prompt_ids_and_logits_match_transformers(internvl):
    model_hf, folder, bundle = internvl
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    ref = hf_inputs(folder, TWO_IMAGES, images)
    model = edgellm.load(bundle)
    ids = model.prompt_ids(TWO_IMAGES, images=images)
    assert ids == ref["input_ids"][0].tolist()
    tiles = ref["pixel_values"].shape[0]
    assert tiles > 4 and ids.count(model.manifest.tokens.image_token_id) == PER_TILE * tiles  # tiles+thumbnails
    check_image_logits(model, model_hf, ref, TWO_IMAGES, images, picture(150, 70, 3))


def test_greedy_generation_with_an_image_matches_transformers(internvl):
    model_hf, folder, bundle = internvl
    image = picture(120, 80, 4)
    check_image_greedy(model_hf, bundle, hf_inputs(folder, IMAGE_QUESTION, [image]), image)


def test_images_as_path_bytes_and_pil_give_the_same_prompt(internvl, tmp_path):
    model = edgellm.load(internvl[2])
    image = picture(100, 60, 5)
    path = tmp_path / "a.png"
    image.save(path)
    as_pil = model.logits("Describe.", images=[image])
    np.testing.assert_array_equal(model.logits("Describe.", images=[str(path)]), as_pil)
    np.testing.assert_array_equal(model.logits("Describe.", images=[path.read_bytes()]), as_pil)


def test_chat_encodes_an_image_once_and_reuses_the_cache(internvl):
    model = edgellm.load(internvl[2])
    image = picture(80, 80, 6)
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look."}]}]
    r1 = model.generate(first, images=[image], max_new_tokens=4)
    assert r1.vision_s > 0 and r1.reused_tokens == 0
    second = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And now?"}]
    r2 = model.generate(second, images=[image], max_new_tokens=4)
    assert r2.vision_s == 0  # neither encoded again nor prefilled again: the KV cache holds it
    assert r2.reused_tokens >= r1.prompt_tokens - 1
    # the same conversation with another image must not reuse the cached image positions
    r3 = model.generate(second, images=[picture(80, 80, 7)], max_new_tokens=4)
    assert r3.vision_s > 0 and r3.reused_tokens < r1.prompt_tokens - 1
    # and the answer after reuse equals a fresh run
    fresh = edgellm.load(internvl[2]).generate(second, images=[image], max_new_tokens=4)
    assert fresh.token_ids == r2.token_ids


def test_bad_images_and_mismatched_parts_are_clear_errors(internvl, tmp_path):
    model = edgellm.load(internvl[2])
    (tmp_path / "not.png").write_text("this is text")
    good = picture(60, 60)
    buffer = io.BytesIO()
    good.save(buffer, format="PNG")
    cases = {
        "no such image file": [tmp_path / "missing.png"],
        "not a readable image": [tmp_path / "not.png"],
        "not a readable image ": [buffer.getvalue()[:40]],  # truncated PNG
        "zero size": [Image.new("RGB", (0, 0))],
        "must be a path, bytes or a PIL image": [12],
    }
    for message, images in cases.items():
        with pytest.raises(edgellm.EdgeLLMError, match=message.strip()):
            model.generate("Describe.", images=images, max_new_tokens=2)
    with pytest.raises(edgellm.EdgeLLMError, match="1 image and 0 video part"):
        model.generate([{"role": "user", "content": [{"type": "image"}]}], images=[good, good])
    with pytest.raises(edgellm.EdgeLLMError, match="content part"):
        model.generate([{"role": "user", "content": [{"type": "picture"}]}])
    with pytest.raises(edgellm.EdgeLLMError, match="holds at most 256"):
        model.generate("Many.", images=[picture(300, 60, i) for i in range(12)], max_new_tokens=2)


def test_text_bundle_refuses_images(bundle):
    model = edgellm.load(bundle("qwen2"))
    with pytest.raises(edgellm.EdgeLLMError, match="no vision graph"):
        model.generate("Describe.", images=[picture(60, 60)])


def test_w8_bundle_with_f16_vision_stays_close(internvl, tmp_path):
    model_hf, folder, _ = internvl
    out = edgellm.convert(folder, tmp_path / "w8", quantize="w8", group_size=32, seq_length=128, progress=False)
    model = edgellm.load(out)
    assert model.manifest.vision.quantization == "f16"  # the default for the vision graph
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    with torch.no_grad():
        want = model_hf(**hf_inputs(folder, TWO_IMAGES, images)).logits[0].numpy()
    got = model.logits(TWO_IMAGES, images=images)
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_video_prompt_matches_transformers_on_the_same_frames(internvl, tmp_path):
    import av

    model_hf, folder, bundle = internvl
    clip = tmp_path / "clip.mkv"
    write_clip(clip)
    with av.open(str(clip)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    assert len(decoded) == 20
    segment = 19 / 8  # InternVL's loader: 8 segments over frames 0..19, the middle of each
    picked = [decoded[int(segment / 2 + round(segment * i))] for i in range(8)]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    from transformers import GotOcr2ImageProcessorPil, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok.chat_template = INTERNVL_TEMPLATE
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    frames = "\n".join(f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * PER_TILE + "</img>" for i in range(8))
    ids = tok(text.replace("<video>", frames), return_tensors="pt")["input_ids"]
    pixels = GotOcr2ImageProcessorPil(**{**PREPROCESSOR, "crop_to_patches": False})(picked, return_tensors="pt")
    with torch.no_grad():
        want = model_hf.generate(input_ids=ids, pixel_values=pixels["pixel_values"], max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    model = edgellm.load(bundle)
    assert model.prompt_ids(messages, videos=[clip]) == ids[0].tolist()
    result = model.generate(messages, videos=[clip], max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == want and result.images == 1
    assert len(model.prompt_ids(messages, videos=[clip], frames=4)) < len(ids[0])  # --frames changes the count


def test_unreadable_video_is_a_clear_error(internvl, tmp_path):
    model = edgellm.load(internvl[2])
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    for path, message in [(tmp_path / "bad.mp4", "not a readable video"), (tmp_path / "none.mp4", "no such video")]:
        with pytest.raises(edgellm.EdgeLLMError, match=message):
            model.generate(messages, videos=[path], max_new_tokens=2)


def original_layout_name(name: str) -> str:
    """transformers' InternVL names -> the original remote-code checkpoint's (InternVLChatModel)."""
    for hf, original in [("model.vision_tower.", "vision_model."), ("encoder.layer.", "encoder.layers."),
                         ("embeddings.cls_token", "embeddings.class_embedding"),
                         ("embeddings.position_embeddings", "embeddings.position_embedding"),
                         ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
                         ("attention.projection_layer", "attn.proj"), ("attention.q_norm", "attn.q_norm"),
                         ("attention.k_norm", "attn.k_norm"), ("lambda_1", "ls1"), ("lambda_2", "ls2"),
                         ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                         ("model.multi_modal_projector.layer_norm", "mlp1.0"),
                         ("model.multi_modal_projector.linear_1", "mlp1.1"),
                         ("model.multi_modal_projector.linear_2", "mlp1.3"),
                         ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]:
        name = name.replace(hf, original)
    return name


def test_original_remote_code_layout_converts_to_the_same_model(internvl, tmp_path):
    from safetensors.numpy import save_file

    model_hf, folder, bundle = internvl
    state = {k: v.numpy() for k, v in model_hf.state_dict().items()}
    out = {}
    for name, value in state.items():
        if ".attention.k_proj." in name or ".attention.v_proj." in name:
            continue
        if ".attention.q_proj." in name:  # the original checkpoint keeps one fused qkv projection
            value = np.concatenate([state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            name = name.replace("attention.q_proj", "attn.qkv")
        out[original_layout_name(name)] = np.ascontiguousarray(value)
    original = tmp_path / "original"
    original.mkdir()
    save_file(out, str(original / "model.safetensors"))
    cfg = model_hf.config
    text = {**cfg.text_config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    v = cfg.vision_config
    (original / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": text,
        "downsample_ratio": 0.5, "force_image_size": TILE, "select_layer": -1, "ps_version": "v2",
        "vision_config": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                          "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                          "image_size": TILE, "patch_size": 14, "qkv_bias": True, "qk_normalization": True,
                          "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu"}}))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        (original / name).write_bytes((folder / name).read_bytes())
    converted = edgellm.convert(original, tmp_path / "b", quantize="f32", seq_length=256, chunk_length=16,
                                progress=False)
    images = [picture(150, 70, 1), picture(60, 100, 2)]
    np.testing.assert_allclose(edgellm.load(converted).logits(TWO_IMAGES, images=images),
                               edgellm.load(bundle).logits(TWO_IMAGES, images=images), atol=1e-5, rtol=0)


def test_chat_keeps_an_image_of_an_earlier_turn(internvl):
    check_chat_keeps_an_image(internvl[2], picture(90, 50, 8))


def test_server_takes_images_as_data_urls(internvl):
    """`edgellm serve` with a vision-language bundle, driven by the openai client: image_url parts (base64 data URLs)
    in two requests decoding together give the answers the Python API gives for the same image bytes."""
    import base64
    import concurrent.futures

    openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
    from edgellm.server import create_app
    from helpers import running_server

    images = []
    for seed in (4, 5):
        out = io.BytesIO()
        picture(120, 80, seed).save(out, format="PNG")
        images.append(out.getvalue())
    alone = edgellm.load(internvl[2])
    wants = [alone.generate(IMAGE_QUESTION, images=[image], max_new_tokens=8) for image in images]
    model = edgellm.load(internvl[2], slots=2)
    assert model.engine.batched  # InternVL's decoder is its language model's: it decodes in batches
    with running_server(create_app(model, "internvl")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

        def ask(image: bytes):
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": "What is this?"}]}]
            return client.chat.completions.create(model="internvl", messages=messages, max_tokens=8, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, images))
        for answer, want in zip(answers, wants):
            assert answer.choices[0].message.content == want.text
            assert answer.usage.prompt_tokens == want.prompt_tokens
        assert client.models.retrieve("internvl").model_extra["vision"] is True


@pytest.mark.browser
def test_the_chat_page_sends_a_picked_image(internvl, tmp_path):
    """The page's image picker (shown for a vision bundle) sends the image with the question, in Chromium."""
    from edgellm.server import create_app
    from helpers import browser_on, running_server, wait_for

    path = tmp_path / "picture.png"
    picture(120, 80, 6).save(path)
    model = edgellm.load(internvl[2])
    with running_server(create_app(model, "internvl")) as url, browser_on(f"{url}/") as browser:
        wait_for(browser, lambda b: "images" in b.find_element("id", "model").text)
        assert browser.find_element("id", "imagebox").is_displayed()
        browser.find_element("id", "image").send_keys(str(path))
        browser.find_element("id", "temperature").send_keys("0")
        box = browser.find_element("id", "max_tokens")
        box.clear()
        box.send_keys("6")
        browser.find_element("id", "prompt").send_keys("What is this?")
        browser.find_element("id", "send").click()
        timing = wait_for(browser, lambda b: b.find_elements("css selector", "#log .msg.assistant .timing"))
        wait_for(browser, lambda b: "1 image(s)" in timing[0].text)
        assert browser.find_elements("css selector", "#log .msg.user img")  # the picked image is shown
    want = edgellm.load(internvl[2]).generate(IMAGE_QUESTION, images=[path.read_bytes()], max_new_tokens=6)
    assert model.last_result.images == 1 and model.last_result.text == want.text


def test_running_a_vision_bundle_never_imports_the_converter(internvl, tmp_path):
    from helpers import converter_modules_loaded_by_running

    picture(80, 60, 9).save(tmp_path / "a.png")
    assert converter_modules_loaded_by_running(internvl[2], tmp_path / "a.png") == []


def test_images_on_openvino_match_the_cpu_device(internvl):
    check_images_on_openvino(internvl[2], TWO_IMAGES, [picture(150, 70, 1), picture(60, 100, 2)])


def test_an_int8_kv_cache_answers_about_images_like_the_float_one(internvl, tmp_path):
    check_images_with_an_int8_cache(internvl[1], internvl[2], tmp_path, TWO_IMAGES,
                                    [picture(150, 70, 1), picture(60, 100, 2)])


def test_image_features_are_kept_on_disk_with_the_prompt_cache(internvl, tmp_path, capsys):
    """Image features kept on disk (by content, tied to the bundle; what `--prompt-cache DIR` turns on): a new
    process answers about the same image without running the vision graph, with the same answer."""
    from edgellm.cli import main

    image = tmp_path / "a.png"
    picture(100, 70, 11).save(image)
    answers = []
    for _ in range(2):
        model = edgellm.load(internvl[2])
        model.vision.keep_on_disk(tmp_path / "vision", model.bundle.identity)
        answers.append(model.generate(IMAGE_QUESTION, images=[image], max_new_tokens=6))
    assert answers[0].vision_s > 0 and answers[1].vision_s == 0 and answers[1].reused_tokens == 0
    assert answers[1].text == answers[0].text
    (saved,) = (tmp_path / "vision").glob("*.features.npz")
    saved.write_bytes(saved.read_bytes()[:100])  # damaged: computed again
    model = edgellm.load(internvl[2])
    model.vision.keep_on_disk(tmp_path / "vision", model.bundle.identity)
    again = model.generate(IMAGE_QUESTION, images=[image], max_new_tokens=6)
    assert again.vision_s > 0 and again.text == answers[0].text
    assert main(["run", str(internvl[2]), "What is this?", "-i", str(image), "-n", "2", "--prompt-cache",
                 str(tmp_path / "cache")]) == 0
    assert list((tmp_path / "cache" / "vision").glob("*.features.npz")) and "Traceback" not in capsys.readouterr().err
