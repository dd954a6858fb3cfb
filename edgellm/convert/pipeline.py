"""`edgellm convert`: checkpoint -> tensors -> graph -> bundle on disk."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
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
from ..info import quality_summary
from ..modeling.decoder import Decoder
from ..modeling.family import TextFamily, VisionLanguageFamily, VisionOptions, VisionParts
from ..models import Family, families, family_for
from ..vision.processor import MediaTokens
from .graph import GraphBuilder, LoraSlots, WeightPolicy, data_file, save_graph
from .kv_cache import CALIBRATION_TEXT, calibrate, quantize_cache, scales_from_ranges
from .options import QUANT_MODES, ConvertOptions
from .quantize import reblock
from .report import quality_report, warn

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

    def __init__(self, source: ModelSource, bar, shared: _Progress | None = None):
        super().__init__(source)
        self.bar = bar
        self.seen: set[str] = shared.seen if shared else set()
        self.read: list[int] = shared.read if shared else [0]  # bytes read, shared with `shared`

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


@dataclass
class Plan:
    """What a conversion will write, decided from the options and the open checkpoint before anything is written."""

    src: Path
    options: ConvertOptions  # checked, with quantize, lm_head and vision_quantize resolved for this source
    checkpoint: ModelSource  # the checkpoint as read (with a merged LoRA adapter)
    source: ModelSource  # the text model's view of it (a family's layout, or a vision-language model's text part)
    family: Family
    architecture: str
    text_family: str
    model: Decoder
    parts: VisionParts | None  # a vision-language model's vision graph, its weights and processor settings
    seq_length: int
    stages: list[range]  # the decoder's layers per graph (one graph unless --num-device)
    lora_slots: LoraSlots | None
    tokenizer_json: str
    tokens: dict


def convert(src: str | Path, out: str | Path, options: ConvertOptions) -> Path:
    """edgellm.convert, which documents the options: plan, then build the graphs, the assets and the manifest in a
    staging folder that becomes `out` only when all of it is written."""
    started = time.perf_counter()
    options = options.checked(src)
    out = Path(out)
    check_output(out, options.force)  # before any work
    material = encryption.key_material(options.key, options.key_file, encrypting=True) if options.encrypt else None
    other = open_bundle(options.share_weights_with, verify=False) if options.share_weights_with is not None else None
    plan = make_plan(Path(src), options)
    options = plan.options
    with staging_folder(out, overwrite=options.force) as stage:
        formats, embeddings = build_graphs(stage, plan)
        graphs = write_assets(stage, plan, embeddings, formats)
        quality = quality_report(stage, plan, embeddings, extension_of(plan)) if options.report else None
        sealed = encrypt_files(stage, material) if material is not None else None
        shared = share_files(stage, out, other) if other is not None else {}
        manifest = manifest_of(plan, graphs, formats, embeddings, sealed, shared)
        manifest.quality = quality
        write_manifest(stage, manifest)
    if quality is not None:
        warn(quality, options)
    if options.progress:
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        tqdm.write(f"wrote {out} ({size:.1f} MiB, {describe(options.quantize, formats, options.kv_cache)}) in "
                   f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        if quality is not None:
            tqdm.write(f"quality {quality_summary(quality)}", file=sys.stderr)
    return out


def extension_of(plan: Plan):
    """The family's decoder extension (its extra inputs), for running a vision-language decoder over text."""
    parts, family = plan.parts, plan.family
    if parts is not None and isinstance(family, VisionLanguageFamily):
        return family.processor(parts.settings.to_json()).decoder_extension
    return None


def make_plan(src: Path, options: ConvertOptions) -> Plan:
    """Open the checkpoint, find its family and decide every size and precision left to the source."""
    checkpoint = source = open_source(src)
    if options.lora is not None:  # merged under the checkpoint's own names, before a layout cuts fused tensors
        from .lora import LoRASource

        checkpoint = source = LoRASource(source, options.lora)
    options = resolved_precisions(src, source, options)
    rerounded = source.rerounded_types()
    if rerounded:
        warning = (f"{src.name}: its {', '.join(sorted(rerounded))} blocks cannot be kept as they are: they are "
                   f"dequantized and rounded again to -q {options.quantize} (a second rounding; docs/gguf-types.md)")
        print(f"edgellm: warning: {warning}", file=sys.stderr)
    architecture = (source.config.get("architectures") or ["<missing>"])[0]
    family = family_for(architecture)
    parts = None
    if options.static_vit and (isinstance(family, TextFamily) or not family.static_vit):
        vit = ", ".join(f.title for f in families() if not isinstance(f, TextFamily) and f.static_vit)
        raise options.refuse("static_vit", f"applies to {vit} (the other vision graphs take fixed-size tiles already)")
    if isinstance(family, TextFamily):
        if options.max_pixels is not None:
            raise options.refuse("max_pixels", "applies to vision-language models only")
        if architecture in family.layouts:
            source = family.layouts[architecture](source)
        model, text_family = family.decoder(source.config), family.name
    else:  # a vision-language model: a decoder with the family's extensions, and a vision graph
        max_pixels = options.max_pixels
        count = max_pixels[0] * max_pixels[1] if isinstance(max_pixels, tuple) else max_pixels
        static_size = (max_pixels if isinstance(max_pixels, tuple) else True) if options.static_vit else False
        parts = family.split(checkpoint, VisionOptions(count, static_size))
        source, model, text_family = parts.text, parts.decoder, parts.text_family
        for option in ("static", "num_devices"):
            if vars(options)[option] not in (False, None, 1):
                raise options.refuse(option, "applies to text models (not to vision-language models yet)")
    max_positions = int(source.config.get("max_position_embeddings") or 2048)
    seq_length = int(options.seq_length if options.seq_length is not None else min(2048, max_positions))
    if seq_length > max_positions:
        raise options.refuse("seq_length", f"is more than the {max_positions} positions the model was trained for "
                                           "(max_position_embeddings in its config)", seq_length)
    layers = model.args.num_hidden_layers
    if options.num_devices is not None and not 1 <= options.num_devices <= layers:
        raise options.refuse("num_devices", f"is not a device count: it must be from 1 to the {layers} layers of "
                                            "the model")
    stages = [range(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(layers), options.num_devices or 1)]
    if options.static:
        model.fixed_rows = (options.chunk_length, 1)  # the chunk's last row's logits, as prefill needs
    lora_slots = LoraSlots(options.lora_max_rank, model.batch_dim()) if options.lora_slots else None
    tokenizer_json = compact_merges(source.tokenizer_json())
    tokens = special_tokens(source, tokenizer_json)
    if parts:
        tokens.update(media_tokens(parts.settings, tokenizer_json))
    return Plan(src, options, checkpoint, source, family, architecture, text_family, model, parts, seq_length, stages,
                lora_slots, tokenizer_json, tokens)


def resolved_precisions(src: Path, source: ModelSource, options: ConvertOptions) -> ConvertOptions:
    """quantize "auto" as the source's own precision, and the lm_head's and vision graph's defaults for it."""
    quantize = auto_precision(source.block_types()) if options.quantize == "auto" else options.quantize
    if quantize == "w8" and source.block_types() - EIGHT_BIT_BLOCKS:
        kinds = ", ".join(sorted(source.block_types() - EIGHT_BIT_BLOCKS))
        what = "GGUF" if src.suffix.lower() == ".gguf" else "checkpoint"
        raise options.refuse("quantize", f"does not apply to this {what}'s {kinds} blocks, which are kept as they "
                                         "are (w4, the default); f16 / f32 widen them to float", "w8")
    return replace(options, quantize=quantize,
                   vision_quantize=options.vision_quantize or ("f32" if quantize == "f32" else "f16"),
                   lm_head=options.lm_head or ("w8" if quantize == "w4" else quantize))


def build_graphs(stage: Path, plan: Plan) -> tuple[dict[str, int], EmbeddingsEntry]:
    """The decoder graph(s), the vision graph and the embedding table, written into `stage`; returns the weight
    formats the matmuls hold and the table's manifest entry."""
    options = plan.options
    group_size, symmetric, accuracy = options.group_size, options.symmetric, options.accuracy_level
    lm_head, vision_quantize = options.lm_head, options.vision_quantize
    # (ConvertOptions.checked and resolved_precisions filled these in)
    assert group_size is not None and symmetric is not None and lm_head is not None and vision_quantize is not None
    # Each weight is read, quantized and written before the next is read (GraphBuilder's DataFile), so the
    # conversion holds about one weight at a time.
    with tqdm(total=len(plan.checkpoint.names()), desc="converting weights", unit="tensor",
              disable=not options.progress,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tensors{postfix} [{elapsed}<{remaining}]") as bar:
        source = _Reblocked(plan.source, group_size, symmetric) if options.reblock else plan.source
        weights = _Progress(source, bar)
        formats: dict[str, int] = {}
        for k, layer_range in enumerate(plan.stages):  # one graph, or one per stage (--num-device)
            g = GraphBuilder(WeightPolicy(options.quantize, group_size, symmetric, accuracy),
                             data_file(stage, decoder_file(k)))
            g.lm_head_policy = WeightPolicy(lm_head, group_size, symmetric, accuracy, LM_HEAD_PIECE_BYTES)
            g.lora = plan.lora_slots
            plan.model.build(g, weights, plan.seq_length, layer_range)
            save_graph(g, stage / decoder_file(k))
            for kind, count in g.matmul_formats.items():
                formats[kind] = formats.get(kind, 0) + count
        # (the last stage's graph holds the lm_head, `g` its builder)
        if plan.parts:
            vg = GraphBuilder(WeightPolicy(vision_quantize, group_size, symmetric, accuracy),
                              data_file(stage, VISION_FILE))
            plan.parts.vision.build(vg, _Progress(plan.parts.vision_weights, bar, weights))
            save_graph(vg, stage / VISION_FILE)
        # a tied lm_head that keeps the table's blocks holds them for both (save_table compares them bit for bit)
        embeddings = save_table(stage, plan.model.embedding_table(weights), options.quantize,
                                stored_blocks(stage / decoder_file(len(plan.stages) - 1),
                                              g.nbits_weights.get("lm_head")),
                                plan.model.embedding_multiplier)
        bar.update(bar.total - bar.n)  # tensors the graph does not use (e.g. rotary tables) count as done
    return formats, embeddings


def write_assets(stage: Path, plan: Plan, embeddings: EmbeddingsEntry, formats: dict[str, int]) -> dict[str, str]:
    """The graphs made from the decoder (the one-token step, the sampling head, the int8 cache's rewrite), the
    tokenizer, chat template and generation config; returns the manifest's graph table."""
    options = plan.options
    graphs = {DECODER_GRAPH: DECODER_FILE}
    graphs.update({stage_graph(k): decoder_file(k) for k in range(1, len(plan.stages))})
    if options.static:
        write_step_graph(stage / DECODER_FILE, stage / STEP_FILE)
        graphs[STEP_GRAPH] = STEP_FILE
    if plan.parts:
        graphs[VISION_GRAPH] = VISION_FILE
    if options.do_sample:
        from .sampling_head import SAMPLING_HEAD_FILE, build_sampling_head

        save_graph(build_sampling_head(plan.model.shape().vocab_size), stage / SAMPLING_HEAD_FILE)
        graphs[SAMPLING_HEAD_GRAPH] = SAMPLING_HEAD_FILE
    if options.kv_cache == "int8":
        int8_cache(stage, embeddings, plan.tokenizer_json, plan.seq_length, options.chunk_length, extension_of(plan),
                   options.progress)
    (stage / "tokenizer.json").write_text(plan.tokenizer_json, encoding="utf-8")
    template = plan.source.chat_template()
    if template:
        (stage / "chat_template.jinja").write_text(template)
    generation = dict(plan.source.generation_config())
    generation.setdefault("eos_token_id", plan.tokens["eos_token_ids"])
    (stage / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return graphs


def manifest_of(plan: Plan, graphs: dict[str, str], formats: dict[str, int], embeddings: EmbeddingsEntry,
                sealed: dict | None, shared: dict) -> Manifest:
    options, parts = plan.options, plan.parts
    assert options.group_size is not None and options.symmetric is not None and options.lm_head is not None
    assert options.vision_quantize is not None
    adapter = {"adapter": plan.checkpoint.adapter} if options.lora is not None else {}  # type: ignore[attr-defined]
    lora = None
    if plan.lora_slots is not None:
        lora = {"slots": options.lora_slots, "rank": options.lora_max_rank, "shapes": plan.lora_slots.shapes}
    return Manifest(
        created_by=f"edgellm {__version__}", architecture=plan.architecture, family=plan.text_family,
        source={"path": str(plan.src.resolve()), "format": "gguf" if plan.src.is_file() else "hf", **adapter},
        model=replace(plan.model.shape(), rotary_switch=plan.model.rotary_switch(plan.seq_length)),
        seq_length=plan.seq_length, chunk_length=options.chunk_length,
        quantization=Quantization(options.quantize, options.group_size, options.symmetric, options.lm_head,
                                  options.accuracy_level, formats, options.kv_cache),
        tokens=Tokens(**plan.tokens), graphs=graphs, embeddings=embeddings,
        vision=VisionSection(plan.family.name, parts.settings.to_json(), options.vision_quantize) if parts else None,
        encryption=sealed, shared=shared, lora=lora)


def decoder_file(stage: int) -> str:
    return DECODER_FILE if stage == 0 else f"decoder_stage{stage}.onnx"


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


def stored_blocks(graph: Path, weight: dict | None) -> dict | None:
    """Where the graph's data file holds a MatMulNBits weight (an entry of GraphBuilder.nbits_weights): its format
    and, per part (codes, scales, zero points), a list over its row pieces of ({"file", "offset", "dtype",
    "shape" [rows, ...]}, those bytes memory-mapped)."""
    if weight is None:
        return None
    initializers = {t.name: t for t in onnx.load(graph, load_external_data=False).graph.initializer}
    parts: dict[str, list[tuple[dict, np.memmap]]] = {}  # part -> (where, mapped) per row piece
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


__all__ = ["convert", "ConvertOptions", "QUANT_MODES", "MANIFEST"]
