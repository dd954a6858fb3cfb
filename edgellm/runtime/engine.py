"""The decoder session: a KV cache preallocated to the bundle's length, chunked prefill and one-token decode.

The KV cache is one numpy array. Each layer's key and value slices are bound as both the graph's past and present
tensors, so GroupQueryAttention appends new positions in place: nothing is copied or reallocated per token.
The engine remembers which token sits at each cached position, so a new prompt that starts like the cached one
(the next turn of a chat, a repeated system prompt) prefills only what differs. What a family's decoder takes beyond
the contract (extra inputs, media spans a chunk must keep whole) comes from its processor's DecoderExtension.
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..format import DECODER_GRAPH, Bundle, EmbeddingTable
from ..vision.processor import DecoderExtension, Processor

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


class Engine:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int | None = None, spinning: bool = True,
                 profile_prefix: str | None = None, processor: Processor | None = None):
        """`device` as check_device has accepted it (Model checks it before anything loads)."""
        m = bundle.manifest.model
        if device == "openvino" and bundle.manifest.quantization.kv_cache != "f32":
            raise EdgeLLMError(f"device openvino cannot run this bundle's {bundle.manifest.quantization.kv_cache} KV "
                               "cache (OpenVINO's GroupQueryAttention ignores the cache's scales); use device cpu, or "
                               "reconvert without --kv-cache")
        self.bundle = bundle
        self.seq_length = bundle.manifest.seq_length
        self.chunk_length = bundle.manifest.chunk_length
        decoder = bundle.file(bundle.manifest.graphs[DECODER_GRAPH])
        self.session = open_session(decoder, session_options(threads, spinning, profile_prefix), PROVIDERS[device])
        self.openvino = None
        if device == "openvino":
            from .openvino import CompiledGraph

            self.openvino = CompiledGraph(decoder, threads or default_threads())
            self.chunk_length = max(self.chunk_length, OPENVINO_CHUNK)
        self.embeddings = EmbeddingTable(bundle.path, bundle.manifest.embeddings)
        layers = m.num_hidden_layers
        self.kv = lazy_zeros((layers, 2, 1, m.num_key_value_heads, self.seq_length, m.head_dim),
                             bundle.manifest.quantization.kv_dtype)
        self.binding = self.session.io_binding()
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self.kv[i, j])
                self.binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                self.binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
        # One-token decode writes its logits into this fixed buffer; other calls let ORT size the output.
        self.step_logits = np.zeros((1, 1, m.vocab_size), np.float32)
        self.step_logits_value = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
        self.reused = 0  # positions the last prefill took from the cache
        self.tokens: list[int] = []  # what fills the cache, slot by slot (negative keys for image embeddings)
        # Each slot's rotary positions (one row, or several axes: after an image those fall behind the slot index),
        # and where decoding continues: the largest position + 1.
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.positions = np.zeros((inputs["position_ids"][0], self.seq_length), np.int64)
        self.next_position = 0
        self.extension = processor.decoder_extension(inputs) if processor else DecoderExtension()
        if self.openvino is not None and self.seq_length >= MIN_OPENVINO_ROWS:
            # OpenVINO prepares its weights on the first run (seconds for a 1B model): at load, not at the first prompt
            self.forward(np.zeros((MIN_OPENVINO_ROWS, m.hidden_size), np.float32), np.zeros(1, np.int64))
            self.reset()

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens, self.next_position = [], 0

    def embed(self, token_ids) -> np.ndarray:
        return self.embeddings[token_ids]

    def reuse_prefix(self, token_ids: list[int], positions: np.ndarray) -> int:
        """Keep the cached slots that hold the start of `token_ids` at the same rotary positions; at least one token
        is left to compute."""
        n, limit = 0, min(len(self.tokens), len(token_ids) - 1)
        while n < limit and self.tokens[n] == token_ids[n] and (self.positions[:, n] == positions[:, n]).all():
            n += 1
        self.truncate(n)
        return n

    def truncate(self, length: int) -> None:
        """Forget the cache after its first `length` slots (their keys and values are overwritten later)."""
        del self.tokens[length:]
        self.next_position = int(self.positions[:, :length].max()) + 1 if length else 0

    def forward(self, embeds: np.ndarray, logits_index: np.ndarray, token_ids=None,
                position_ids: np.ndarray | None = None, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Run `embeds` [S, hidden] in the next S cache slots, at `position_ids` ([rows, S]; by default those that
        follow the cache), with the family's `extra` inputs (by default the extension's for no media); returns
        logits [len(logits_index), vocab]."""
        s, start = embeds.shape[0], self.length
        if start + s > self.seq_length:
            raise EdgeLLMError(f"context full: {start + s} positions needed, the bundle holds {self.seq_length}")
        if position_ids is None:
            after = self.next_position + s
            steps = np.arange(self.next_position, after, dtype=np.int64)[None]
            position_ids = steps if len(self.positions) == 1 else np.repeat(steps, len(self.positions), axis=0)
        else:
            after = max(self.next_position, int(position_ids.max()) + 1)
        self.positions[:, start:start + s] = position_ids
        self.next_position = after
        feed = {"inputs_embeds": np.ascontiguousarray(embeds[None], np.float32),
                "position_ids": np.ascontiguousarray(position_ids, np.int64),
                "seqlens_k": np.array([start + s - 1], np.int32),
                "total_sequence_length": np.array(start + s, np.int32),
                "logits_index": np.ascontiguousarray(logits_index, np.int64)}
        for name, value in (self.extension.inputs(s, []) if extra is None else extra).items():
            feed[name] = np.ascontiguousarray(value)
        if self.openvino is not None and s >= MIN_OPENVINO_ROWS:
            logits = self._run_openvino(feed, start, s)
        else:
            logits = self._run_onnxruntime(feed, single=len(logits_index) == 1)
        self.tokens.extend([-1] * s if token_ids is None else [int(t) for t in token_ids])
        return logits

    def _run_onnxruntime(self, feed: dict[str, np.ndarray], single: bool) -> np.ndarray:
        b = self.binding
        for name, value in feed.items():
            b.bind_cpu_input(name, value)
        if single:
            b.bind_ortvalue_output("logits", self.step_logits_value)
        else:
            b.bind_output("logits")
        self.session.run_with_iobinding(b)
        return self.step_logits[0].copy() if single else b.get_outputs()[-1].numpy()[0]

    def _run_openvino(self, feed: dict[str, np.ndarray], start: int, s: int) -> np.ndarray:
        """The chunk on OpenVINO: it reads the cache's layers in place and returns each layer's keys and values up to
        the chunk's end, of which the chunk's own rows are copied into the cache."""
        for i in range(len(self.kv)):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = self.kv[i, 0], self.kv[i, 1]
        out = self.openvino.run(feed)
        for i in range(len(self.kv)):
            self.kv[i, 0, ..., start:start + s, :] = out[f"present_key.{i}"][..., start:start + s, :]
            self.kv[i, 1, ..., start:start + s, :] = out[f"present_value.{i}"][..., start:start + s, :]
        return out["logits"][0]

    def prefill(self, token_ids: list[int], all_logits: bool = False,
                on_chunk: Callable[[int, int], None] | None = None, media: list | None = None,
                positions: np.ndarray | None = None) -> np.ndarray:
        """Compute the tokens after the reusable prefix in chunks; returns the last position's logits, or every
        new position's when all_logits (then nothing is reused).

        media: (slots, key, features) per image or video: features() -> {vision output: [tokens, ...]}, whose
        "image_embeds" rows replace the token embeddings at those prompt positions (the rest go to the family's
        extension); the cache records `key` there, so a different image is never mistaken for a cached one.
        features() is only called when a chunk to compute holds some of those positions.
        positions: rotary positions [rows, len(token_ids)] of the prompt (None: 0, 1, 2, ...)."""
        keys = list(token_ids)
        for slots, key, _ in media or ():
            for p in slots:
                keys[p] = key
        if all_logits:
            self.reset()
        if positions is None:
            positions = np.repeat(np.arange(len(keys), dtype=np.int64)[None], len(self.positions), axis=0)
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
            if on_chunk:
                on_chunk(end - start, todo)
            begin = end
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    def verify(self, token_ids: list[int]) -> np.ndarray:
        """Run several tokens at once after the cache, with logits for each: [len(token_ids), vocab]."""
        return self.forward(self.embed(token_ids), np.arange(len(token_ids)), token_ids)

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward(self.embed([token_id]), np.zeros(1, np.int64), [token_id])[0]

