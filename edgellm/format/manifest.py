"""manifest.json, typed: what a bundle holds and how its parts fit, as the converter writes it and the runtime reads
it. Every section is a dataclass; `Manifest.from_json` and `Manifest.to_json` are the only places that know the
JSON spelling, and they read every format version the runtime opens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..errors import EdgeLLMError

FORMAT = "edgellm-bundle"
# 2: the embedding table may be a tied lm_head's blocks inside the graph's data file; 3: the KV cache may be int8
FORMAT_VERSION = 3
ENCRYPTED_VERSION = 4  # an encrypted bundle (which an edgellm that reads up to v3 must refuse, not misread)
READABLE_VERSIONS = (1, 2, FORMAT_VERSION, ENCRYPTED_VERSION)  # older versions lack only what came later
MANIFEST = "manifest.json"


def _known(cls, data: dict) -> dict:
    """The keys of `data` that are fields of dataclass `cls` (a newer writer may add more)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _without_none(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


@dataclass
class DecoderShape:
    """The decoder graph's dimensions: what the runtime sizes the KV cache and the logits by."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    mrope_section: list[int] | None = None  # rotary bands per position axis, for decoders with 3-axis positions
    # LongRoPE bundles longer than the trained length: that length, past which a call runs on the long tables (the
    # decoder's ROTARY_LENGTH input); positions computed on each table are told apart when cached positions are reused
    rotary_switch: int | None = None

    def to_json(self) -> dict:
        return _without_none(asdict(self), "mrope_section", "rotary_switch")


@dataclass
class Quantization:
    mode: str  # f32 | f16 | w8 | w4
    group_size: int
    symmetric: bool
    lm_head: str
    accuracy_level: int
    matmuls: dict[str, int] = field(default_factory=dict)  # e.g. {"4-bit/32 +mins": 120}: what the graph holds
    kv_cache: str = "f32"  # f32 | int8 (scales per layer, head and channel inside the graph)

    @property
    def kv_dtype(self) -> type:
        return np.int8 if self.kv_cache == "int8" else np.float32

    def to_json(self) -> dict:
        data = asdict(self)
        if self.kv_cache == "f32":  # as bundles before format 3 were written
            del data["kv_cache"]
        return data


@dataclass
class Tokens:
    eos_token_ids: list[int]
    bos_token: str | None = None
    bos_token_id: int | None = None
    eos_token: str | None = None
    pad_token_id: int | None = None
    # vision-language bundles: the marker tokens their prompts are written with
    image_token_id: int | None = None
    image_start_id: int | None = None
    image_end_id: int | None = None
    video_token_id: int | None = None

    MEDIA = ("image_token_id", "image_start_id", "image_end_id", "video_token_id")

    def to_json(self) -> dict:
        data = asdict(self)
        order = ["bos_token", "bos_token_id", "eos_token", "eos_token_ids", "pad_token_id"]
        return {**{k: data[k] for k in order}, **{k: data[k] for k in self.MEDIA if data[k] is not None}}

    @property
    def media_ids(self) -> list[int]:
        """The ids that stand for an image's or a video's embeddings in a prompt."""
        return [i for i in (self.image_token_id, self.video_token_id) if i is not None]


@dataclass
class ArrayRef:
    """An array stored raw at `offset` of another bundle file (the lm_head's blocks inside the graph's data)."""

    file: str
    offset: int
    dtype: str
    shape: list[int]


# A part of the embedding table: a .npy file's name, an array inside another file, or one such array per row piece.
TablePart = str | ArrayRef | list


def _part_from_json(value) -> TablePart:
    if isinstance(value, list):
        return [_part_from_json(v) for v in value]
    return ArrayRef(**value) if isinstance(value, dict) else value


def _part_to_json(value: TablePart):
    if isinstance(value, list):
        return [_part_to_json(v) for v in value]
    return asdict(value) if isinstance(value, ArrayRef) else value


@dataclass
class EmbeddingsEntry:
    """Where the token-embedding rows are. Either float rows (`values`: float16, float32 for f32 bundles) or a
    GGUF's own blocks: `codes` with per-block `scales` (and `zero_points` or `mins`), decoding like MatMulNBits;
    `packed` when 4-bit codes are stored two per byte, `multiplier` a factor the stored scales still lack."""

    values: str | None = None
    codes: TablePart | None = None
    bits: int | None = None
    k: int | None = None
    scales: TablePart | None = None
    zero_points: TablePart | None = None
    mins: TablePart | None = None
    packed: bool = False
    multiplier: float | None = None

    BLOCK_PARTS = ("scales", "zero_points", "mins")

    def block_parts(self) -> dict[str, TablePart]:
        """The stored per-block parts (scales, and zero points or mins), by name."""
        parts = {"scales": self.scales, "zero_points": self.zero_points, "mins": self.mins}
        return {name: part for name, part in parts.items() if part is not None}

    @classmethod
    def from_json(cls, data) -> EmbeddingsEntry:
        if isinstance(data, str):
            return cls(values=data)
        parts: dict[str, Any] = {k: _part_from_json(v) for k, v in data.items() if k in ("codes", *cls.BLOCK_PARTS)}
        return cls(bits=int(data["bits"]), k=int(data["k"]), packed=bool(data.get("packed", False)),
                   multiplier=data.get("multiplier"), **parts)

    def to_json(self):
        if self.values is not None:
            return self.values
        data = {}
        if isinstance(self.codes, str):  # its own .npy files
            data.update(codes=self.codes, bits=self.bits, k=self.k)
        else:  # the lm_head's blocks
            data.update(bits=self.bits, k=self.k, packed=self.packed)
            if self.multiplier is not None:
                data["multiplier"] = self.multiplier
            data["codes"] = _part_to_json(self.codes)
        data.update({name: _part_to_json(part) for name, part in self.block_parts().items()})
        return data


@dataclass
class VisionSection:
    """A vision-language bundle's vision side: the family whose processor prepares images and prompts, the
    processor's settings (that family's own typed settings read them), and the vision graph's weight precision."""

    family: str
    settings: dict
    quantization: str

    def to_json(self) -> dict:
        return {"family": self.family, **self.settings, "quantization": self.quantization}

    @classmethod
    def from_json(cls, data: dict) -> VisionSection:
        settings = {k: v for k, v in data.items() if k not in ("family", "quantization")}
        return cls(data["family"], settings, data.get("quantization", "f32"))


@dataclass
class FileEntry:
    bytes: int
    sha256: str | None = None
    crc32: str | None = None  # what loading checks; bundles written before it was recorded have SHA-256 only

    def to_json(self) -> dict:
        return _without_none(asdict(self), "sha256", "crc32")


DECODER_GRAPH, VISION_GRAPH = "decoder", "vision"
STEP_GRAPH = "decoder_step"  # --static: the one-row graph beside the fixed chunk (the "decoder")
SAMPLING_HEAD_GRAPH = "sampling_head"  # --do-sample
# a decoder input of LongRoPE bundles longer than the trained length: the longest sequence's length once the call is
# done (a prompt's whole length for each of its chunks), which chooses between the short and the long rotary tables
ROTARY_LENGTH = "rotary_length"


def stage_graph(k: int) -> str:
    """The manifest's name of stage k (from 1) of a decoder written as stages; stage 0 is DECODER_GRAPH."""
    return f"{DECODER_GRAPH}_stage{k}"


@dataclass
class Manifest:
    architecture: str
    family: str  # the text family whose decoder the graph holds
    model: DecoderShape
    seq_length: int
    chunk_length: int
    quantization: Quantization
    tokens: Tokens
    graphs: dict[str, str]  # "decoder" (and "vision") -> graph file
    embeddings: EmbeddingsEntry
    vision: VisionSection | None = None
    source: dict = field(default_factory=dict)  # {"path", "format"} of the converted checkpoint
    created_by: str = ""
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # {"cipher", "kdf": {...}, "salt": hex, "files": [names]} of an encrypted bundle (format.encryption)
    encryption: dict | None = None
    shared: dict[str, str] = field(default_factory=dict)  # file -> the other bundle's it is a hard link to
    # LoRA slots compiled into the decoder: {"slots": adapters held at once, "rank": the most a slot takes,
    # "shapes": {projection: [in, out]}}
    lora: dict | None = None
    # what the precision costs, measured at conversion against the source's own weights (convert/report.py): the
    # built-in text's perplexity against the reference's, top-1 agreement, the largest logit error, the worst layers
    quality: dict | None = None

    @property
    def decoder_stages(self) -> list[str]:
        """The decoder's graph files in order: one, or one per stage (convert --num-device)."""
        stages = [self.graphs[DECODER_GRAPH]]
        while stage_graph(len(stages)) in self.graphs:
            stages.append(self.graphs[stage_graph(len(stages))])
        return stages

    @property
    def size_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def to_json(self) -> dict:
        data = {"format": FORMAT, "format_version": self.format_version, "created_by": self.created_by,
                "architecture": self.architecture, "family": self.family, "source": self.source,
                "model": self.model.to_json(), "seq_length": self.seq_length, "chunk_length": self.chunk_length,
                "quantization": self.quantization.to_json(), "tokens": self.tokens.to_json(), "graphs": self.graphs,
                "embeddings": self.embeddings.to_json()}
        if self.vision is not None:
            data["vision"] = self.vision.to_json()
        if self.encryption is not None:
            data["format_version"], data["encryption"] = ENCRYPTED_VERSION, self.encryption
        if self.shared:
            data["shared"] = self.shared
        if self.lora:
            data["lora"] = self.lora
        if self.quality is not None:
            data["quality"] = self.quality
        data["files"] = {name: entry.to_json() for name, entry in self.files.items()}
        return data

    @classmethod
    def from_json(cls, data: dict, where: str = MANIFEST) -> Manifest:
        version = data.get("format_version") if isinstance(data, dict) else None
        if version is not None and data.get("format") == FORMAT and isinstance(version, int) \
                and version > ENCRYPTED_VERSION:
            raise EdgeLLMError(f"{where}: this bundle is format v{version}, written by a newer edgellm "
                               f"({data.get('created_by') or 'unknown version'}); this one reads up to "
                               f"v{ENCRYPTED_VERSION}: upgrade edgellm (pip install -U edgellm)")
        if not isinstance(data, dict) or data.get("format") != FORMAT or version not in READABLE_VERSIONS:
            found = data if not isinstance(data, dict) else f"{data.get('format')!r} v{data.get('format_version')}"
            raise EdgeLLMError(f"{where}: bundle format {found} is not {FORMAT} "
                               f"v{'/'.join(map(str, READABLE_VERSIONS))}; reconvert the model with this edgellm")
        try:
            return cls(architecture=data["architecture"], family=data.get("family", ""),
                       model=DecoderShape(**_known(DecoderShape, data["model"])),
                       seq_length=int(data["seq_length"]), chunk_length=int(data["chunk_length"]),
                       quantization=Quantization(**_known(Quantization, data["quantization"])),
                       tokens=Tokens(**_known(Tokens, data["tokens"])), graphs=dict(data["graphs"]),
                       embeddings=EmbeddingsEntry.from_json(data["embeddings"]),
                       vision=VisionSection.from_json(data["vision"]) if "vision" in data else None,
                       source=data.get("source", {}), created_by=data.get("created_by", ""),
                       files={name: FileEntry(**_known(FileEntry, info)) for name, info in data["files"].items()},
                       format_version=data["format_version"], encryption=data.get("encryption"),
                       shared=dict(data.get("shared") or {}), lora=data.get("lora"), quality=data.get("quality"))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgeLLMError(f"{where}: corrupt manifest ({type(e).__name__}: {e}); reconvert the model") from None
