"""How the decoder graph(s) run, one runner per execution mode, chosen once when the engine loads:

- GraphRunner: one ONNX Runtime session (the usual case; several slots decode in one call where the graph batches);
- StagedRunner: a decoder written as stages (convert --num-device), a session per stage, each handing on the hidden
  state; prefill chunks can be pipelined through the stages (ray_stages.RayStagedRunner: the same, each stage a Ray
  actor);
- FixedShapeRunner: fixed-shape graphs (convert --static), a padded chunk graph and a one-row graph;
- OpenVinoRunner: prefill chunks on OpenVINO, the rest on ONNX Runtime (device openvino).

Every runner takes a feed for rows of the cache's slots and returns logits as an array; the engine prepares the feed
and keeps the slots' bookkeeping.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from .kv_cache import KvCache
from .lora_slots import LoraSlots

# Device openvino: chunks shorter than this (decode, speculative checks) stay on ONNX Runtime, faster at few rows;
# prefill runs in chunks of OPENVINO_CHUNK (or the bundle's longer --chunk-length), where OpenVINO gains the most.
MIN_OPENVINO_ROWS = 64
OPENVINO_CHUNK = 512


class Bound(NamedTuple):
    session: ort.InferenceSession
    binding: ort.IOBinding
    logits: np.ndarray  # the fixed buffer one-position logits land in
    logits_value: ort.OrtValue  # (the same memory, as ONNX Runtime binds it)
    kept: list  # the LoRA inputs' arrays, alive as long as the binding


class Bindings:
    """IO bindings of ranges of cache slots: each layer's past and present bound to the cache's slices (the graph
    appends in place), the LoRA inputs for the slots' adapters, and a buffer for one-position logits; made once per
    (graph, slot range, adapters) and reused."""

    def __init__(self, cache: KvCache, lora: LoraSlots | None, vocab_size: int):
        self.cache, self.lora, self.vocab_size = cache, lora, vocab_size
        self.made: dict[tuple, Bound] = {}

    def get(self, session: ort.InferenceSession, layers: list[int], first: int, end: int) -> Bound:
        adapters = tuple(self.cache.slot_at(i).adapter for i in range(first, end)) if self.lora else ()
        key = (id(session), first, end, adapters)
        if key not in self.made:
            binding = session.io_binding()
            for i in layers:
                for j, kind in enumerate(("key", "value")):
                    value = ort.OrtValue.ortvalue_from_numpy(self.cache.kv[i, j, first:end])
                    binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                    binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
            kept = []
            for name in (i.name for i in session.get_inputs() if i.name.startswith("lora_")):
                assert self.lora is not None  # (a graph with LoRA inputs comes from a bundle with LoRA slots)
                kept.append(np.ascontiguousarray(np.stack([self.lora.array(a, name) for a in adapters])))
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(kept[-1]))
            logits = np.zeros((end - first, 1, self.vocab_size), np.float32)
            self.made[key] = Bound(session, binding, logits, ort.OrtValue.ortvalue_from_numpy(logits), kept)
        return self.made[key]

    def forget_adapter(self, name: str) -> None:
        """A reloaded adapter's arrays changed: the bindings that hold its old ones go."""
        self.made = {k: v for k, v in self.made.items() if name not in k[3]}


def run_bound(bound: Bound, feed: dict[str, Any], single: bool) -> np.ndarray:
    """The graph on `feed` with its cache slices bound: logits [rows, positions, vocab] (`single`: one position
    each, into the fixed buffer; a copy comes back)."""
    for name, value in feed.items():
        bound.binding.bind_cpu_input(name, value)
    if single:
        bound.binding.bind_ortvalue_output("logits", bound.logits_value)
    else:
        bound.binding.bind_output("logits")
    bound.session.run_with_iobinding(bound.binding)
    return bound.logits.copy() if single else bound.binding.get_outputs()[-1].numpy()


class Runner:
    """The decoder's execution mode. `forward`: new rows of one slot (`start`: its cached positions before them, `s`:
    how many), logits at `logits_index` [len(logits_index), vocab]; `decode_batch`: one new row for each of the
    slots first..end-1, logits [end - first, 1, vocab]. A runner that `pipelines` (a decoder written as stages) also
    takes prefill chunks through `submit` inside `pipelined()`, each stage of a chunk beside the next stage of the
    one before."""

    pipelines = False

    def forward(self, feed: dict[str, np.ndarray], slot: int, start: int, s: int,
                logits_index: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode_batch(self, feed: dict[str, np.ndarray], first: int, end: int) -> np.ndarray:
        raise NotImplementedError

    def submit(self, feed: dict[str, np.ndarray], slot: int, logits_index: np.ndarray) -> Future:
        """forward() as a future of its logits, inside `pipelined()`."""
        raise NotImplementedError

    def pipelined(self):
        """A context within which submit() overlaps the stages of consecutive chunks; leaving it waits for all of
        them and raises the first error."""
        raise NotImplementedError


class GraphRunner(Runner):
    """One ONNX Runtime session of the whole decoder."""

    def __init__(self, session: ort.InferenceSession, layers: list[int], bindings: Bindings):
        self.session, self.layers, self.bindings = session, layers, bindings

    def run(self, feed: dict[str, np.ndarray], first: int, end: int, single: bool) -> np.ndarray:
        return run_bound(self.bindings.get(self.session, self.layers, first, end), feed, single)

    def forward(self, feed, slot, start, s, logits_index):
        return self.run(feed, slot, slot + 1, len(logits_index) == 1)[0]

    def decode_batch(self, feed, first, end):
        return self.run(feed, first, end, single=True)


def cache_layers(session: ort.InferenceSession) -> list[int]:
    """The decoder layers whose keys and values a graph (a whole decoder, or one stage of it) takes, in order."""
    return sorted(int(i.name.split(".")[1]) for i in session.get_inputs() if i.name.startswith("past_key."))


class Stage:
    """One graph of a decoder written as stages of contiguous layers (convert --num-device): it takes the previous
    stage's hand-over (its hidden state and residual stream) or, the first, the embeddings, and hands over the same
    to the next; the last returns logits."""

    def __init__(self, session: ort.InferenceSession, layers: list[int], last: bool):
        self.session, self.layers, self.last = session, layers, last
        self.inputs = [i.name for i in session.get_inputs() if not i.name.startswith(("past_", "lora_"))]

    def _given(self, feed: dict, carried: dict | None) -> dict:
        return {name: (carried or {}).get(name, feed.get(name)) for name in self.inputs}

    def hand_over(self, bindings: Bindings, feed: dict, carried: dict | None, first: int,
                  end: int) -> dict[str, np.ndarray]:
        """A stage before the last on `feed` (the engine's inputs) and `carried` (the previous stage's hand-over,
        if any) for the cache's slots first..end-1: the next hand-over."""
        bound = bindings.get(self.session, self.layers, first, end)
        b = bound.binding
        for name, value in self._given(feed, carried).items():
            b.bind_cpu_input(name, value)
        b.bind_output("next_hidden")
        b.bind_output("next_residual")
        bound.session.run_with_iobinding(b)
        outputs = b.get_outputs()
        return {"hidden": outputs[-2].numpy(), "residual": outputs[-1].numpy()}

    def logits(self, bindings: Bindings, feed: dict, carried: dict | None, first: int, end: int,
               single: bool) -> np.ndarray:
        """The last stage: logits, as run_bound gives them."""
        return run_bound(bindings.get(self.session, self.layers, first, end), self._given(feed, carried), single)


class StagedRunner(Runner):
    """A decoder written as stages (convert --num-device), each its own session (and device) in this process."""

    pipelines = True

    def __init__(self, sessions: list[ort.InferenceSession], stage_layers: list[list[int]], bindings: Bindings):
        self.stages = [Stage(st, layers, k == len(sessions) - 1)
                       for k, (st, layers) in enumerate(zip(sessions, stage_layers))]
        self.bindings = bindings
        self.pipeline: StagePipeline | None = None  # while `pipelined()` runs prefill chunks through the stages

    def run(self, feed: dict[str, np.ndarray], first: int, end: int, single: bool) -> np.ndarray:
        carried = None
        for stage in self.stages[:-1]:
            carried = stage.hand_over(self.bindings, feed, carried, first, end)
        return self.stages[-1].logits(self.bindings, feed, carried, first, end, single)

    def forward(self, feed, slot, start, s, logits_index):
        return self.run(feed, slot, slot + 1, len(logits_index) == 1)[0]

    def decode_batch(self, feed, first, end):
        return self.run(feed, first, end, single=True)

    def submit(self, feed, slot, logits_index):
        assert self.pipeline is not None
        return self.pipeline.submit(self, feed, slot, slot + 1, len(logits_index) == 1)

    @contextmanager
    def pipelined(self):
        self.pipeline = StagePipeline(len(self.stages))
        try:
            yield self
        finally:
            pipeline, self.pipeline = self.pipeline, None
            pipeline.close()


class StagePipeline:
    """One worker thread per stage: stage k of a chunk starts once stage k-1 of it and stage k of the chunk before
    are done, so consecutive chunks overlap (ONNX Runtime releases the GIL while a session runs)."""

    def __init__(self, stages: int):
        self.workers = [ThreadPoolExecutor(1, thread_name_prefix=f"edgellm-stage{k}") for k in range(stages)]
        self.futures: list[Future] = []

    def submit(self, runner: StagedRunner, feed: dict, first: int, end: int, single: bool) -> Future:
        """The chunk's stages queued in order; the future of its logits [1, rows, vocab][0]."""
        previous: Future | None = None

        def stage(k: int, before: Future | None):
            one, carried = runner.stages[k], before.result() if before else None
            if one.last:
                return one.logits(runner.bindings, feed, carried, first, end, single)[0]
            return one.hand_over(runner.bindings, feed, carried, first, end)

        for k, worker in enumerate(self.workers):
            previous = worker.submit(stage, k, previous)
            self.futures.append(previous)
        assert previous is not None
        return previous

    def close(self) -> None:
        """Wait for every queued stage; the first error of any, raised."""
        for worker in self.workers:
            worker.shutdown(wait=True)
        for future in self.futures:
            error = future.exception()
            if error is not None:
                raise error


class FixedShapeRunner(Runner):
    """Fixed-shape graphs (convert --static): a chunk of `rows` rows, padded after the real ones (their keys and
    values land past the sequence, where the next tokens overwrite them; causal attention keeps them out of the
    real rows) with one row's logits; otherwise (one row, the logits of several, or no room left for a whole chunk)
    row by row through the one-row graph."""

    def __init__(self, chunk: ort.InferenceSession, step: ort.InferenceSession, rows: int, layers: list[int],
                 seq_length: int, bindings: Bindings):
        self.bindings = bindings
        self.chunk, self.step, self.rows, self.layers, self.seq_length = chunk, step, rows, layers, seq_length

    def forward(self, feed, slot, start, s, logits_index):
        rows = self.rows
        if s == 1 or len(logits_index) > 1 or start + rows > self.seq_length:
            out = []
            step = self.bindings.get(self.step, self.layers, slot, slot + 1)
            for r in range(s):
                one = {**feed, "inputs_embeds": feed["inputs_embeds"][:, r:r + 1],
                       "position_ids": feed["position_ids"][:, r:r + 1], "seqlens_k": np.array([start + r], np.int32),
                       "total_sequence_length": np.array(start + r + 1, np.int32),
                       "logits_index": np.zeros(1, np.int64)}
                out.append(run_bound(step, one, single=True)[0, 0])
            return np.stack(out)[logits_index]
        pad = rows - s
        padded = {**feed,
                  "inputs_embeds": np.concatenate([feed["inputs_embeds"], np.zeros(
                      (1, pad, feed["inputs_embeds"].shape[2]), np.float32)], axis=1),
                  "position_ids": np.concatenate([feed["position_ids"], feed["position_ids"][:, -1:]
                                                  + np.arange(1, pad + 1, dtype=np.int64)], axis=1),
                  "seqlens_k": np.array([start + rows - 1], np.int32),
                  "total_sequence_length": np.array(start + rows, np.int32),
                  "logits_index": np.asarray(logits_index, np.int64)}
        return run_bound(self.bindings.get(self.chunk, self.layers, slot, slot + 1), padded, single=True)[0]

    def decode_batch(self, feed, first, end):
        raise EdgeLLMError("a fixed-shape bundle decodes one sequence at a time")


class OpenVinoRunner(Runner):
    """Device openvino: chunks of MIN_OPENVINO_ROWS rows or more on the OpenVINO-compiled decoder, which reads the
    cache's layers in place and returns each layer's keys and values up to the chunk's end (the chunk's own rows are
    copied into the cache); fewer rows (decoding, speculative checks) on ONNX Runtime, faster there."""

    def __init__(self, compiled, onnxruntime: GraphRunner, cache: KvCache, layers: int):
        self.compiled, self.onnxruntime, self.cache, self.layers = compiled, onnxruntime, cache, layers

    def forward(self, feed, slot, start, s, logits_index):
        if s < MIN_OPENVINO_ROWS:
            return self.onnxruntime.forward(feed, slot, start, s, logits_index)
        kv = self.cache.kv
        for i in range(self.layers):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = kv[i, 0], kv[i, 1]
        out = self.compiled.run(feed)
        for i in range(self.layers):
            kv[i, 0, ..., start:start + s, :] = out[f"present_key.{i}"][..., start:start + s, :]
            kv[i, 1, ..., start:start + s, :] = out[f"present_value.{i}"][..., start:start + s, :]
        return out["logits"][0]

    def decode_batch(self, feed, first, end):
        raise EdgeLLMError("device openvino decodes one sequence at a time; use device cpu to decode several")
