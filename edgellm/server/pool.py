"""The models one server offers: each loaded when a request first names it, with its own Batcher (its slots decode
together) and prompt cache, and unloaded, least recently used first, when more are loaded than `max_models` or the
next one does not fit in memory. A model that is answering (a request in a slot or queued) is never unloaded."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EdgeLLMError
from ..runtime.batch import Batcher, Request

if TYPE_CHECKING:
    from ..runtime.model import Model
    from ..runtime.prompt_cache import PromptCache

MEMORY_REFUSAL = "GiB is free"  # the words of runtime.memory.check_fits' refusal, which unloading may cure


class PoolBusy(Exception):
    """Every loaded model is answering and no other fits beside them: the request may be retried shortly."""


@dataclass
class ServedModel:
    """One model the server offers under `name`: `load()` makes (model, prompt cache) when it is first needed."""

    name: str
    load: Callable[[], tuple]
    path: Path  # its bundle folder, whose manifest describes it before it is loaded
    model: Model | None = None
    prompt_cache: PromptCache | None = None
    batcher: Batcher | None = None
    used: float = field(default_factory=time.monotonic)
    pending: int = 0  # requests being read and checked for it, not yet in its Batcher
    lock: threading.Lock = field(default_factory=threading.Lock)  # one load at a time per model

    def card(self) -> dict:
        """What the model lists say of it, loaded or not: its context, family, precision, whether it sees images and
        has a chat template, its sampling defaults (once loaded) and its size on disk."""
        from ..format import VISION_GRAPH, open_bundle

        model, path = self.model, self.path
        manifest = model.manifest if model is not None else open_bundle(path, verify=False).manifest
        card = {"created": int(path.stat().st_mtime), "context_length": manifest.seq_length,
                "family": manifest.family, "quantization": manifest.quantization.mode,
                "vision": VISION_GRAPH in manifest.graphs, "chat_template": (path / "chat_template.jinja").is_file(),
                "loaded": model is not None, "quality": manifest.quality}
        if model is not None:
            card["defaults"] = model.sampling_defaults()
        return card

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def template(self) -> str:
        file = self.path / "chat_template.jinja"
        return file.read_text(encoding="utf-8") if file.is_file() else ""

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def ready(self) -> Model:
        """The model, inside ModelPool.use (which loads it)."""
        assert self.model is not None, "a model is used inside ModelPool.use, which loads it"
        return self.model

    @property
    def answering(self) -> bool:
        return self.pending > 0 or self.answering_in_slots

    @property
    def answering_in_slots(self) -> bool:
        b = self.batcher
        return b is not None and (b.busy > 0 or b.queued > 0)

    def unload(self) -> None:
        if self.batcher is not None:
            self.batcher.close()  # sequences in slots go to the prompt cache, flushed to its folder
        if self.model is not None:
            self.model.close()
        self.model = self.prompt_cache = self.batcher = None


class ModelPool:
    """The served models by name, at most `max_models` loaded at once; `on_finished` goes to every Batcher."""

    def __init__(self, models: list[ServedModel], max_models: int | None = None, max_queue: int = 64,
                 on_finished: Callable[[Request, str], None] | None = None):
        if not models:
            raise EdgeLLMError("a server needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise EdgeLLMError(f"two models are named {', '.join(twice)}; give each its own name")
        self.models = {m.name: m for m in models}
        self.max_models = max_models or len(models)
        self.max_queue, self.on_finished = max_queue, on_finished
        self.lock = threading.Lock()  # guards which models are loaded

    def names(self) -> list[str]:
        return list(self.models)

    def loaded(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.loaded]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[ServedModel]:
        """The model `name`, loaded (this blocks: enter it in a worker thread), and kept loaded until the block ends;
        a request submitted to its Batcher inside the block keeps it loaded after. KeyError if `name` is unknown."""
        served = self.models[name]
        with self.lock:
            served.pending += 1
        try:
            with served.lock:
                if served.model is not None and served.model.engine.lost_stage and not served.answering_in_slots:
                    served.unload()  # a stage's node failed: loaded again, on the nodes there are now
                if not served.loaded:
                    self._load(served)
                served.used = time.monotonic()
            yield served
        finally:
            with self.lock:
                served.pending -= 1

    def batcher(self, served: ServedModel) -> Batcher:
        with self.lock:
            if served.batcher is None:  # started with the model's first request
                served.batcher = Batcher(served.ready, served.prompt_cache, self.max_queue,
                                         on_finished=self.on_finished)
            return served.batcher

    def _load(self, served: ServedModel) -> None:
        while True:
            with self.lock:
                if len(self.loaded()) >= self.max_models:
                    self._unload_one(served)
            try:
                served.model, served.prompt_cache = served.load()
                return
            except EdgeLLMError as e:
                if MEMORY_REFUSAL not in str(e):
                    raise
                with self.lock:  # another model's memory may make room for this one
                    if not self._unload_one(served, required=False):
                        raise

    def _unload_one(self, wanted: ServedModel, required: bool = True) -> bool:
        """Unload the least recently used idle model (not `wanted`); False (or PoolBusy, when `required`) if none."""
        idle = [m for m in self.loaded() if m is not wanted and not m.answering]
        if not idle:
            if not required:
                return False
            raise PoolBusy(f"the {len(self.loaded())} loaded model(s) are all answering (--max-models "
                           f"{self.max_models}); retry shortly")
        oldest = min(idle, key=lambda m: m.used)
        oldest.unload()
        gc.collect()  # the sessions' memory goes back before the next model is loaded
        return True

    def close(self) -> None:
        for served in self.loaded():
            served.unload()
