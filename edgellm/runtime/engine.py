"""The decoder session: a KV cache preallocated to the bundle's length, chunked prefill and one-token decode.

The KV cache is one numpy array. Each layer's key and value slices are bound as both the graph's past and present
tensors, so GroupQueryAttention appends new positions in place: nothing is copied or reallocated per token.
The engine remembers which token sits at each cached position, so a new prompt that starts like the cached one
(the next turn of a chat, a repeated system prompt) prefills only what differs; a PromptCache keeps copies of
earlier sequences' positions to start from. A cache of several slots holds several sequences, which decode together
in one graph call (`decode_batch`: the server's continuous batching) where the decoder has a batch dimension.
What a family's decoder takes beyond the contract (extra inputs, media spans a chunk must keep whole) comes from its
processor's DecoderExtension.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..format import DECODER_GRAPH, STEP_GRAPH, Bundle, EmbeddingTable
from ..kernels import KernelUse, library_path, swap
from ..kernels import status as kernel_status
from ..vision.processor import DecoderExtension, Processor
from .memory import default_slots
from .prompt_cache import CachedSequence, PromptCache

# Device openvino: chunks shorter than this (decode, speculative checks) stay on ONNX Runtime, faster at few rows;
# prefill runs in chunks of OPENVINO_CHUNK (or the bundle's longer --chunk-length), where OpenVINO gains the most.
MIN_OPENVINO_ROWS = 64
OPENVINO_CHUNK = 512
# ONNX Runtime's providers per device; "openvino" keeps ONNX Runtime's CPU session for decoding (see openvino.py)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "openvino": ["CPUExecutionProvider"]}
DEVICES = tuple(PROVIDERS)


def default_threads() -> int:
    """Physical cores available to this process (hyper-threads slow ONNX Runtime's matmuls down)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = len(siblings.replace("-", ",").split(",")) if siblings.strip() else 1
    except OSError:
        per_core = 1
    return max(1, available // max(1, per_core))


def check_device(device: str) -> None:
    if device not in PROVIDERS:
        raise EdgeLLMError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EdgeLLMError("device cuda asked for, but this onnxruntime has no CUDA provider "
                           "(pip install onnxruntime-gpu)")


def open_session(path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for unreadable graphs
        raise EdgeLLMError(f"{path}: ONNX Runtime could not load the graph ({e})") from e


def open_graph(bundle: Bundle, name: str, options: ort.SessionOptions, providers: list[str],
               kernels: KernelUse | None = None) -> ort.InferenceSession:
    """A session of the bundle's graph file `name`; an encrypted bundle's graph and its data file are decrypted into
    memory and handed to ONNX Runtime from there (nothing decrypted is written anywhere). On the CPU provider its
    MatMulNBits run on edgellm's own kernels where they are in use (`kernels` records what ran)."""
    encrypted = bundle.is_encrypted(name)
    model = bytes(bundle.read(name)) if encrypted else None
    if providers[0] == "CPUExecutionProvider":
        use = kernels or KernelUse(kernel_status())
        swapped = swap(model if encrypted else bundle.file(name).read_bytes(), use)
        if swapped is not None:
            options.register_custom_ops_library(str(library_path()))
            if not encrypted:  # the data file stays where the graph names it
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(bundle.file(name).parent))
            model = swapped
    if encrypted:
        data = [f for f in bundle.manifest.files if f == f"{name}.data"]
        buffers = [np.frombuffer(bundle.read(f), np.uint8) for f in data]
        if data:
            options.add_external_initializers_from_files_in_memory(data, buffers, [b.nbytes for b in buffers])
    if model is None:
        return open_session(bundle.file(name), options, providers)
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:
        raise EdgeLLMError(f"{bundle.file(name)}: ONNX Runtime could not load the graph ({e})") from e


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zeroed array whose memory becomes resident page by page as it is written: the KV cache costs
    what the conversation fills, not the bundle's whole length. (numpy asks for transparent huge pages on large
    arrays; their first write commits 2 MiB, so one token written into every head's slice made all of it resident.)"""
    count, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    buffer = mmap.mmap(-1, max(1, count * size), **private)  # anonymous: zeroed, committed on first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def session_options(threads: int | None, spinning: bool, profile_prefix: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning pool wins a little when the cores are idle and loses several-fold when they are shared.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


class Slot:
    """One sequence's place in the KV cache (`index`): which token, or image key, fills each position, at which
    rotary positions (one row, or several axes: after an image those fall behind the position index), and where
    decoding continues (the largest position + 1)."""

    def __init__(self, index: int, rows: int, seq_length: int):
        self.index = index
        self.tokens: list[int] = []
        self.positions = np.zeros((rows, seq_length), np.int64)
        self.next_position = 0
        self.adapter: str | None = None  # the LoRA adapter its keys and values were computed with (LoRA slots)

    def __len__(self) -> int:
        return len(self.tokens)


class Engine:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, spinning: bool = True,
                 profile_prefix: str | None = None, processor: Processor | None = None, slots: int | None = 1,
                 stage_devices: list[str] | None = None):
        """`device` as check_device has accepted it (Model checks it before anything loads); `slots`: sequences the
        cache holds (more than one needs a decoder with a batch dimension, `batched`, on ONNX Runtime; None: as many
        as memory.default_slots finds room for where the decoder can batch, else 1); `stage_devices`: one device
        per stage of a decoder written as stages (convert --num-device)."""
        m = bundle.manifest.model
        if device == "openvino" and bundle.manifest.quantization.kv_cache != "f32":
            raise EdgeLLMError(f"device openvino cannot run this bundle's {bundle.manifest.quantization.kv_cache} KV "
                               "cache (OpenVINO's GroupQueryAttention ignores the cache's scales); use device cpu, or "
                               "reconvert without --kv-cache")
        self.bundle = bundle
        self.seq_length = bundle.manifest.seq_length
        self.chunk_length = bundle.manifest.chunk_length
        decoder = bundle.file(bundle.manifest.graphs[DECODER_GRAPH])
        stage_files = bundle.manifest.decoder_stages
        stage_devices = stage_devices or [device]
        if len(stage_devices) > 1 and len(stage_devices) != len(stage_files):
            raise EdgeLLMError(f"this bundle's decoder is split for {len(stage_files)} devices; give "
                               f"{len(stage_files)} (-c {','.join(['cpu'] * len(stage_files))}) or one"
                               if len(stage_files) > 1 else "this bundle's decoder is one graph: write it as stages "
                               "for several devices with `edgellm convert --num-device N`")
        if len(stage_files) > 1 and "openvino" in stage_devices + [device]:
            raise EdgeLLMError("device openvino does not run a decoder written as stages yet; use cpu devices")
        # one session (and thread pool) per stage, on its device; stage 0 is "the" decoder session. Stages run in
        # turn, so a pool that spins while another stage computes takes its cores: no spinning when there are several
        spins = spinning and len(stage_files) == 1
        self.kernels = KernelUse(kernel_status())  # which kernels run the decoder's matmuls
        self.stages = [open_graph(bundle, name, session_options(threads, spins, profile_prefix if k == 0 else None),
                                  PROVIDERS[stage_devices[k] if len(stage_devices) > 1 else device], self.kernels)
                       for k, name in enumerate(stage_files)]
        self.session = self.stages[0]
        self.stage_inputs = [[i.name for i in st.get_inputs() if not i.name.startswith(("past_", "lora_"))]
                             for st in self.stages]
        self._pipeline: StagePipeline | None = None  # set while prefill() pipelines a staged decoder's chunks
        # LoRA slots (convert --lora-slots): adapters by name, each {graph input: its array for one sequence}
        self.lora = bundle.manifest.lora
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self.stage_layers = [sorted(int(i.name.split(".")[1]) for i in st.get_inputs()
                                    if i.name.startswith("past_key.")) for st in self.stages]
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.batched = not isinstance(inputs["inputs_embeds"][0], int)
        # a fixed-shape bundle (convert --static): a chunk graph of fixed_rows rows, run padded, and a one-row graph
        rows_in = inputs["inputs_embeds"][1]
        self.fixed_rows = rows_in if isinstance(rows_in, int) else None
        self.step_session = None
        if STEP_GRAPH in bundle.manifest.graphs:
            if device == "openvino":
                raise EdgeLLMError("device openvino does not run --static bundles yet; use device cpu")
            self.step_session = open_graph(bundle, bundle.manifest.graphs[STEP_GRAPH],
                                           session_options(threads, spinning), PROVIDERS[device], self.kernels)
        can_batch = self.batched and device != "openvino"
        if slots is None:
            slots = default_slots(bundle, device) if can_batch else 1
        if slots > 1 and not can_batch:
            raise EdgeLLMError("this bundle's decoder runs one sequence at a time (a vision model with its own "
                               "position axes, or a bundle converted before decoders had a batch axis: reconvert "
                               "it)" if not self.batched else
                               "device openvino runs one sequence at a time; use device cpu to decode several")
        self.openvino = None
        if device == "openvino":
            from .openvino import CompiledGraph

            self.openvino = CompiledGraph(decoder, threads or default_threads())
            self.chunk_length = max(self.chunk_length, OPENVINO_CHUNK)
        self.embeddings = EmbeddingTable(bundle.path, bundle.manifest.embeddings,
                                         bundle.read if bundle.encrypted else None)
        self.layers, self.vocab_size = m.num_hidden_layers, m.vocab_size
        self.kv = lazy_zeros((self.layers, 2, slots, m.num_key_value_heads, self.seq_length, m.head_dim),
                             bundle.manifest.quantization.kv_dtype)
        # (first slot, end, one-row graph, stage, the slots' adapters) -> (its session, the binding, the one-position
        # logits buffer and value, the LoRA inputs' arrays it binds)
        self._bindings: dict[tuple, tuple] = {}
        rows = 1 if self.batched else inputs["position_ids"][0]
        self.slots = [Slot(i, rows, self.seq_length) for i in range(slots)]
        self.slot = self.slots[0]  # the sequence prefill, forward, decode and verify work on
        self.reused = 0  # positions the last prefill took from the cache
        self.extension = processor.decoder_extension(inputs) if processor else DecoderExtension()
        if self.openvino is not None and self.seq_length >= MIN_OPENVINO_ROWS:
            # OpenVINO prepares its weights on the first run (seconds for a 1B model): at load, not at the first prompt
            self.forward(np.zeros((MIN_OPENVINO_ROWS, m.hidden_size), np.float32), np.zeros(1, np.int64))
            self.reset()

    def _bound(self, first: int, end: int, step: bool = False, stage: int = 0) -> tuple:
        """A binding of the cache slots first..end-1 as every layer's past and present (so the graph appends in
        place), with a fixed buffer for one-position logits: made once per slot range and graph (`step`: a
        --static bundle's one-row graph; `stage`: a stage of a decoder written as stages, binding its layers)."""
        adapters = tuple(self._slot_at(i).adapter for i in range(first, end)) if self.lora else ()
        key = (first, end, step, stage, adapters)
        if key not in self._bindings:
            session = self.step_session if step else self.stages[stage]
            binding = session.io_binding()
            for i in range(self.layers) if step else self.stage_layers[stage]:
                for j, kind in enumerate(("key", "value")):
                    value = ort.OrtValue.ortvalue_from_numpy(self.kv[i, j, first:end])
                    binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                    binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
            kept = []  # the LoRA inputs' arrays, alive as long as the binding
            for name in (i.name for i in session.get_inputs() if i.name.startswith("lora_")):
                kept.append(np.ascontiguousarray(np.stack([self._lora_array(a, name) for a in adapters])))
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(kept[-1]))
            logits = np.zeros((end - first, 1, self.vocab_size), np.float32)
            self._bindings[key] = session, binding, logits, ort.OrtValue.ortvalue_from_numpy(logits), kept
        return self._bindings[key][:4]

    def _slot_at(self, index: int) -> Slot:
        return next(s for s in self.slots if s.index == index)

    def _lora_array(self, adapter: str | None, name: str) -> np.ndarray:
        """An adapter's A [in, rank] or B [rank, out] for the graph input `name` (zeros where it adapts nothing)."""
        if adapter is not None and name in self.adapters[adapter]:
            return self.adapters[adapter][name]
        k, n = self.lora["shapes"][name.split(".", 1)[1]]
        return np.zeros((k, self.lora["rank"]) if name.startswith("lora_a.") else (self.lora["rank"], n), np.float32)

    def add_adapter(self, name: str, modules: dict) -> None:
        """Make an adapter (format.adapters' modules: A, B and scale per projection) loadable by name into the
        bundle's LoRA slots; one clear error for one it cannot hold."""
        if not self.lora:
            raise EdgeLLMError("this bundle has no LoRA slots: convert it with --lora-slots N (or merge the adapter "
                               "with --lora)")
        if name not in self.adapters and len(self.adapters) >= self.lora["slots"]:
            raise EdgeLLMError(f"the bundle's {self.lora['slots']} LoRA slot(s) are full; convert with more "
                               "--lora-slots")
        rank, arrays = self.lora["rank"], {}
        for module, (a, b, scale) in modules.items():
            if module not in self.lora["shapes"]:
                covered = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in self.lora["shapes"]}))
                raise EdgeLLMError(f"the adapter changes {module}, which the bundle's LoRA slots do not cover (they "
                                   f"cover {covered})")
            k, n = self.lora["shapes"][module]
            if (b.shape[0], a.shape[1]) != (n, k):
                raise EdgeLLMError(f"the adapter's {module} is {b.shape[0]}x{a.shape[1]}, the bundle's {n}x{k}: an "
                                   "adapter of another model")
            if a.shape[0] > rank:
                raise EdgeLLMError(f"the adapter's rank {a.shape[0]} is more than the bundle's LoRA slots hold "
                                   f"({rank}); convert with a larger --lora-max-rank")
            pad = rank - a.shape[0]
            arrays[f"lora_a.{module}"] = np.pad(a.T, ((0, 0), (0, pad))).astype(np.float32)
            arrays[f"lora_b.{module}"] = np.pad((b * scale).T, ((0, pad), (0, 0))).astype(np.float32)
        self.adapters[name] = arrays
        self._bindings = {k: v for k, v in self._bindings.items() if name not in k[4]}  # a reloaded adapter

    def check_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            raise EdgeLLMError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")

    def set_adapter(self, name: str | None) -> None:
        """The adapter the current slot computes with from now on; its cache was computed with another: dropped."""
        self.check_adapter(name)
        if self.slot.adapter != name:
            self.reset()
            self.slot.adapter = name

    # the current slot's state, under the names the one-sequence engine has always had
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
        self.slot.tokens, self.slot.next_position = [], 0

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
        slot = self.slot
        del slot.tokens[length:]
        slot.next_position = int(slot.positions[:, :length].max()) + 1 if length else 0

    def move(self, slot: Slot, free: Slot) -> None:
        """Move `slot`'s sequence to `free`'s place in the cache (so that the sequences that decode together hold
        neighbouring places): the two exchange indices, and `free` is left empty at `slot`'s former one."""
        n = len(slot)
        self.kv[:, :, free.index, :, :n] = self.kv[:, :, slot.index, :, :n]
        slot.index, free.index = free.index, slot.index
        free.tokens, free.next_position = [], 0

    def snapshot(self, slot: Slot | None = None) -> CachedSequence:
        """A copy of a slot's cached positions (its keys, rotary positions and keys and values), for a PromptCache."""
        slot = slot or self.slot
        n = len(slot)
        return CachedSequence(np.array(slot.tokens, np.int64), slot.positions[:, :n].copy(), slot.next_position,
                              np.ascontiguousarray(self.kv[:, :, slot.index, :, :n]))

    def restore(self, entry: CachedSequence, length: int) -> None:
        """Fill the current slot with the first `length` positions of a PromptCache entry."""
        slot = self.slot
        self.kv[:, :, slot.index, :, :length] = entry.kv[:, :, :, :length]
        slot.tokens = [int(t) for t in entry.keys[:length]]
        slot.positions[:, :length] = entry.positions[:, :length]
        self.truncate(length)

    def forward(self, embeds: np.ndarray, logits_index: np.ndarray, token_ids=None,
                position_ids: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run `embeds` [S, hidden] in the next S positions of the current slot, at `position_ids` ([rows, S]; by
        default those that follow the cache), with the family's `extra` inputs (by default the extension's for no
        media); returns logits [len(logits_index), vocab]."""
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
        feed = {"inputs_embeds": np.ascontiguousarray(embeds[None], np.float32),
                "position_ids": np.ascontiguousarray(position_ids, np.int64),
                "seqlens_k": np.array([start + s - 1], np.int32),
                "total_sequence_length": np.array(start + s, np.int32),
                "logits_index": np.ascontiguousarray(logits_index, np.int64)}
        for name, value in (self.extension.inputs(s, []) if extra is None else extra).items():
            feed[name] = np.ascontiguousarray(value)
        if self.fixed_rows is not None:
            logits = self._run_fixed(feed, start, s, logits_index)
        elif self.openvino is not None and s >= MIN_OPENVINO_ROWS:
            logits = self._run_openvino(feed, start, s)
        else:
            logits = self._run(feed, slot.index, slot.index + 1, len(logits_index) == 1)
            logits = logits if isinstance(logits, Future) else logits[0]  # (a pipelined chunk's: to come)
        slot.tokens.extend([-1] * s if token_ids is None else [int(t) for t in token_ids])
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
        lengths = np.array([len(s) for s in slots], np.int32)
        if lengths.max() >= self.seq_length:
            raise EdgeLLMError(f"context full: the bundle holds {self.seq_length} positions")
        steps = np.array([[s.next_position] for s in slots], np.int64)
        feed = {"inputs_embeds": np.ascontiguousarray(self.embed(token_ids)[:, None], np.float32),
                "position_ids": steps, "seqlens_k": lengths, "total_sequence_length": np.array(lengths.max() + 1,
                                                                                                np.int32),
                "logits_index": np.zeros(1, np.int64)}
        logits = self._run(feed, first, first + k, single=True)[:, 0]
        for slot, token, step in zip(slots, token_ids, steps[:, 0]):
            slot.positions[:, len(slot)] = step
            slot.next_position = int(step) + 1
            slot.tokens.append(int(token))
        return logits

    def _run(self, feed: dict[str, np.ndarray], first: int, end: int, single: bool, step: bool = False) -> np.ndarray:
        """The decoder on cache slots first..end-1: one graph, or its stages in turn, each on its own session,
        handing on the hidden state and residual stream (as arrays: the stages may sit on different devices)."""
        if step or len(self.stages) == 1:
            return self._run_onnxruntime(feed, self._bound(first, end, step), single)
        if self._pipeline is not None:  # a prefill chunk, handed to the stages' workers (StagePipeline)
            return self._pipeline.submit(self, feed, first, end, single)
        carried = {}
        for k in range(len(self.stages)):
            carried = self._run_stage(k, feed, carried, first, end, single)
        return carried

    def _run_stage(self, k: int, feed: dict, carried: dict, first: int, end: int, single: bool):
        """Stage k on `feed` and the previous stage's hand-over: the next hand-over, or (the last stage) logits."""
        if k == len(self.stages) - 1:
            last = {name: carried.get(name, feed.get(name)) for name in self.stage_inputs[-1]}
            return self._run_onnxruntime(last, self._bound(first, end, stage=k), single)
        session, b, _, _ = self._bound(first, end, stage=k)
        for name in self.stage_inputs[k]:
            b.bind_cpu_input(name, carried.get(name, feed.get(name)))
        b.bind_output("next_hidden")
        b.bind_output("next_residual")
        session.run_with_iobinding(b)
        outputs = b.get_outputs()
        return {"hidden": outputs[-2].numpy(), "residual": outputs[-1].numpy()}

    def _run_onnxruntime(self, feed: dict[str, np.ndarray], bound, single: bool) -> np.ndarray:
        session, b, step_logits, step_value = bound
        for name, value in feed.items():
            b.bind_cpu_input(name, value)
        if single:
            b.bind_ortvalue_output("logits", step_value)
        else:
            b.bind_output("logits")
        session.run_with_iobinding(b)
        return step_logits.copy() if single else b.get_outputs()[-1].numpy()

    def _run_fixed(self, feed: dict[str, np.ndarray], start: int, s: int, logits_index: np.ndarray) -> np.ndarray:
        """A --static bundle's run: more rows than one, with the logits of one of them, through the chunk graph,
        padded to its rows after the real ones (their keys and values land past the sequence, where the next
        tokens overwrite them; causal attention keeps them out of the real rows); otherwise (one row, the logits of
        several, or no room left for a whole chunk) row by row through the one-row graph. Returns the logits at
        `logits_index`."""
        slot, rows = self.slot.index, self.fixed_rows
        if s == 1 or len(logits_index) > 1 or start + rows > self.seq_length:
            out = []
            for r in range(s):
                one = {**feed, "inputs_embeds": feed["inputs_embeds"][:, r:r + 1],
                       "position_ids": feed["position_ids"][:, r:r + 1], "seqlens_k": np.array([start + r], np.int32),
                       "total_sequence_length": np.array(start + r + 1, np.int32),
                       "logits_index": np.zeros(1, np.int64)}
                out.append(self._run(one, slot, slot + 1, single=True, step=True)[0, 0])
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
        return self._run(padded, slot, slot + 1, single=True)[0]

    def _run_openvino(self, feed: dict[str, np.ndarray], start: int, s: int) -> np.ndarray:
        """The chunk on OpenVINO (one slot): it reads the cache's layers in place and returns each layer's keys and
        values up to the chunk's end, of which the chunk's own rows are copied into the cache."""
        for i in range(self.layers):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = self.kv[i, 0], self.kv[i, 1]
        out = self.openvino.run(feed)
        for i in range(self.layers):
            self.kv[i, 0, ..., start:start + s, :] = out[f"present_key.{i}"][..., start:start + s, :]
            self.kv[i, 1, ..., start:start + s, :] = out[f"present_value.{i}"][..., start:start + s, :]
        return out["logits"][0]

    def prefill(self, token_ids: list[int], all_logits: bool = False,
                on_chunk: Callable[[int, int], None] | None = None, media: list | None = None,
                positions: np.ndarray | None = None, cache: PromptCache | None = None) -> np.ndarray:
        """Compute the tokens after the reusable prefix (the current slot's, or a longer one from `cache`) in chunks;
        returns the last position's logits, or every new position's when all_logits (then nothing is reused)."""
        # a decoder written as stages: stage k+1 of a chunk runs beside stage k of the next (each stage's own
        # worker); the Batcher's chunks (prefill_chunks) stay in turn, between its decode steps
        self._pipeline = StagePipeline(len(self.stages)) if len(self.stages) > 1 and not all_logits else None
        try:
            chunks = self.prefill_chunks(token_ids, all_logits, media, positions, cache)
            for done, todo in chunks:
                if on_chunk:
                    on_chunk(done, todo)
        finally:
            pipeline, self._pipeline = self._pipeline, None
            if pipeline is not None:
                pipeline.close()
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

    def _chunks(self, token_ids, all_logits, media, positions, cache):
        keys = list(token_ids)
        for slots, key, _ in media or ():
            for p in slots:
                keys[p] = key
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
        outputs, todo = [], len(keys) - start
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
            outputs.append(self.forward(embeds, index, keys[begin:end], positions[:, begin:end],
                                        self.extension.inputs(end - begin, in_chunk)))
            begin = end
            yield end - start, todo
        if all_logits:
            return np.concatenate(outputs)
        last = outputs[-1].result()[0] if isinstance(outputs[-1], Future) else outputs[-1]
        return last[-1]

    def verify(self, token_ids: list[int]) -> np.ndarray:
        """Run several tokens at once after the cache, with logits for each: [len(token_ids), vocab]."""
        return self.forward(self.embed(token_ids), np.arange(len(token_ids)), token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward(self.embed([token_id]), np.zeros(1, np.int64), [token_id])[0]


class StagePipeline:
    """Prefill chunks through the stages of a decoder written as stages, one worker thread per stage: stage k of a
    chunk starts once stage k-1 of it and stage k of the chunk before are done, so consecutive chunks overlap
    (ONNX Runtime releases the GIL while a session runs)."""

    def __init__(self, stages: int):
        self.workers = [ThreadPoolExecutor(1, thread_name_prefix=f"edgellm-stage{k}") for k in range(stages)]
        self.futures: list[Future] = []

    def submit(self, engine: Engine, feed: dict, first: int, end: int, single: bool) -> Future:
        """The chunk's stages queued in order; the future of its logits."""
        previous = None
        for k, worker in enumerate(self.workers):
            previous = worker.submit(lambda k=k, before=previous: engine._run_stage(
                k, feed, before.result() if before else {}, first, end, single))
            self.futures.append(previous)
        return previous

    def close(self) -> None:
        """Wait for every queued stage; the first error of any, raised."""
        for worker in self.workers:
            worker.shutdown(wait=True)
        for future in self.futures:
            if future.exception() is not None:
                raise future.exception()


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


def common_prefix(slot: Slot, keys, positions: np.ndarray, limit: int) -> int:
    """How many of `keys` (at rotary `positions`) the slot holds from its start, at most `limit`."""
    limit = min(len(slot), len(keys), limit)
    if limit <= 0:
        return 0
    same = np.asarray(slot.tokens[:limit]) == np.asarray(keys[:limit])
    same &= (slot.positions[:, :limit] == positions[:, :limit]).all(axis=0)
    return limit if same.all() else int(np.argmin(same))
