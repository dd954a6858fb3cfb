"""What a checkpoint reader provides to the converter, whatever the file format."""

from __future__ import annotations

import numpy as np

from .quantize import QuantizedWeight


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

    def tokenizer_json(self) -> str:
        raise NotImplementedError

    def tokenizer_config(self) -> dict:
        return {}

    def chat_template(self) -> str | None:
        return None

    def generation_config(self) -> dict:
        return {}
