"""The decoder engine: a KV cache preallocated to the bundle's length, chunked prefill and one-token decode.

The engine opens the decoder's graph(s) and picks, once, the runner of its execution mode (runners.py); it keeps the
KV cache and its slots (kv_cache.py) and the LoRA adapters (lora_slots.py). It remembers which token sits at each
cached position, so a new prompt that starts like the cached one (the next turn of a chat, a repeated system prompt)
prefills only what differs; a PromptCache keeps copies of earlier sequences' positions to start from. A cache of
several slots holds several sequences, which decode together in one graph call (`decode_batch`: the server's
continuous batching) where the decoder has a batch dimension. What a family's decoder takes beyond the contract
(extra inputs, media spans a chunk must keep whole) comes from its processor's DecoderExtension.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..format import DECODER_GRAPH, ROTARY_LENGTH, STEP_GRAPH, Bundle, EmbeddingTable
from ..kernels import KernelUse
from ..kernels import status as kernel_status
from ..vision.processor import DecoderExtension, Processor
from .kv_cache import KvCache, Slot, common_prefix
from .lora_slots import LoraSlots
from .memory import default_slots
from .prompt_cache import CachedSequence, PromptCache
from .ray_stages import RayStagedRunner, RayStages, StageCaches
from .runners import (
    MIN_OPENVINO_ROWS,
    OPENVINO_CHUNK,
    Bindings,
    FixedShapeRunner,
    GraphRunner,
    OpenVinoRunner,
    Runner,
    StagedRunner,
    cache_layers,
)
from .sessions import PROVIDERS, default_threads, open_graph, session_options

__all__ = ["Engine", "Chunks"]


LONG_TABLE_KEY = 1 << 61  # marks the keys of positions computed on a LongRoPE decoder's long tables (table_keys)

class Engine:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, spinning: bool = True,
                 profile_prefix: str | None = None, processor: Processor | None = None, slots: int | None = 1,
                 stage_devices: list[str] | None = None, stage_placement: str | None = None):
        """`device` as check_device has accepted it (Model checks it before anything loads); `slots`: sequences the
        cache holds (more than one needs a decoder with a batch dimension, `batched`, on ONNX Runtime; None: as many
        as memory.default_slots finds room for where the decoder can batch, else 1); `stage_devices`: one device
        per stage of a decoder written as stages (convert --num-device); `stage_placement`: run those stages in Ray
        actors placed so (ray_stages.PLACEMENTS) instead of in this process."""
        m = bundle.manifest.model
        self.bundle = bundle
        self.seq_length = bundle.manifest.seq_length
        self.chunk_length = bundle.manifest.chunk_length
        self.kernels = KernelUse(kernel_status())  # which kernels run the decoder's matmuls
        self.threads = threads or default_threads()  # each session's (each stage actor's, on its node's cores)
        self.remote: RayStages | None = None  # the stages' Ray actors (stage_placement)
        if stage_placement is not None:
            if profile_prefix:
                raise EdgeLLMError("profiling records this process's sessions; the stages on Ray run elsewhere")
            self._place_stages(bundle, device, threads, stage_placement)
        else:
            self._open_sessions(bundle, device, threads, spinning, profile_prefix, stage_devices or [device])
        inputs = self.graph_inputs
        self.batched = not isinstance(inputs["inputs_embeds"][0], int)
        # a LongRoPE decoder choosing its tables per call: the length past which they are the long ones
        self.rotary_switch = bundle.manifest.model.rotary_switch if ROTARY_LENGTH in inputs else None
        rows_in = inputs["inputs_embeds"][1]  # fixed in a fixed-shape bundle (convert --static)
        self.fixed_rows = rows_in if isinstance(rows_in, int) else None
        slots = self._slot_count(slots, device)
        self.embeddings = EmbeddingTable(bundle.path, bundle.manifest.embeddings,
                                         bundle.read if bundle.encrypted else None)
        self.layers, self.vocab_size = m.num_hidden_layers, m.vocab_size
        position_rows = 1 if self.batched else inputs["position_ids"][0]
        self.cache = (StageCaches(self.remote, slots, self.seq_length, position_rows) if self.remote else
                      KvCache(self.layers, slots, m.num_key_value_heads, self.seq_length, m.head_dim,
                              bundle.manifest.quantization.kv_dtype, position_rows))
        self.slots = self.cache.slots
        self.slot = self.slots[0]  # the sequence prefill, forward, decode and verify work on
        self.reused = 0  # positions the last prefill took from the cache
        self.lora = LoraSlots(bundle.manifest.lora) if bundle.manifest.lora else None
        self.bindings = Bindings(self.cache, self.lora, self.vocab_size)
        self.runner = self._runner(device, threads)
        self.extension = processor.decoder_extension(inputs) if processor else DecoderExtension()
        if self.openvino is not None and self.seq_length >= MIN_OPENVINO_ROWS:
            # OpenVINO prepares its weights on the first run (seconds for a 1B model): at load, not at the first prompt
            self.forward(np.zeros((MIN_OPENVINO_ROWS, m.hidden_size), np.float32), np.zeros(1, np.int64))
            self.reset()

    def _open_sessions(self, bundle: Bundle, device: str, threads: int | None, spinning: bool,
                       profile_prefix: str | None, stage_devices: list[str]) -> None:
        """The decoder's sessions: one per stage (stage 0 is "the" session), each on its device, and a fixed-shape
        bundle's one-row graph."""
        if device == "openvino" and bundle.manifest.quantization.kv_cache != "f32":
            raise EdgeLLMError(f"device openvino cannot run this bundle's {bundle.manifest.quantization.kv_cache} KV "
                               "cache (OpenVINO's GroupQueryAttention ignores the cache's scales); use device cpu, or "
                               "reconvert without --kv-cache")
        stage_files = bundle.manifest.decoder_stages
        if len(stage_devices) > 1 and len(stage_devices) != len(stage_files):
            raise EdgeLLMError(f"this bundle's decoder is split for {len(stage_files)} devices; give "
                               f"{len(stage_files)} (-c {','.join(['cpu'] * len(stage_files))}) or one"
                               if len(stage_files) > 1 else "this bundle's decoder is one graph: write it as stages "
                               "for several devices with `edgellm convert --num-device N`")
        if len(stage_files) > 1 and "openvino" in stage_devices + [device]:
            raise EdgeLLMError("device openvino does not run a decoder written as stages yet; use cpu devices")
        # Stages run in turn, so a pool that spins while another stage computes takes its cores: no spinning when
        # there are several
        spins = spinning and len(stage_files) == 1
        self.stages = [open_graph(bundle, name, session_options(threads, spins, profile_prefix if k == 0 else None),
                                  PROVIDERS[stage_devices[k] if len(stage_devices) > 1 else device], self.kernels)
                       for k, name in enumerate(stage_files)]
        self.session = self.stages[0]
        self.graph_inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.stage_layers = [cache_layers(st) for st in self.stages]
        self.step_session: ort.InferenceSession | None = None
        if STEP_GRAPH in bundle.manifest.graphs:
            if device == "openvino":
                raise EdgeLLMError("device openvino does not run --static bundles yet; use device cpu")
            self.step_session = open_graph(bundle, bundle.manifest.graphs[STEP_GRAPH],
                                           session_options(threads, spinning), PROVIDERS[device], self.kernels)

    def _place_stages(self, bundle: Bundle, device: str, threads: int | None, placement: str) -> None:
        """The stages in Ray actors (ray_stages): nothing of the decoder's graphs is opened in this process."""
        if device not in ("cpu", "cuda"):
            raise EdgeLLMError(f"stages on Ray run on device cpu or cuda, not {device}")
        self.remote = RayStages(bundle, device, threads, placement)
        self.stages, self.step_session = [], None
        self.graph_inputs, self.stage_layers = self.remote.inputs[0], self.remote.layers

    def _slot_count(self, slots: int | None, device: str) -> int:
        can_batch = self.batched and device != "openvino"
        if slots is None:
            slots = default_slots(self.bundle, device) if can_batch else 1
        if slots > 1 and not can_batch:
            raise EdgeLLMError("this bundle's decoder runs one sequence at a time (a vision model with its own "
                               "position axes, or a bundle converted before decoders had a batch axis: reconvert "
                               "it)" if not self.batched else
                               "device openvino runs one sequence at a time; use device cpu to decode several")
        return slots

    def _runner(self, device: str, threads: int | None) -> Runner:
        """The runner of this bundle's execution mode on `device`."""
        self.openvino = None  # device openvino's compiled decoder
        if self.remote is not None:
            return RayStagedRunner(self.remote, self.cache)
        if len(self.stages) > 1:
            return StagedRunner(self.stages, self.stage_layers, self.bindings)
        if self.fixed_rows is not None:
            assert self.step_session is not None  # (a fixed-shape bundle holds its one-row graph)
            return FixedShapeRunner(self.session, self.step_session, self.fixed_rows, list(range(self.layers)),
                                    self.seq_length, self.bindings)
        graph = GraphRunner(self.session, self.stage_layers[0], self.bindings)
        if device != "openvino":
            return graph
        from .openvino import CompiledGraph

        decoder = self.bundle.file(self.bundle.manifest.graphs[DECODER_GRAPH])
        self.openvino = CompiledGraph(decoder, threads or default_threads())
        self.chunk_length = max(self.chunk_length, OPENVINO_CHUNK)
        return OpenVinoRunner(self.openvino, graph, self.cache, self.layers)

    def close(self) -> None:
        """The stages' Ray actors and their placement group, given back (stage_placement)."""
        if self.remote is not None:
            self.remote.close()

    @property
    def lost_stage(self) -> bool:
        """A stage in a Ray actor is gone (its node failed): nothing runs until the model is loaded again."""
        return self.remote is not None and self.remote.lost

    def describe(self) -> str:
        """What runs the decoder's matmuls, and where its stages run when they run in Ray actors."""
        if self.remote is not None:
            return f"{self.remote.kernels}; stages on Ray nodes {', '.join(self.remote.nodes)}"
        return self.kernels.describe()

    @property
    def kv(self) -> np.ndarray:
        return self.cache.kv

    # --- LoRA slots -----------------------------------------------------------------------------------------
    @property
    def adapters(self) -> dict[str, dict[str, np.ndarray]]:
        return self.lora.adapters if self.lora else {}

    def add_adapter(self, name: str, modules: dict) -> None:
        """Make an adapter (format.adapters' modules: A, B and scale per projection) loadable by name into the
        bundle's LoRA slots; one clear error for one it cannot hold."""
        if self.lora is None:
            raise EdgeLLMError("this bundle has no LoRA slots: convert it with --lora-slots N (or merge the adapter "
                               "with --lora)")
        self.lora.add(name, modules)
        self.bindings.forget_adapter(name)  # (a reloaded adapter)
        if self.remote is not None:
            self.remote.add_adapter(name, modules)

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise EdgeLLMError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")

    def set_adapter(self, name: str | None) -> None:
        """The adapter the current slot computes with from now on; its cache was computed with another: dropped."""
        self.check_adapter(name)
        if self.slot.adapter != name:
            self.reset()
            self.slot.adapter = name

    # --- the current slot -----------------------------------------------------------------------------------
    # (its state, under the names the one-sequence engine has always had)
    @property
    def tokens(self) -> list[int]:
        return self.slot.tokens

    @property
    def positions(self) -> np.ndarray:
        return self.slot.positions

    @property
    def length(self) -> int:
        return len(self.slot.tokens)

    @contextmanager
    def using(self, slot: Slot):
        """Work on `slot` (prefill, forward, decode, verify) inside the block."""
        before, self.slot = self.slot, slot
        try:
            yield slot
        finally:
            self.slot = before

    def reset(self) -> None:
        self.slot.clear()

    def text_positions(self, n: int) -> np.ndarray:
        """The rotary positions [rows, n] of n tokens of text from the start: 0, 1, 2, ... in every row."""
        return np.repeat(np.arange(n, dtype=np.int64)[None], len(self.slot.positions), axis=0)

    def embed(self, token_ids) -> np.ndarray:
        return self.embeddings[token_ids]

    def reuse_prefix(self, token_ids: list[int], positions: np.ndarray) -> int:
        """Keep the cached slots that hold the start of `token_ids` at the same rotary positions; at least one token
        is left to compute."""
        n = common_prefix(self.slot, token_ids, positions, len(token_ids) - 1)
        self.truncate(n)
        return n

    def truncate(self, length: int) -> None:
        """Forget the current slot's cache after its first `length` positions (their keys and values are
        overwritten later)."""
        self.slot.truncate(length)

    def move(self, slot: Slot, free: Slot) -> None:
        """Move `slot`'s sequence to `free`'s place in the cache (see KvCache.move)."""
        self.cache.move(slot, free)

    def snapshot(self, slot: Slot | None = None) -> CachedSequence:
        """A copy of a slot's cached positions (its keys, rotary positions and keys and values), for a PromptCache."""
        return self.cache.snapshot(slot or self.slot)

    def restore(self, entry: CachedSequence, length: int) -> None:
        """Fill the current slot with the first `length` positions of a PromptCache entry."""
        self.cache.restore(self.slot, entry, length)

    def table_keys(self, keys: list[int], call_length: int) -> list[int]:
        """`keys` as a slot records them: positions computed on a LongRoPE decoder's long tables (a call longer than
        its trained length) under keys of their own, so that they are reused only by calls on the same tables."""
        if self.rotary_switch is None or call_length <= self.rotary_switch:
            return keys
        return [k ^ LONG_TABLE_KEY for k in keys]

    def outgrow_short_tables(self, upcoming: int) -> None:
        """Before a call that takes the current slot past a LongRoPE decoder's trained length: compute its cached
        positions again on the long tables, as transformers' generate() does there for LongRoPE models (it drops its
        cache)."""
        switch, tokens = self.rotary_switch, self.slot.tokens
        if switch is None or not tokens or len(tokens) + upcoming <= switch or tokens[0] & LONG_TABLE_KEY:
            return
        ids, total = list(tokens), len(tokens) + upcoming
        self.truncate(0)
        for begin in range(0, len(ids), self.chunk_length):
            part = ids[begin:begin + self.chunk_length]
            self.forward(self.embed(part), np.array([len(part) - 1]), self.table_keys(part, total), call_length=total)

    # --- running the decoder --------------------------------------------------------------------------------
    def _feed(self, embeds: np.ndarray, logits_index: np.ndarray, position_ids: np.ndarray | None,
              extra: dict[str, np.ndarray] | None, call_length: int | None = None) -> tuple[dict[str, np.ndarray], int,
                                                                                           int]:
        """The graph's inputs for `embeds` [S, hidden] in the next S positions of the current slot (whose rotary
        positions and next position are updated); returns (feed, start, S). `call_length`: the sequence's length
        once the whole call this is part of is done (a prompt's, for each of its chunks)."""
        slot = self.slot
        s, start = embeds.shape[0], len(slot)
        if start + s > self.seq_length:
            raise EdgeLLMError(f"context full: {start + s} positions needed, the bundle holds {self.seq_length}")
        if position_ids is None:
            after = slot.next_position + s
            steps = np.arange(slot.next_position, after, dtype=np.int64)[None]
            position_ids = steps if len(slot.positions) == 1 else np.repeat(steps, len(slot.positions), axis=0)
        else:
            after = max(slot.next_position, int(position_ids.max()) + 1)
        slot.positions[:, start:start + s] = position_ids
        slot.next_position = after
        feed: dict[str, np.ndarray] = {"inputs_embeds": np.ascontiguousarray(embeds[None], np.float32),
                "position_ids": np.ascontiguousarray(position_ids, np.int64),
                "seqlens_k": np.array([start + s - 1], np.int32),
                "total_sequence_length": np.array(start + s, np.int32),
                "logits_index": np.ascontiguousarray(logits_index, np.int64)}
        if self.rotary_switch is not None:
            feed[ROTARY_LENGTH] = np.array(max(call_length or 0, start + s), np.int32)
        for name, value in (self.extension.inputs(s, []) if extra is None else extra).items():
            feed[name] = np.ascontiguousarray(value)
        return feed, start, s

    def forward(self, embeds: np.ndarray, logits_index: np.ndarray, token_ids=None,
                position_ids: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None,
                call_length: int | None = None) -> np.ndarray:
        """Run `embeds` [S, hidden] in the next S positions of the current slot, at `position_ids` ([rows, S]; by
        default those that follow the cache), with the family's `extra` inputs (by default the extension's for no
        media); returns logits [len(logits_index), vocab]."""
        feed, start, s = self._feed(embeds, logits_index, position_ids, extra, call_length)
        logits = self.runner.forward(feed, self.slot.index, start, s, logits_index)
        self.slot.tokens.extend([-1] * s if token_ids is None else [int(t) for t in token_ids])
        return logits

    def _submit(self, embeds: np.ndarray, logits_index: np.ndarray, token_ids, position_ids: np.ndarray,
                extra: dict[str, np.ndarray], call_length: int | None = None) -> Future:
        """forward() through a staged decoder's pipeline (inside its runner's pipelined()): the future of its
        logits."""
        feed, _, s = self._feed(embeds, logits_index, position_ids, extra, call_length)
        logits = self.runner.submit(feed, self.slot.index, logits_index)
        self.slot.tokens.extend([-1] * s if token_ids is None else [int(t) for t in token_ids])
        return logits

    def decode_batch(self, slots: list[Slot], token_ids: list[int]) -> np.ndarray:
        """One token for each of `slots` (neighbouring places of the cache, in order) in one graph call; returns
        their logits [len(slots), vocab]. Each sequence attends to its own positions only."""
        k, first = len(slots), slots[0].index
        if [s.index for s in slots] != list(range(first, first + k)):
            raise ValueError("decode_batch takes slots at neighbouring places of the cache, in order")
        if k == 1:  # the one-sequence path (also the one for decoders without a batch dimension)
            with self.using(slots[0]):
                return self.decode(token_ids[0])[None]
        if self.rotary_switch is not None and len({len(s) + 1 > self.rotary_switch for s in slots}) > 1:
            # sequences on both sides of a LongRoPE decoder's trained length: each on its own tables, as alone
            out = []
            for slot, token in zip(slots, token_ids):
                with self.using(slot):
                    out.append(self.decode(token))
            return np.stack(out)
        if self.rotary_switch is not None:  # (once in a sequence's life: past the trained length)
            for slot in slots:
                with self.using(slot):
                    self.outgrow_short_tables(1)
        lengths = np.array([len(s) for s in slots], np.int32)
        if lengths.max() >= self.seq_length:
            raise EdgeLLMError(f"context full: the bundle holds {self.seq_length} positions")
        steps = np.array([[s.next_position] for s in slots], np.int64)
        feed: dict[str, np.ndarray] = {
            "inputs_embeds": np.ascontiguousarray(self.embed(token_ids)[:, None], np.float32),
            "position_ids": steps, "seqlens_k": lengths, "total_sequence_length": np.array(lengths.max() + 1, np.int32),
            "logits_index": np.zeros(1, np.int64)}
        if self.rotary_switch is not None:  # the batch's longest sequence decides (transformers' position_ids.max())
            feed[ROTARY_LENGTH] = np.array(lengths.max() + 1, np.int32)
        logits = self.runner.decode_batch(feed, first, first + k)[:, 0]
        for slot, token, step in zip(slots, token_ids, steps[:, 0]):
            slot.positions[:, len(slot)] = step
            slot.next_position = int(step) + 1
            slot.tokens.append(self.table_keys([int(token)], int(lengths.max()) + 1)[0])
        return logits

    def prefill(self, token_ids: list[int], all_logits: bool = False,
                on_chunk: Callable[[int, int], None] | None = None, media: list | None = None,
                positions: np.ndarray | None = None, cache: PromptCache | None = None) -> np.ndarray:
        """Compute the tokens after the reusable prefix (the current slot's, or a longer one from `cache`) in chunks;
        returns the last position's logits, or every new position's when all_logits (then nothing is reused)."""
        # a decoder written as stages: stage k+1 of a chunk runs beside stage k of the next (each stage's own
        # worker); the Batcher's chunks (prefill_chunks) stay in turn, between its decode steps
        staged = self.runner if self.runner.pipelines and not all_logits else None
        with staged.pipelined() if staged else nullcontext():
            chunks = Chunks(self._chunks(token_ids, all_logits, media, positions, cache, pipelined=bool(staged)))
            for done, todo in chunks:
                if on_chunk:
                    on_chunk(done, todo)
        return chunks.logits

    def prefill_chunks(self, token_ids: list[int], all_logits: bool = False, media: list | None = None,
                       positions: np.ndarray | None = None, cache: PromptCache | None = None) -> Chunks:
        """prefill() one chunk per step: each next() computes a chunk of the current slot (the caller sets the
        slot for each: the server runs other sequences' decode steps between chunks) and gives (tokens done,
        tokens to do); the logits are the iterator's `logits` once it is exhausted.

        media: (slots, key, features) per image or video: features() -> {vision output: [tokens, ...]}, whose
        "image_embeds" rows replace the token embeddings at those prompt positions (the rest go to the family's
        extension); the cache records `key` there, so a different image is never mistaken for a cached one.
        features() is only called when a chunk to compute holds some of those positions.
        positions: rotary positions [rows, len(token_ids)] of the prompt (None: 0, 1, 2, ...)."""
        return Chunks(self._chunks(token_ids, all_logits, media, positions, cache))

    def _chunks(self, token_ids, all_logits, media, positions, cache, pipelined: bool = False):
        keys = list(token_ids)
        for slots, key, _ in media or ():
            for p in slots:
                keys[p] = key
        keys = self.table_keys(keys, len(keys))
        if all_logits:
            self.reset()
        if positions is None:
            positions = self.text_positions(len(keys))
        if cache is not None and not all_logits and self.slot.adapter is None:  # the cache holds base-model KV
            entry, n = cache.longest(keys, positions, len(keys) - 1)
            if entry is not None and n > common_prefix(self.slot, keys, positions, len(keys) - 1):
                self.restore(entry, n)
        self.reused = 0 if all_logits else self.reuse_prefix(keys, positions)
        # (reuse never stops inside an image: all its slots hold the same key)
        media_positions = np.sort(np.concatenate([slots for slots, _, _ in media])) if media else np.zeros(0, int)
        start = self.length
        if len(keys) > self.seq_length:
            raise EdgeLLMError(f"prompt is {len(token_ids)} tokens but this bundle holds at most "
                               f"{self.seq_length} (its --seq-length); shorten the prompt or reconvert with a "
                               "larger --seq-length")
        outputs: list = []  # arrays, or (pipelined) futures of them
        todo = len(keys) - start
        begin = start
        while begin < len(keys):
            end = self.extension.chunk_end(media_positions, min(begin + self.chunk_length, len(keys)), len(keys))
            embeds = self.embed(token_ids[begin:end])
            in_chunk = []
            for slots, _, features in media or ():
                inside = (slots >= begin) & (slots < end)
                if inside.any():
                    picked = {name: value[inside] for name, value in features().items()}
                    at = slots[inside] - begin
                    embeds[at] = picked.pop("image_embeds")
                    in_chunk.append((at, picked))
            index = np.arange(end - begin) if all_logits else np.array([end - begin - 1])
            compute = self._submit if pipelined else self.forward
            outputs.append(compute(embeds, index, keys[begin:end], positions[:, begin:end],
                                   self.extension.inputs(end - begin, in_chunk), len(keys)))
            begin = end
            yield end - start, todo
        if all_logits:
            return np.concatenate(outputs)
        last = outputs[-1].result() if isinstance(outputs[-1], Future) else outputs[-1]
        return last[-1]

    def verify(self, token_ids: list[int]) -> np.ndarray:
        """Run several tokens at once after the cache, with logits for each: [len(token_ids), vocab]."""
        self.outgrow_short_tables(len(token_ids))
        return self.forward(self.embed(token_ids), np.arange(len(token_ids)),
                            self.table_keys(list(token_ids), self.length + len(token_ids)))

    def decode(self, token_id: int) -> np.ndarray:
        self.outgrow_short_tables(1)
        return self.forward(self.embed([token_id]), np.zeros(1, np.int64),
                            self.table_keys([token_id], self.length + 1))[0]


class Chunks:
    """Engine.prefill_chunks' iterator: (done, to do) per chunk; `logits` once exhausted."""

    def __init__(self, steps):
        self.steps, self.logits = steps, None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.steps)
        except StopIteration as end:
            self.logits = end.value
            raise

    def close(self) -> None:
        self.steps.close()
