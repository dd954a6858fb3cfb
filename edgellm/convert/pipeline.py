"""`edgellm convert`: checkpoint -> tensors -> graph -> bundle on disk."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .._version import __version__
from ..checkpoint import ModelSource
from ..errors import EdgeLLMError
from ..format import (
    DECODER_GRAPH,
    MANIFEST,
    SAMPLING_HEAD_GRAPH,
    STEP_GRAPH,
    VISION_GRAPH,
    EmbeddingsEntry,
    EmbeddingTable,
    Manifest,
    Quantization,
    Tokens,
    VisionSection,
    check_output,
    encryption,
    file_checksums,
    open_bundle,
    save_table,
    stage_graph,
    staging_folder,
    write_manifest,
)
from ..format.blocks import QuantizedWeight
from ..modeling.family import TextFamily, VisionOptions
from ..models import families, family_for
from ..vision.processor import MediaTokens
from .graph import DataFile, GraphBuilder, LoraSlots, WeightPolicy
from .kv_cache import CALIBRATION_TEXT, KV_CACHE_MODES, calibrate, quantize_cache, scales_from_ranges
from .quantize import reblock

QUANT_MODES = ("f32", "f16", "w8", "w4")
# block types (GGUF's, or a pre-quantized checkpoint's) that -q w8 keeps as 8-bit blocks
EIGHT_BIT_BLOCKS = {"Q8_0", "Q8_1", "Q8_K", "GPTQ 8-bit", "COMPRESSED-TENSORS 8-bit"}
DECODER_FILE = "decoder.onnx"
STEP_FILE = "decoder_step.onnx"  # --static: the one-token graph beside the chunk one
LM_HEAD_PIECE_BYTES = 32 << 20  # a larger quantized lm_head is stored in row pieces (see WeightPolicy)
VISION_FILE = "vision.onnx"


def open_source(src: str | Path) -> ModelSource:
    path = Path(src)
    if not path.exists():
        raise EdgeLLMError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EdgeLLMError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        from .gguf import GGUFSource

        return GGUFSource(path)
    from .hf import HFSource
    from .prequantized import PrequantizedSource, quantization_config

    source = HFSource(path)
    quantization = quantization_config(source.config)
    return PrequantizedSource(source, quantization) if quantization else source


class _PassThrough(ModelSource):
    """A source that passes another's tensors through; subclasses change what `tensor` or `linear` give."""

    def __init__(self, source: ModelSource):
        self.source, self.config = source, source.config

    def names(self):
        return self.source.names()

    def __contains__(self, name):
        return name in self.source

    def tensor(self, name):
        return self.source.tensor(name)

    def linear(self, name):
        return self.source.linear(name)


class _Progress(_PassThrough):
    """Ticks a progress bar the first time each tensor is read and shows the bytes read so far (`shared`: another
    _Progress of the same checkpoint, whose count this one continues)."""

    def __init__(self, source: ModelSource, bar, shared: "_Progress | None" = None):
        super().__init__(source)
        self.bar = bar
        self.seen: set[str] = shared.seen if shared else set()
        self.read = shared.read if shared else [0]

    def _tick(self, name, value):
        if name not in self.seen:
            self.seen.add(name)
            self.read[0] += value.nbytes
            self.bar.set_postfix_str(f"{self.read[0] / 2**20:,.0f} MiB of weights", refresh=False)
            self.bar.update(1)
        return value

    def tensor(self, name):
        return self._tick(name, self.source.tensor(name))

    def linear(self, name):
        return self._tick(name, self.source.linear(name))


class _Reblocked(_PassThrough):
    """A GGUF source's blocks smaller than `block_size` rounded again to that size (`--reblock`): faster kernels
    for a measured quality cost (docs/benchmarks.md)."""

    def __init__(self, source: ModelSource, block_size: int, symmetric: bool):
        super().__init__(source)
        self.block_size, self.symmetric = block_size, symmetric

    def linear(self, name):
        w = self.source.linear(name)
        if isinstance(w, QuantizedWeight) and w.block_size < self.block_size:
            return reblock(w, self.block_size, self.symmetric)
        return w


def convert(src: str | Path, out: str | Path, *, quantize: str, group_size: int | None, seq_length: int | None,
            chunk_length: int, symmetric: bool | None, lm_head: str | None, accuracy_level: int, force: bool,
            progress: bool, vision_quantize: str | None, max_pixels: int | tuple[int, int] | None, static_vit: bool,
            reblock: bool, kv_cache: str, lora: str | Path | None = None, do_sample: bool = False,
            encrypt: bool = False, key: bytes | str | None = None, key_file: str | Path | None = None,
            share_weights_with: str | Path | None = None, static: bool = False, num_devices: int | None = None,
            lora_slots: int = 0, lora_max_rank: int = 16) -> Path:
    """edgellm.convert, which documents the options and their defaults (None: the default for the source)."""
    if Path(src).suffix.lower() == ".gguf":
        check_gguf_options(quantize, group_size, symmetric, lm_head, reblock)
    if quantize not in (*QUANT_MODES, "auto"):
        raise EdgeLLMError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANT_MODES)} or auto")
    group_size = 128 if group_size is None else group_size
    symmetric = True if symmetric is None else symmetric
    if group_size < 16 or group_size & (group_size - 1):
        raise EdgeLLMError(f"-g must be a power of two of 16 or more (MatMulNBits' blocks), got {group_size}")
    for what, mode in (("vision quantization", vision_quantize), ("lm_head precision", lm_head)):
        if mode is not None and mode not in QUANT_MODES:
            raise EdgeLLMError(f"unknown {what} {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if kv_cache not in KV_CACHE_MODES:
        raise EdgeLLMError(f"unknown KV cache precision {kv_cache!r}; choose one of {', '.join(KV_CACHE_MODES)}")
    if chunk_length < 1:
        raise EdgeLLMError("--chunk-length must be at least 1")
    if reblock and Path(src).suffix.lower() != ".gguf":
        raise EdgeLLMError("--reblock applies to GGUF files (float weights are blocked by -g already)")
    started = time.perf_counter()
    out = Path(out)
    check_output(out, force)  # before any work
    material = encryption.key_material(key, key_file) if encrypt else None
    if share_weights_with is not None:
        if encrypt:
            raise EdgeLLMError("--encrypt and --share-weights-with exclude each other (encrypted files never match)")
        other = open_bundle(share_weights_with, verify=False)
    checkpoint = source = open_source(src)
    if lora is not None:  # merged under the checkpoint's own names, before a layout cuts fused tensors
        from .lora import LoRASource

        checkpoint = source = LoRASource(source, lora)
    if quantize == "auto":
        quantize = auto_precision(source.block_types())
    vision_quantize = vision_quantize or ("f32" if quantize == "f32" else "f16")
    lm_head = lm_head or ("w8" if quantize == "w4" else quantize)
    if quantize == "w8" and source.block_types() - EIGHT_BIT_BLOCKS:
        kinds = ", ".join(sorted(source.block_types() - EIGHT_BIT_BLOCKS))
        what = "GGUF" if Path(src).suffix.lower() == ".gguf" else "checkpoint"
        raise EdgeLLMError(f"-q w8 does not apply to this {what}'s {kinds} blocks, which are kept as they are (-q "
                           "w4, the default); -q f16 / f32 widen them to float")
    rerounded = source.rerounded_types()
    if rerounded:
        warning = (f"{Path(src).name}: its {', '.join(sorted(rerounded))} blocks cannot be kept as they are: they are "
                   f"dequantized and rounded again to -q {quantize} (a second rounding; docs/gguf-types.md)")
        print(f"edgellm: warning: {warning}", file=sys.stderr)
    architecture = (source.config.get("architectures") or ["<missing>"])[0]
    family = family_for(architecture)
    parts = None
    if static_vit and (isinstance(family, TextFamily) or not family.static_vit):
        vit = ", ".join(f.title for f in families() if not isinstance(f, TextFamily) and f.static_vit)
        raise EdgeLLMError(f"--static-vit applies to {vit} (the other vision graphs take fixed-size tiles already)")
    if isinstance(family, TextFamily):
        if max_pixels is not None:
            raise EdgeLLMError("--max-pixels applies to vision-language models only")
        if architecture in family.layouts:
            source = family.layouts[architecture](source)
        model, text_family = family.decoder(source.config), family.name
    else:  # a vision-language model: a decoder with the family's extensions, and a vision graph
        count = max_pixels[0] * max_pixels[1] if isinstance(max_pixels, tuple) else max_pixels
        static_size = (max_pixels if isinstance(max_pixels, tuple) else True) if static_vit else False
        parts = family.split(checkpoint, VisionOptions(count, static_size))
        source, model, text_family = parts.text, parts.decoder, parts.text_family
    config = source.config
    max_positions = int(config.get("max_position_embeddings") or 2048)
    seq_length = int(seq_length if seq_length is not None else min(2048, max_positions))
    if seq_length < 2:
        raise EdgeLLMError(f"--seq-length must be at least 2, got {seq_length}")
    if seq_length > max_positions:
        raise EdgeLLMError(f"--seq-length {seq_length} is more than the {max_positions} positions the model "
                           "was trained for (max_position_embeddings in its config)")
    layers = model.args.num_hidden_layers
    if num_devices is not None and not 1 <= num_devices <= layers:
        raise EdgeLLMError(f"--num-device must be from 1 to the {layers} layers of the model, got {num_devices}")
    stages = [range(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(layers), num_devices or 1)]
    if len(stages) > 1 and (parts or static or kv_cache != "f32"):
        raise EdgeLLMError("--num-device applies to text models with the dynamic graph and the float KV cache (not "
                           "with --static, --kv-cache int8 or vision-language models yet)")
    if static:
        if parts or kv_cache != "f32":
            raise EdgeLLMError("--static applies to text models with the float KV cache (not to vision-language "
                               "models or --kv-cache int8 yet)")
        model.fixed_rows = (chunk_length, 1)  # the chunk's last row's logits, as prefill needs
    slots_for_lora = None
    if lora_slots:
        if kv_cache != "f32" or lora_max_rank < 1:
            raise EdgeLLMError("--lora-slots needs the float KV cache and a --lora-max-rank of 1 or more")
        slots_for_lora = LoraSlots(lora_max_rank, model.batch_dim())
    tokenizer_json = compact_merges(source.tokenizer_json())
    tokens = special_tokens(source, tokenizer_json)
    if parts:
        tokens.update(media_tokens(parts.settings, tokenizer_json))

    graphs = {DECODER_GRAPH: DECODER_FILE}
    with staging_folder(out, overwrite=force) as stage:
        # Each weight is read, quantized and written before the next is read (GraphBuilder's DataFile), so the
        # conversion holds about one weight at a time.
        with tqdm(total=len(checkpoint.names()), desc="converting weights", unit="tensor", disable=not progress,
                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tensors{postfix} [{elapsed}<{remaining}]") as bar:
            weights = _Progress(_Reblocked(source, group_size, symmetric) if reblock else source, bar)
            formats: dict[str, int] = {}
            for k, layer_range in enumerate(stages):  # one graph, or one per stage (--num-device)
                graph_file = DECODER_FILE if k == 0 else f"decoder_stage{k}.onnx"
                g = GraphBuilder(WeightPolicy(quantize, group_size, symmetric, accuracy_level),
                                 data_file(stage, graph_file))
                g.lm_head_policy = WeightPolicy(lm_head, group_size, symmetric, accuracy_level, LM_HEAD_PIECE_BYTES)
                g.lora = slots_for_lora
                model.build(g, weights, seq_length, layer_range)
                save_graph(g, stage / graph_file)
                for kind, count in g.matmul_formats.items():
                    formats[kind] = formats.get(kind, 0) + count
                if k:
                    graphs[stage_graph(k)] = graph_file
            head_file = graph_file  # (the last stage's graph holds the lm_head, `g` its builder)
            if static:
                write_step_graph(stage / DECODER_FILE, stage / STEP_FILE)
                graphs[STEP_GRAPH] = STEP_FILE
            if parts:
                vg = GraphBuilder(WeightPolicy(vision_quantize, group_size, symmetric, accuracy_level),
                                  data_file(stage, VISION_FILE))
                parts.vision.build(vg, _Progress(parts.vision_weights, bar, weights))
                save_graph(vg, stage / VISION_FILE)
                graphs[VISION_GRAPH] = VISION_FILE
            # a tied lm_head that keeps the table's blocks holds them for both (save_table compares them bit for bit)
            embeddings_entry = save_table(stage, model.embedding_table(weights), quantize,
                                          stored_blocks(stage / head_file, g.nbits_weights.get("lm_head")),
                                          model.embedding_multiplier)
            bar.update(bar.total - bar.n)  # tensors the graph does not use (e.g. rotary tables) count as done
        if do_sample:
            from .sampling_head import SAMPLING_HEAD_FILE, build_sampling_head

            save_graph(build_sampling_head(model.shape().vocab_size), stage / SAMPLING_HEAD_FILE)
            graphs[SAMPLING_HEAD_GRAPH] = SAMPLING_HEAD_FILE
        if kv_cache == "int8":
            extension_for = family.processor(parts.settings.to_json()).decoder_extension if parts else None
            int8_cache(stage, embeddings_entry, tokenizer_json, seq_length, chunk_length, extension_for, progress)
        (stage / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        template = source.chat_template()
        if template:
            (stage / "chat_template.jinja").write_text(template)
        generation = dict(source.generation_config())
        generation.setdefault("eos_token_id", tokens["eos_token_ids"])
        (stage / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        sealed = encrypt_files(stage, material) if encrypt else None
        shared = share_files(stage, out, other) if share_weights_with is not None else {}
        manifest = Manifest(
            created_by=f"edgellm {__version__}", architecture=architecture, family=text_family,
            source={"path": str(Path(src).resolve()), "format": "gguf" if Path(src).is_file() else "hf",
                    **({"adapter": checkpoint.adapter} if lora is not None else {})},
            model=model.shape(), seq_length=seq_length, chunk_length=chunk_length,
            quantization=Quantization(quantize, group_size, symmetric, lm_head, accuracy_level, formats, kv_cache),
            tokens=Tokens(**tokens), graphs=graphs, embeddings=embeddings_entry,
            vision=VisionSection(family.name, parts.settings.to_json(), vision_quantize) if parts else None,
            encryption=sealed, shared=shared,
            lora={"slots": lora_slots, "rank": lora_max_rank, "shapes": slots_for_lora.shapes} if lora_slots else None)
        write_manifest(stage, manifest)
    if progress:
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        tqdm.write(f"wrote {out} ({size:.1f} MiB, {describe(quantize, formats, kv_cache)}) in "
                   f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return out


def write_step_graph(chunk_graph: Path, step_graph: Path) -> None:
    """--static: the one-token decoder, which is the chunk decoder with one row where it has a chunk's (no node
    depends on the row count: reshapes copy it), reading the same data file."""
    model = onnx.load(chunk_graph, load_external_data=False)
    axes = {"inputs_embeds": 1, "position_ids": 1, "logits_index": 0, "logits": 1}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in axes:
            value.type.tensor_type.shape.dim[axes[value.name]].dim_value = 1
    onnx.save_model(model, step_graph)


def share_files(stage: Path, out: Path, other) -> dict:
    """--share-weights-with: each weights file (graph data, embedding table) that is byte for byte the other bundle's
    becomes a hard link to it: one file on disk, in the page cache and (mapped by ONNX Runtime) in memory for both.
    (A symbolic link would not do: ONNX Runtime refuses external data that resolves outside the graph's folder.)
    The decoder's data file must be one of them."""
    shared = {}
    for path in sorted(stage.iterdir()):
        theirs = other.manifest.files.get(path.name)
        if not path.name.endswith((".onnx.data", ".npy")) or theirs is None or theirs.bytes != path.stat().st_size:
            continue
        if file_checksums(path, ("sha256",))["sha256"] != theirs.sha256:
            continue
        staged = path.with_name(path.name + ".linking")
        try:
            os.link(other.path / path.name, staged)
        except OSError as e:
            raise EdgeLLMError(f"cannot link {other.path / path.name} into {out} ({e.strerror}): bundles that share "
                               "weights must be on one file system") from None
        os.replace(staged, path)
        shared[path.name] = os.path.relpath(other.path.resolve() / path.name, out.resolve().parent / out.name)
    if f"{DECODER_FILE}.data" not in shared:
        raise EdgeLLMError(f"{out} cannot share its weights with {other.path}: its {DECODER_FILE}.data differs "
                           "(another model, precision or conversion options; only -s and --chunk-length may differ)")
    return shared


def encrypt_files(stage: Path, material: bytes) -> dict:
    """--encrypt: the graphs, their data files and the embedding table sealed with a key derived from `material`
    and a fresh salt; the tokenizer, templates and manifest stay readable. Returns the manifest's section."""
    salt = encryption.new_salt()
    key = encryption.derive_key(material, salt)
    names = sorted(p.name for p in stage.iterdir() if p.name.endswith((".onnx", ".onnx.data", ".npy")))
    for name in names:
        encryption.encrypt_file(stage / name, key)
    return {"cipher": encryption.CIPHER, "kdf": encryption.KDF, "salt": salt.hex(),
            "check": encryption.key_check(key), "files": names}


def auto_precision(block_types: set[str]) -> str:
    """-q auto: a quantized source's blocks as they are (w8 where all of them are 8-bit, so that its float tensors
    are not rounded below its own precision), a float source's weights in float16."""
    if not block_types:
        return "f16"
    return "w8" if block_types <= EIGHT_BIT_BLOCKS else "w4"


def check_gguf_options(quantize: str, group_size: int | None, symmetric: bool | None, lm_head: str | None,
                       reblock: bool) -> None:
    """A GGUF's blocks are kept as they are: refuse options that would not apply, rather than record them."""
    if lm_head in ("w4", "w8"):
        raise EdgeLLMError(f"--lm-head {lm_head} does not apply to a GGUF: its output tensor's blocks are kept as "
                           "they are (or widened with --lm-head f16 / f32)")
    if not reblock and quantize in ("w4", "auto"):
        for given, flag in ((group_size is not None, f"-g {group_size}"), (symmetric is not None,
                                                                           "--sym" if symmetric else "--asym")):
            if given:
                raise EdgeLLMError(f"{flag} does not apply to a GGUF's blocks, which are kept as they are; add "
                                   "--reblock to round them again to -g blocks")


def int8_cache(stage: Path, embeddings: EmbeddingsEntry, tokenizer_json: str, seq_length: int, chunk_length: int,
               extension_for, progress: bool) -> None:
    """Calibrate the staged decoder's KV cache ranges on the built-in text and rewrite the graph to an int8 cache."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(CALIBRATION_TEXT).ids[:seq_length]
    with tqdm(total=len(ids), desc="calibrating the int8 KV cache", unit="token", disable=not progress) as bar:
        ranges = calibrate(stage / DECODER_FILE, EmbeddingTable(stage, embeddings), ids, chunk_length, extension_for,
                           on_chunk=lambda done: bar.update(done - bar.n))
    quantize_cache(stage / DECODER_FILE, scales_from_ranges(ranges))


def describe(quantize: str, matmuls: dict[str, int], kv_cache: str) -> str:
    """What the result line says the bundle holds: the mode and the weight formats the graph has."""
    formats = ", ".join(f"{count} x {kind}" for kind, count in matmuls.items())
    return quantize + (f": {formats}" if formats else "") + (f", {kv_cache} KV cache" if kv_cache != "f32" else "")


def data_file(stage: Path, graph_file: str) -> DataFile:
    return DataFile(stage / (graph_file + ".data"))


def save_graph(g: GraphBuilder, path: Path) -> None:
    """The graph itself; its large weights are in the data file already."""
    if g.data is not None:
        g.data.close()
    onnx.save_model(g.to_model(), path)


def stored_blocks(graph: Path, weight: dict | None) -> dict | None:
    """Where the graph's data file holds a MatMulNBits weight (an entry of GraphBuilder.nbits_weights): its format
    and, per part (codes, scales, zero points), a list over its row pieces of ({"file", "offset", "dtype",
    "shape" [rows, ...]}, those bytes memory-mapped)."""
    if weight is None:
        return None
    initializers = {t.name: t for t in onnx.load(graph, load_external_data=False).graph.initializer}
    parts = {}
    for names in weight["pieces"]:
        rows = initializers[names[0]].dims[0]  # codes: [rows, k_blocks, block bytes]; the rest flat
        for part, name in zip(("codes", "scales", "zero_points"), names):
            tensor = initializers[name]
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                return None
            info = {e.key: e.value for e in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            size = int(np.prod(tensor.dims))
            where = {"file": info["location"], "offset": int(info.get("offset", 0)), "dtype": dtype.name,
                     "shape": [rows, *tensor.dims[1:]] if len(tensor.dims) > 1 else [rows, size // rows]}
            mapped = np.memmap(graph.parent / info["location"], dtype, "r", where["offset"], (size,))
            parts.setdefault(part, []).append((where, mapped))
    return {**{key: weight[key] for key in ("bits", "block_size", "k")}, "parts": parts}


def compact_merges(tokenizer_json: str) -> str:
    """The same tokenizer with its BPE merges written as "left right" strings instead of [left, right] pairs, where
    no token of a merge holds a space (what makes pairs necessary). The tokenizers library reads both, but builds
    pairs at about twice the memory and time (docs/benchmarks.md)."""
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(
            isinstance(m, list) and len(m) == 2 and " " not in m[0] and " " not in m[1] for m in merges):
        return tokenizer_json
    model["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data)


def media_tokens(settings: MediaTokens, tokenizer_json: str) -> dict:
    """Ids of a VLM's image/video marker tokens; each must be one token of the tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    ids = {}
    marks = {"image_token": settings.image_token, "image_start": settings.image_start,
             "image_end": settings.image_end, "video_token": settings.video_token}
    for key, text in marks.items():
        if text is None:
            continue
        ids[key + "_id"] = tok.token_to_id(text)
        if ids[key + "_id"] is None:
            raise EdgeLLMError(f"the tokenizer has no {text!r} token, which this vision-language model needs")
    return ids


def special_tokens(source: ModelSource, tokenizer_json: str) -> dict:
    """BOS/EOS as strings (for chat templates) and ids (for generation), from whichever file states them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tcfg, gcfg, cfg = source.tokenizer_config(), source.generation_config(), source.config
    text = lambda t: t.get("content") if isinstance(t, dict) else t  # noqa: E731
    bos, eos = text(tcfg.get("bos_token")), text(tcfg.get("eos_token"))
    eos_ids = []
    for value in (gcfg.get("eos_token_id"), cfg.get("eos_token_id"), tok.token_to_id(eos) if eos else None):
        for i in value if isinstance(value, list) else [value]:
            if i is not None and i not in eos_ids:
                eos_ids.append(int(i))
    if not eos_ids:
        raise EdgeLLMError("the checkpoint names no end-of-sequence token (eos_token_id); generation could not stop")
    bos_id = tok.token_to_id(bos) if bos else gcfg.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None and bos_id is not None:
        bos = tok.id_to_token(bos_id)
    return {"bos_token": bos, "bos_token_id": bos_id, "eos_token": eos or tok.id_to_token(eos_ids[0]),
            "eos_token_ids": eos_ids, "pad_token_id": gcfg.get("pad_token_id", cfg.get("pad_token_id"))}


__all__ = ["convert", "QUANT_MODES", "MANIFEST"]
