"""edgellm: compile Hugging Face and GGUF language models into compact ONNX bundles and run them on the edge."""

from __future__ import annotations

from . import convert as _converter_package  # noqa: F401  (bound first, so that the function below wins)
from ._version import __version__
from .errors import EdgeLLMError


def load(path, device: str = "cpu", threads: int | None = None, verify: bool = True, progress: bool = False,
         **options):
    """Open a model; returns a runtime.model.Model. `path`: a bundle folder made by `edgellm convert`, or a Hugging
    Face folder, a .gguf file or a Hugging Face id ("org/name", "org/name:Q4_K_M"), converted once (w4) into the
    cache of bundles (`edgellm list`; progress: the conversion's bar and where the bundle went, on stderr). Options:
    spinning, profile_prefix, check_memory=False to load a bundle larger than the free memory, slots, key / key_file
    for an encrypted bundle."""
    from .model_store import resolve
    from .runtime.model import Model

    return Model(resolve(path, progress=progress), device=device, threads=threads, verify=verify, **options)


def convert(source, out, quantize: str = "w4", group_size: int | None = None, seq_length: int | None = None,
            chunk_length: int = 128, symmetric: bool | None = None, lm_head: str | None = None,
            accuracy_level: int = 4, force: bool = False, progress: bool = True, vision_quantize: str | None = None,
            max_pixels: int | tuple[int, int] | None = None, static_vit: bool = False, reblock: bool = False,
            kv_cache: str = "f32", lora=None, do_sample: bool = False, encrypt: bool = False, key=None,
            key_file=None, share_weights_with=None, static: bool = False, num_devices: int | None = None,
            lora_slots: int = 0, lora_max_rank: int = 16, report: bool = True):
    """Convert a Hugging Face folder or a GGUF file (`source`) into a bundle folder `out`; returns its Path.

    quantize: f32 | f16 | w8 | w4 (default), the decoder's weights. group_size: block size of w4/w8 (default 128).
    symmetric: blocks without zero points (default True). lm_head: the output projection's precision (default w8
    with w4, else as quantize). A GGUF's own blocks are kept exactly (quantize w4, the default, or f16/f32 to widen
    them): group_size, symmetric and a quantized lm_head apply to float weights, or with reblock=True, which rounds
    a GGUF's blocks smaller than group_size again to it (4-bit codes to 4 bits, wider ones to 8).
    seq_length: the KV cache's length, longest prompt + answer (default: the smaller of 2048 and the model's
    maximum). chunk_length: prefill chunk (default 128). accuracy_level: MatMulNBits' (4: int8 activations, the fast
    CPU path; 0: float). kv_cache: "int8" keeps the KV cache at 8 bits with scales calibrated on a built-in text
    (the conversion then runs the converted decoder once, holding it in memory). force: replace `out` if it exists.
    progress: a progress bar and the result line on stderr. lora: a PEFT LoRA adapter folder merged into the
    weights (W + scale * B @ A, rounded once with them). do_sample: add the sampling head graph, which sampling
    answers then draw through (top_k at most its width of 64; 0 means 64). encrypt: the graphs, weights and
    embedding table stored with AES-256-GCM under a key derived from `key`, `key_file`'s contents or $EDGELLM_KEY
    (load then needs the same); needs the cryptography package. share_weights_with: a bundle of the same model
    and options but another seq_length / chunk_length, whose weights files this one links to instead of holding
    copies (checked by checksum at load). static: fixed-shape decoder graphs (a chunk of chunk_length rows, padded,
    and one row), for accelerators that cannot take dynamic shapes. num_devices: the decoder written as that many
    graphs of contiguous layers, each run on its own session (load with device="cpu,cpu", ...). lora_slots: LoRA
    branches of rank up to lora_max_rank beside the attention and MLP projections, which up to lora_slots adapters
    fill at run time (model.load_adapter(path, name); generate(..., adapter=name)). report: the quality report in the
    manifest (convert/report.py; False leaves it out, as --no-report).
    Vision-language models: vision_quantize (default f16; f32 with quantize f32); max_pixels, a pixel count or
    (width, height), bounds one image (Qwen2/3-VL: the resize budget, InternVL: the number of tiles); static_vit
    (Qwen2/3-VL) fixes the vision graph's input to one image size.
    An option that does not apply is one EdgeLLMError naming it (`group_size=12 ...`). The converter (onnx, gguf)
    is imported on first use: running a bundle never pays for it."""
    from .convert.options import ConvertOptions
    from .convert.pipeline import convert as run

    options = ConvertOptions(
        quantize=quantize, group_size=group_size, seq_length=seq_length, chunk_length=chunk_length,
        symmetric=symmetric, lm_head=lm_head, accuracy_level=accuracy_level, force=force, progress=progress,
        vision_quantize=vision_quantize, max_pixels=max_pixels, static_vit=static_vit, reblock=reblock,
        kv_cache=kv_cache, lora=lora, do_sample=do_sample, encrypt=encrypt, key=key, key_file=key_file,
        share_weights_with=share_weights_with, static=static, num_devices=num_devices, lora_slots=lora_slots,
        lora_max_rank=lora_max_rank, report=report)
    return run(source, out, options)


__all__ = ["load", "convert", "EdgeLLMError", "__version__"]
