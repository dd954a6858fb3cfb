"""Reading a Hugging Face model folder: config, safetensors weights (sharded or not), tokenizer and templates."""

from __future__ import annotations

import json
import struct
from functools import cached_property
from pathlib import Path

import numpy as np

from ..checkpoint import ModelSource
from ..errors import EdgeLLMError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """One .safetensors file; each tensor is read when asked for, into memory of its own, bf16 widened to float32.
    (Not a memory map: the pages of every tensor read would stay in the process's resident set until the end, as
    much as the whole checkpoint.)"""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                self.header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError) as e:
            raise EdgeLLMError(f"{path}: not a readable safetensors file ({e})") from e
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.size = path.stat().st_size

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise EdgeLLMError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self.data_start + end > self.size:
            raise EdgeLLMError(f"{self.path}: truncated file (tensor {name} runs past its end)")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        array = np.fromfile(self.path, dtype, (end - start) // dtype.itemsize, offset=self.data_start + start)
        array = array.reshape(info["shape"])
        if info["dtype"] == "BF16":
            wide = array.astype(np.uint32)
            del array
            return np.left_shift(wide, 16, out=wide).view(np.float32)
        return array


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def read_json(path: Path, missing=None):
    """A JSON file of the checkpoint folder; `missing` when it is absent (if given), one clear error when damaged."""
    if missing is not None and not path.is_file():
        return missing
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise EdgeLLMError(f"{path}: not valid JSON ({e})") from None


class HFSource(ModelSource):
    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise EdgeLLMError(f"{folder}: no config.json; expected a Hugging Face model folder or a .gguf file")
        self.config = read_json(config_path)
        if not isinstance(self.config, dict):
            raise EdgeLLMError(f"{config_path}: expected a JSON object")
        self._files: dict[str, SafetensorsFile] = {}

    @cached_property
    def _where(self) -> dict[str, str]:
        """Tensor name -> shard file; read on first use, so that an unknown architecture is named first."""
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            index_data = read_json(index)
            if not isinstance(index_data, dict) or not isinstance(index_data.get("weight_map"), dict):
                raise EdgeLLMError(f"{index}: no 'weight_map' object; the shard index is damaged")
            return index_data["weight_map"]
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise EdgeLLMError(f"{self.folder}: no *.safetensors weights found (PyTorch .bin files are not read; "
                               "re-save the model with safe_serialization=True)")
        return {name: shard.name for shard in shards for name in self._open(shard.name).names()}

    def _open(self, file_name: str) -> SafetensorsFile:
        if file_name not in self._files:
            path = self.folder / file_name
            if not path.is_file():
                raise EdgeLLMError(f"{path}: missing weight shard named in the index")
            self._files[file_name] = SafetensorsFile(path)
        return self._files[file_name]

    # --- weights -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def raw(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise EdgeLLMError(f"{self.folder}: tensor {name} not found in the checkpoint")
        return self._open(self._where[name]).get(name)

    # --- tokenizer and templates ---------------------------------------------------------------
    def tokenizer_json(self) -> str:
        path = self.folder / "tokenizer.json"
        if path.is_file():
            return read_text(path)
        model = self.folder / "tokenizer.model"
        if model.is_file():  # a sentencepiece model or a tiktoken file, as remote-code checkpoints often have alone
            from . import tiktoken_file
            from .sentencepiece import checkpoint_tokenizer

            if tiktoken_file.is_tiktoken(model):
                return json.dumps(tiktoken_file.tokenizer_json(model, self.tokenizer_config()))
            return json.dumps(checkpoint_tokenizer(model.read_bytes(), str(model), self.tokenizer_config()))
        raise EdgeLLMError(f"{self.folder}: no tokenizer.json or tokenizer.model (sentencepiece or tiktoken; "
                           "edgellm reads any of them)")

    def tokenizer_config(self) -> dict:
        return read_json(self.folder / "tokenizer_config.json", {})

    def chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return read_text(jinja)
        as_json = self.folder / "chat_template.json"
        if as_json.is_file():
            return read_json(as_json).get("chat_template")
        template = self.tokenizer_config().get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return template

    def generation_config(self) -> dict:
        return read_json(self.folder / "generation_config.json", {})

    def preprocessor_config(self) -> dict:
        return read_json(self.folder / "preprocessor_config.json", {})
