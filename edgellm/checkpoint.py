"""What a checkpoint reader provides, whatever the file format: the converter reads checkpoints through it, and
model families adapt their checkpoints (renamed tensors, vision towers) with it. It sits below both, so neither
imports the other to share it."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import EdgeLLMError
from .format.blocks import QuantizedWeight


class ModelSource:
    """A Hugging Face-style view of a checkpoint: config dict, tensors under HF names, tokenizer and templates.

    Readers implement names() and raw(); a reader whose weights are already quantized (GGUF) overrides linear()
    to hand over its blocks so they are not rounded a second time.
    """

    config: dict

    def names(self) -> list[str]:
        raise NotImplementedError

    def raw(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def tensor(self, name: str) -> np.ndarray:
        return np.asarray(self.raw(name), dtype=np.float32)

    def linear(self, name: str) -> np.ndarray | QuantizedWeight:
        return self.tensor(name)

    def block_types(self) -> set[str]:
        """The block formats of pre-quantized weights the source holds (a GGUF's Q4_0, Q8_0...); none for floats."""
        return set()

    def rerounded_types(self) -> set[str]:
        """Those of block_types() that cannot be kept: they are dequantized and quantized again."""
        return set()

    def tokenizer_json(self) -> str:
        raise NotImplementedError

    def tokenizer_config(self) -> dict:
        return {}

    def chat_template(self) -> str | None:
        return None

    def generation_config(self) -> dict:
        return {}

    def preprocessor_config(self) -> dict:
        """The image processor's settings (preprocessor_config.json), for vision-language models."""
        return {}


class WrappedSource(ModelSource):
    """A source seen through another view of its tensors: the tokenizer, templates and settings are the wrapped
    one's."""

    source: ModelSource

    def block_types(self) -> set[str]:
        return self.source.block_types()

    def rerounded_types(self) -> set[str]:
        return self.source.rerounded_types()

    def tokenizer_json(self) -> str:
        return self.source.tokenizer_json()

    def tokenizer_config(self) -> dict:
        return self.source.tokenizer_config()

    def chat_template(self) -> str | None:
        return self.source.chat_template()

    def generation_config(self) -> dict:
        return self.source.generation_config()

    def preprocessor_config(self) -> dict:
        return self.source.preprocessor_config()


class RenamedSource(WrappedSource):
    """One part of a multi-part checkpoint (a VLM's text decoder) seen as a model of its own: its own config, and
    names as its family file expects them (`rename` maps those to the checkpoint's)."""

    def __init__(self, source: ModelSource, config: dict, rename):
        self.source, self.config, self.rename = source, config, rename
        own = set(source.names())
        self._names = {}
        for name in own:
            mine = rename.inverse(name)
            if mine is not None:
                self._names[mine] = name

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def _theirs(self, name: str) -> str:
        return self._names.get(name) or self.rename(name)

    def raw(self, name: str) -> np.ndarray:
        return self.source.raw(self._theirs(name))

    def tensor(self, name: str) -> np.ndarray:
        return self.source.tensor(self._theirs(name))

    def linear(self, name: str):
        return self.source.linear(self._theirs(name))


class PrefixRename:
    """Maps name prefixes from family names to checkpoint names and back, e.g. {"model.": "language_model.model."}."""

    def __init__(self, prefixes: dict[str, str]):
        self.prefixes = prefixes

    def __call__(self, name: str) -> str:
        for mine, theirs in self.prefixes.items():
            if name.startswith(mine):
                return theirs + name[len(mine):]
        return name

    def inverse(self, name: str) -> str | None:
        for mine, theirs in self.prefixes.items():
            if name.startswith(theirs):
                return mine + name[len(theirs):]
        return None


class MappedSource(WrappedSource):
    """A checkpoint stored under other names (a remote-code layout) seen under the family's: each of the family's
    tensors is one of the checkpoint's, or some of its rows (q, k and v cut out of one fused projection). `config`
    is the family's config, translated from the checkpoint's."""

    def __init__(self, source: ModelSource, config: dict, mapping: Mapping[str, tuple[str, np.ndarray | None]]):
        self.source, self.config, self.mapping = source, config, mapping
        own = set(source.names())
        self._present = dict.fromkeys(mine for mine, (theirs, _) in mapping.items() if theirs in own)

    def names(self) -> list[str]:
        return list(self._present)

    def __contains__(self, name: str) -> bool:
        return name in self._present

    def _read(self, name: str, read):
        if name not in self.mapping:
            raise EdgeLLMError(f"tensor {name} has no place in this checkpoint's layout")
        theirs, rows = self.mapping[name]
        if theirs not in self.source:
            raise EdgeLLMError(f"tensor {theirs} (this family's {name}) not found in the checkpoint")
        value = read(theirs)
        return value if rows is None else (value.take_rows(rows) if isinstance(value, QuantizedWeight)
                                           else value[rows])

    def raw(self, name: str) -> np.ndarray:
        return self._read(name, self.source.raw)

    def tensor(self, name: str) -> np.ndarray:
        return self._read(name, self.source.tensor)

    def linear(self, name: str):
        return self._read(name, self.source.linear)
