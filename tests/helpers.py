"""What the tests share: tiny models built with transformers (the oracle) from real configs, one per text family,
the bounds their logits are held to, reference computations, and the images, clips and prompts of the
vision-language tests. torch and transformers are imported where they are used, so that the numpy-only tests
(test_quantize, test_format, test_architecture) run without them; where they are needed, a missing one fails."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

import edgellm

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = (Path(__file__).parent / "data" / "english.txt")
# Max-abs logit error, relative to the reference's largest logit, of a quantized bundle against a transformers model
# holding the very same rounded weights: what remains is the runtime's own error. With float activations
# (accuracy_level 0) that is summation order alone: the packing must be exact (measured <= 1e-6). The default,
# accuracy_level 4, rounds activations to int8 per block, which each CPU's kernel does its own way: on the tiny
# models below 3e-2 with AVX-512 VNNI (the earlier bound, which held there), 1.3e-2 to 3.1e-2 with AVX2 (AMD EPYC);
# a weight rounded at the wrong precision (a 4-bit lm_head read as 8-bit) shows as 0.12.
DEQUANTIZED_BOUND = {0: 1e-4, 4: 5e-2}


def relative_error(got, ref) -> float:
    """Max-abs error relative to the reference's largest magnitude: the measure every logits bound here uses."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# The tiny decoder every text family's table entry starts from
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.08)


def as_minicpm(config: dict) -> dict:
    """A Granite config as MiniCPM's remote code writes the same model: MiniCPM has no transformers class, and its
    forward is Granite's with the constants named otherwise (attention_multiplier = head_dim ** -0.5)."""
    layers = config["num_hidden_layers"]
    mine = {k: v for k, v in config.items()
            if k not in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")}
    return {**mine, "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
            "scale_emb": config["embedding_multiplier"], "scale_depth": config["residual_multiplier"] * layers ** 0.5,
            "dim_model_base": config["hidden_size"] / config["logits_scaling"]}


# One entry per text family of the registry (test_architecture checks that each has one): transformers' config and
# model classes, what the family's tiny model sets beyond TINY, its seed, and (for a family transformers has no
# class for) how the saved config.json is rewritten into the family's own.
TEXT_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0), 1),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0), 2),
    # fused qkv_proj and gate_up_proj; LongRoPE (every test sequence is past the original 8 positions: long factors)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=None, original_max_position_embeddings=8,
                                                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                                    "short_factor": [1 + 0.1 * i for i in range(8)],
                                                                    "long_factor": [1 + 0.5 * i for i in range(8)]}),
             7),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1000000.0), 3),
    # rotary over half of each 32-wide head, interleaved; biased q/k/v
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=32, pad_token_id=None, rope_parameters={
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}), 11),
    # GLM-4 9B: glm4 without the extra norms
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=32, pad_token_id=None), 14),
    # checked against transformers' Granite holding the same constants
    "minicpm": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=12.0, attention_multiplier=0.25,
                                                            residual_multiplier=1.4 / 2 ** 0.5, logits_scaling=4.0),
                15, as_minicpm),
    # multi-head latent attention: a 32-wide latent query, a 32-wide key-value latent, 16 rotated dimensions
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(
        pad_token_id=None, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16,
        scale_emb=12, scale_depth=1.4, dim_model_base=16, rope_theta=10000.0), 16),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=None), 12),
    # the second of its two layers attends without rotary
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(pad_token_id=None, no_rope_layer_interval=2), 13),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=6.0, attention_multiplier=0.2,
                                                            residual_multiplier=0.4, logits_scaling=4.0), 10),
    # the first Gemma: 1 + w norms, sqrt(hidden) embeddings, GELU gate; multi-query attention as the 2B's
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, num_key_value_heads=1), 17),
    # alternating 8-token windows and full layers; both soft-capping steps within reach of random logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0), 9),
    # an 8-token window, so prompts of a few chunks test the sliding layers; linear-scaled global rotary
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}), 4),
}


def write_tokenizer(folder: Path, extra_specials: tuple[str, ...] = (), template: str = CHATML) -> int:
    """A small byte-level BPE trained on the test corpus, with ChatML special tokens (and a VLM's markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS.read_text()], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


def make_tiny_model(arch: str, folder: Path, tie: bool = False):
    import torch
    import transformers

    config_cls, model_cls, extra, seed, *saved_as = TEXT_MODELS[arch]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    config = getattr(transformers, config_cls)(vocab_size=vocab, eos_token_id=eos, tie_word_embeddings=tie,
                                              **{**TINY, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    if arch in ("qwen2", "glm", "glm4"):  # random biases, so a dropped bias would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    if saved_as:
        config_json = folder / "config.json"
        config_json.write_text(json.dumps(saved_as[0](json.loads(config_json.read_text()))))
    return model


def gguf_reference(gguf: Path):
    """(tokenizer, float32 model) as transformers reads a GGUF file (which needs accelerate installed)."""
    import torch
    import transformers

    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    return tok, transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()


def reference_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, ids, n: int, stop_at_eos: bool = False) -> list[int]:
    """transformers' n greedy tokens (EOS suppressed), or, with stop_at_eos, those before its EOS."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=0 if stop_at_eos else n, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    return tokens[: tokens.index(eos)] if stop_at_eos and eos in tokens else tokens


def check_image_logits(model, model_hf, ref: dict, messages, images, other_image) -> None:
    """The bundle's logits for `messages` with `images` equal transformers' on the processor inputs `ref` (1e-4 of
    the logit scale), and swapping the first image for `other_image` changes them (the images are really read)."""
    import torch

    with torch.no_grad():
        want = model_hf(**ref).logits[0].numpy()
    got = model.logits(messages, images=images)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    other = model.logits(messages, images=[other_image, *images[1:]])
    assert np.abs(other - got).max() > 1e-3


IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


def check_image_greedy(model_hf, bundle, ref: dict, image) -> None:
    """16 greedy tokens for IMAGE_QUESTION with `image` equal transformers' generate on the processor inputs `ref`;
    a plain string with images= gives the same prompt (the images go before the text)."""
    import torch

    with torch.no_grad():
        out = model_hf.generate(**ref, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    want = out[0, ref["input_ids"].shape[1]:].tolist()
    model = edgellm.load(bundle)
    result = model.generate(IMAGE_QUESTION, images=[image], max_new_tokens=16, ignore_eos=True)
    assert result.token_ids == want
    assert len(set(want)) > 2  # a varied continuation, not one repeated token
    assert result.images == 1 and result.vision_s > 0
    assert model.prompt_ids("What is this?", images=[image]) == ref["input_ids"][0].tolist()


def check_chat_keeps_an_image(bundle, image) -> None:
    """An image sent in a chat's first turn is neither encoded nor prefilled again on the next turn, whose answer
    equals a fresh run of the same conversation."""
    model = edgellm.load(bundle)
    chat = model.chat(max_new_tokens=5)
    chat.send("Look at this.", images=[image])
    first = chat.last_result
    assert first.images == 1 and first.vision_s > 0
    chat.send("And now?")
    second = chat.last_result
    assert second.images == 1 and second.vision_s == 0 and second.reused_tokens >= first.prompt_tokens
    fresh = edgellm.load(bundle).generate(chat._history()[:-1], images=[image], max_new_tokens=5)
    assert fresh.token_ids == second.token_ids


# --- vision-language tests ------------------------------------------------------------------------
TWO_IMAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare this with "},
                                           {"type": "image"}, {"type": "text", "text": "the second picture."}]}]


def picture(width: int, height: int, seed: int = 0):
    """A PIL image of smooth blocks with noise: different seeds give clearly different pictures."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    noisy = np.kron(smooth, np.ones((8, 8, 1), np.uint8))[:height, :width]
    return Image.fromarray(noisy ^ rng.integers(0, 32, noisy.shape, dtype=np.uint8))


def write_clip(path, frames: int = 20, size=(96, 72)):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "bgr0"
        for i in range(frames):
            frame = av.VideoFrame.from_image(picture(*size, seed=100 + i))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'video' %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
QWEN_VL_MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_vl_text(folder, messages):
    """(the transformers tokenizer, the chat template's text) of a Qwen-VL test model's folder."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok.chat_template = QWEN_VL_TEMPLATE
    return tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_patches(model, hf_image_processor, image) -> None:
    """A Qwen-VL bundle's patches and grid for `image` equal the Hugging Face image processor's."""
    ours = model.vision.processor.image(image)
    ref = hf_image_processor([image], return_tensors="np")
    assert ours.grid == tuple(ref["image_grid_thw"][0])
    np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)


def qwen_vl_inputs(model_hf, folder, messages, images, processor):
    """What Qwen2VLProcessor (or Qwen3VLProcessor, given its image processor) produces (built by hand: the
    processor needs torchvision)."""
    tok, text = qwen_vl_text(folder, messages)
    pixels = processor(images, return_tensors="pt")
    for t, h, w in pixels["image_grid_thw"].tolist():
        text = text.replace("<|image_pad|>", "\0" * (t * h * w // 4), 1)
    ids = tok(text.replace("\0", "<|image_pad|>"), return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": (ids == model_hf.config.image_token_id).int()}


def converter_modules_loaded_by_running(bundle, image=None) -> list[str]:
    """The converter's modules (and ONNX, gguf) that a fresh process has imported after loading `bundle` and
    answering one prompt (with `image`, a file path, for a vision-language bundle). `edgellm.convert` itself, a
    docstring that `import edgellm` binds, is not counted."""
    import subprocess
    import sys

    media = f", images=[{str(image)!r}]" if image else ""
    code = (f"import json, sys, edgellm; edgellm.load({str(bundle)!r}).generate('Hi', max_new_tokens=2{media}); "
            "print(json.dumps([k for k in sys.modules if k in ('onnx', 'gguf') or k.startswith(('onnx.', 'gguf.', "
            "'edgellm.convert.'))]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_random_bf16(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file of the named shapes, written one tensor at a time with numpy (no torch, and never
    the whole model in memory): matrices of uniform noise in +-0.05, vectors (norms) of ones."""
    import struct

    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            values = (rng.random(shape, dtype=np.float32) - 0.5) * 0.1 if len(shape) > 1 else np.ones(shape, np.float32)
            f.write((values.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # bf16: the high halves


OPENVINO_MISSING = "the openvino extra is not installed (pip install -e '.[openvino]')"


def check_images_on_openvino(bundle, messages, images) -> None:
    """Device openvino (vision graph and long prefill chunks on OpenVINO, in bf16 where the CPU has it) gives the
    CPU device's logits for `messages` with `images`, within bf16's error; skipped without the openvino extra."""
    import pytest

    pytest.importorskip("openvino", reason=OPENVINO_MISSING)
    from edgellm.runtime.openvino import CompiledGraph

    cpu, ov = edgellm.load(bundle), edgellm.load(bundle, device="openvino")
    assert isinstance(ov.vision.graph, CompiledGraph)
    want, got = cpu.logits(messages, images=images), ov.logits(messages, images=images)
    assert relative_error(got, want) < 3e-2
    assert all(np.isfinite(value).all() for value in ov.vision.cache.popitem()[1].values())


def check_images_with_an_int8_cache(folder, bundle, tmp_path, messages, images) -> None:
    """The model converted with `--kv-cache int8` (calibrated through the family's decoder extension) answers about
    `images` like the float-cache `bundle`, within what an 8-bit cache costs these tiny random models."""
    small = edgellm.load(edgellm.convert(folder, tmp_path / "int8-cache", quantize="f32", kv_cache="int8",
                                         seq_length=edgellm.load(bundle).manifest.seq_length, progress=False))
    assert small.engine.kv.dtype == np.int8
    want, got = edgellm.load(bundle).logits(messages, images=images), small.logits(messages, images=images)
    assert relative_error(got, want) < 0.15


@contextlib.contextmanager
def running_server(app):
    """`app` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def pace_generations(model, pause: float = 0.005) -> list:
    """Slow `model`'s decoding to a real model's pace (`pause` per step) and keep each answer's result, which its
    generation fills as it goes (also after its client left); returns that list, in the order answers started."""
    import time

    results, start, decode_batch = [], model.start, model.engine.decode_batch

    def started(*args, **kwargs):
        answer = start(*args, **kwargs)
        results.append(answer.result)
        return answer

    def paced(*args, **kwargs):
        time.sleep(pause)
        return decode_batch(*args, **kwargs)

    model.start, model.engine.decode_batch = started, paced
    return results


@contextlib.contextmanager
def browser_on(url: str):
    """Headless Chromium (selenium, with Debian's chromium and chromium-driver) on `url`; the test is skipped, saying
    why, where one of them is missing."""
    import shutil

    import pytest

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(url)
        yield browser
    finally:
        browser.quit()


def wait_for(browser, condition, seconds: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, poll_frequency=0.05).until(condition)
