"""The options of a conversion: one typed, frozen record that the CLI, the Python API and the pipeline share, checked
once. It imports nothing heavy, so the CLI can build and check it before the converter (onnx, gguf) loads.

An error about an option names it the way its caller spelled it: `group_size=12` from Python, `-g 12` from the
command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import EdgeLLMError

QUANT_MODES = ("f32", "f16", "w8", "w4")
KV_CACHE_MODES = ("f32", "int8")

# option -> its command-line flag (symmetric has two: --sym / --asym)
FLAGS = {
    "quantize": "-q", "group_size": "-g", "seq_length": "--seq-length", "chunk_length": "--chunk-length",
    "symmetric": "--sym", "lm_head": "--lm-head", "accuracy_level": "--accuracy-level",
    "vision_quantize": "--vision-quantize", "max_pixels": "--max-pixels", "static_vit": "--static-vit",
    "reblock": "--reblock", "kv_cache": "--kv-cache", "lora": "--lora", "do_sample": "--do-sample",
    "encrypt": "--encrypt", "key_file": "--key-file", "share_weights_with": "--share-weights-with",
    "static": "--static", "num_devices": "--num-device", "lora_slots": "--lora-slots",
    "lora_max_rank": "--lora-max-rank", "force": "--force", "report": "--no-report",
}
NOT_ON_THE_COMMAND_LINE = {"key", "progress", "from_cli"}  # a key is read from --key-file or $EDGELLM_KEY there


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of `edgellm.convert`, which documents them; None means "the default for the source"."""

    quantize: str = "w4"
    group_size: int | None = None
    seq_length: int | None = None
    chunk_length: int = 128
    symmetric: bool | None = None
    lm_head: str | None = None
    accuracy_level: int = 4
    vision_quantize: str | None = None
    max_pixels: int | tuple[int, int] | None = None
    static_vit: bool = False
    reblock: bool = False
    kv_cache: str = "f32"
    lora: str | Path | None = None
    do_sample: bool = False
    encrypt: bool = False
    key: bytes | str | None = field(default=None, repr=False)
    key_file: str | Path | None = None
    share_weights_with: str | Path | None = None
    static: bool = False
    num_devices: int | None = None
    lora_slots: int = 0
    lora_max_rank: int = 16
    report: bool = True  # the quality report (convert/report.py): --no-report leaves it out
    force: bool = False
    progress: bool = True
    from_cli: bool = field(default=False, repr=False, compare=False)  # how errors spell the options

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConvertOptions:
        """The options `edgellm convert` parsed (the parser's dests are the options' names)."""
        given = {f.name: vars(args)[f.name] for f in fields(cls) if f.name not in NOT_ON_THE_COMMAND_LINE}
        return cls(**given, from_cli=True)

    def spell(self, option: str, value: object = None) -> str:
        """`option` (with `value`) as its caller wrote it: `-g 64` on the command line, `group_size=64` in Python."""
        if value is None:
            value = vars(self)[option]
        if not self.from_cli:
            return f"{option}={value!r}"
        flag = FLAGS[option]
        if option == "symmetric":
            return "--sym" if value else "--asym"
        if isinstance(value, bool):
            return flag
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        return f"{flag} {value}"

    def refuse(self, option: str, why: str, value: object = None) -> EdgeLLMError:
        return EdgeLLMError(f"{self.spell(option, value)} {why}")

    def checked(self, source: str | Path) -> ConvertOptions:
        """These options with the defaults that do not depend on the checkpoint filled in, after every check that
        needs only the options and the source's kind (the rest, such as a sequence longer than the model's, comes
        when the checkpoint is open)."""
        gguf = Path(source).suffix.lower() == ".gguf"
        if gguf:
            self._check_for_gguf()
        if self.quantize not in (*QUANT_MODES, "auto"):
            raise self.refuse("quantize", f"is not a precision; choose one of {', '.join(QUANT_MODES)} or auto")
        group_size = 128 if self.group_size is None else self.group_size
        if group_size < 16 or group_size & (group_size - 1):
            raise self.refuse("group_size", "is not a block size: a power of two of 16 or more", group_size)
        for option in ("vision_quantize", "lm_head"):
            if vars(self)[option] is not None and vars(self)[option] not in QUANT_MODES:
                raise self.refuse(option, f"is not a precision; choose one of {', '.join(QUANT_MODES)}")
        if self.kv_cache not in KV_CACHE_MODES:
            raise self.refuse("kv_cache", f"is not a KV cache precision; choose one of {', '.join(KV_CACHE_MODES)}")
        if self.accuracy_level not in range(5):
            raise self.refuse("accuracy_level", "is not an accuracy level; choose one of 0 to 4")
        if self.chunk_length < 1:
            raise self.refuse("chunk_length", "is too short: a prefill chunk is at least 1 token")
        if self.seq_length is not None and self.seq_length < 2:
            raise self.refuse("seq_length", "is too short: a KV cache holds at least 2 positions")
        if self.reblock and not gguf:
            raise self.refuse("reblock", "applies to GGUF files (float weights are blocked by the block size already)")
        if self.encrypt and self.share_weights_with is not None:
            raise self.refuse("share_weights_with", "and encryption exclude each other (encrypted files never match)")
        if self.lora_slots and (self.kv_cache != "f32" or self.lora_max_rank < 1):
            raise self.refuse("lora_slots", "needs the float KV cache and a largest rank of 1 or more")
        if self.static and self.kv_cache != "f32":
            raise self.refuse("static", "applies to text models with the float KV cache (not to an int8 one yet)")
        if self.num_devices is not None and self.num_devices > 1 and (self.static or self.kv_cache != "f32"):
            raise self.refuse("num_devices", "applies to text models with the dynamic graph and the float KV cache "
                                             "(not with fixed shapes or an int8 cache yet)")
        return replace(self, group_size=group_size, symmetric=True if self.symmetric is None else self.symmetric)

    def _check_for_gguf(self) -> None:
        """A GGUF's blocks are kept as they are: refuse options that would not apply, rather than record them."""
        if self.lm_head in ("w4", "w8"):
            raise self.refuse("lm_head", "does not apply to a GGUF: its output tensor's blocks are kept as they are "
                                         "(or widened to f16 / f32)")
        if not self.reblock and self.quantize in ("w4", "auto"):
            # the defaults written out (the README's group_size=128) say nothing the kept blocks contradict; they
            # apply to the GGUF's float tensors, if it has any
            for option, default in (("group_size", 128), ("symmetric", True)):
                if vars(self)[option] not in (None, default):
                    raise self.refuse(option, f"does not apply to a GGUF's blocks, which are kept as they are; add "
                                              f"{self.spell('reblock', True)} to round them again to new blocks")
