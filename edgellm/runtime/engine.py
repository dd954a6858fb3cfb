"""The decoder session: a KV cache preallocated to the bundle's length, chunked prefill and one-token decode.

The KV cache is one numpy array. Each layer's key and value slices are bound as both the graph's past and present
tensors, so GroupQueryAttention appends new positions in place: nothing is copied or reallocated per token.
The engine remembers which token sits at each cached position, so a new prompt that starts like the cached one
(the next turn of a chat, a repeated system prompt) prefills only what differs.
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from .bundle import Bundle
from .embeddings import EmbeddingTable

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def default_threads() -> int:
    """Physical cores available to this process (hyper-threads slow ONNX Runtime's matmuls down)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = len(siblings.replace("-", ",").split(",")) if siblings.strip() else 1
    except OSError:
        per_core = 1
    return max(1, available // max(1, per_core))


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array whose memory becomes resident page by page as it is written: the KV cache costs
    what the conversation fills, not the bundle's whole length. (numpy asks for transparent huge pages on large
    arrays; their first write commits 2 MiB, so one token written into every head's slice made all of it resident.)"""
    count = int(np.prod(shape))
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}
    buffer = mmap.mmap(-1, max(1, count * 4), **private)  # anonymous: zeroed, committed on first write
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, np.float32, count=count).reshape(shape)


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
                 profile_prefix: str | None = None):
        if device not in PROVIDERS:
            raise EdgeLLMError(f"unknown device {device!r}; choose cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EdgeLLMError("device cuda asked for, but this onnxruntime has no CUDA provider "
                               "(pip install onnxruntime-gpu)")
        m = bundle.manifest["model"]
        self.bundle = bundle
        self.seq_length = bundle.seq_length
        self.chunk_length = bundle.chunk_length
        self.hidden_size = m["hidden_size"]
        decoder = bundle.file(bundle.manifest["graphs"]["decoder"])
        try:
            self.session = ort.InferenceSession(str(decoder), session_options(threads, spinning, profile_prefix),
                                                providers=PROVIDERS[device])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise EdgeLLMError(f"{decoder}: ONNX Runtime could not load the graph ({e})") from e
        self.embeddings = EmbeddingTable(bundle)
        layers = m["num_hidden_layers"]
        self.kv = lazy_zeros((layers, 2, 1, m["num_key_value_heads"], self.seq_length, m["head_dim"]))
        self.binding = self.session.io_binding()
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                value = ort.OrtValue.ortvalue_from_numpy(self.kv[i, j])
                self.binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                self.binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
        # One-token decode writes its logits into this fixed buffer; other calls let ORT size the output.
        self.step_logits = np.zeros((1, 1, m["vocab_size"]), np.float32)
        self.step_logits_value = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
        self.reused = 0  # positions the last prefill took from the cache
        self.tokens: list[int] = []  # what fills the cache, slot by slot (negative keys for image embeddings)
        # M-RoPE bundles (Qwen2-VL) take (t, h, w) rotary positions, which after an image fall behind the slot
        # index: each slot's positions are kept, and decoding continues from the largest one + 1.
        self.mrope = bool(m.get("mrope_section"))
        self.positions = np.zeros((3, self.seq_length), np.int64)
        # Gemma 3's decoder takes, per token, the image block it belongs to (-1: text): tokens of one block attend
        # to each other both ways, so a block is never split between two prefill chunks.
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.image_blocks = "token_groups" in inputs
        # Qwen3-VL's decoder adds vision features of K ViT depths after its first K layers (DeepStack): image rows
        # carry them after the embedding, and the engine spreads them over a [K, S, hidden] input.
        self.deepstack = int(inputs["deepstack_embeds"].shape[0]) if "deepstack_embeds" in inputs else 0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []

    def embed(self, token_ids) -> np.ndarray:
        return self.embeddings[token_ids]

    def reuse_prefix(self, token_ids: list[int], positions: np.ndarray | None = None) -> int:
        """Keep the cached slots that hold the start of `token_ids` (at the same rotary positions, for M-RoPE);
        at least one token is left to compute."""
        n, limit = 0, min(len(self.tokens), len(token_ids) - 1)
        while n < limit and self.tokens[n] == token_ids[n] and (
                positions is None or (self.positions[:, n] == positions[:, n]).all()):
            n += 1
        del self.tokens[n:]
        return n

    def next_positions(self, s: int) -> np.ndarray:
        """Rotary positions of `s` new slots that follow the cache: one row, or the three M-RoPE rows."""
        if not self.mrope:
            return np.arange(self.length, self.length + s, dtype=np.int64)[None]
        after = int(self.positions[:, :self.length].max()) + 1 if self.length else 0
        return np.repeat(np.arange(after, after + s, dtype=np.int64)[None], 3, axis=0)

    def forward(self, embeds: np.ndarray, logits_index: np.ndarray, token_ids=None,
                position_ids: np.ndarray | None = None, groups: np.ndarray | None = None,
                deepstack: np.ndarray | None = None) -> np.ndarray:
        """Run `embeds` [S, hidden] in the next S cache slots, at `position_ids` ([rows, S]; by default those that
        follow the cache); returns logits [len(logits_index), vocab]."""
        s, start = embeds.shape[0], self.length
        if start + s > self.seq_length:
            raise EdgeLLMError(f"context full: {start + s} positions needed, the bundle holds {self.seq_length}")
        if position_ids is None:
            position_ids = self.next_positions(s)
        if self.mrope:
            self.positions[:, start:start + s] = position_ids
        b = self.binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], np.float32))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        b.bind_cpu_input("seqlens_k", np.array([start + s - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(start + s, np.int32))
        b.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, np.int64))
        if self.deepstack:
            b.bind_cpu_input("deepstack_embeds", np.zeros((self.deepstack, s, self.hidden_size), np.float32)
                             if deepstack is None else deepstack)
        if self.image_blocks:
            b.bind_cpu_input("token_groups", np.full(s, -1, np.int64) if groups is None
                             else np.ascontiguousarray(groups, np.int64))
        single = len(logits_index) == 1
        if single:
            b.bind_ortvalue_output("logits", self.step_logits_value)
        else:
            b.bind_output("logits")
        self.session.run_with_iobinding(b)
        self.tokens.extend([-1] * s if token_ids is None else [int(t) for t in token_ids])
        return self.step_logits[0].copy() if single else b.get_outputs()[-1].numpy()[0]

    def prefill(self, token_ids: list[int], all_logits: bool = False,
                on_chunk: Callable[[int, int], None] | None = None, media: list | None = None,
                positions: np.ndarray | None = None) -> np.ndarray:
        """Compute the tokens after the reusable prefix in chunks; returns the last position's logits, or every
        new position's when all_logits (then nothing is reused).

        media: (slots, key, rows) per image or video: the embeddings rows() replace the token embeddings at
        those prompt positions, and the cache records `key` there, so a different image is never mistaken for a
        cached one. rows() is only called when a chunk to compute holds some of those positions.
        positions: M-RoPE positions [3, len(token_ids)] of the prompt (None: 0, 1, 2, ...)."""
        keys = list(token_ids)
        for slots, key, _ in media or ():
            for p in slots:
                keys[p] = key
        if all_logits:
            self.reset()
        if self.mrope and positions is None:
            positions = np.repeat(np.arange(len(keys), dtype=np.int64)[None], 3, axis=0)
        self.reused = 0 if all_logits else self.reuse_prefix(keys, positions)
        # (reuse never stops inside an image block: all its slots hold the same key)
        groups = image_blocks([slots for slots, _, _ in media or ()], len(keys)) if self.image_blocks else None
        start = self.length
        if len(keys) > self.seq_length:
            raise EdgeLLMError(f"prompt is {len(token_ids)} tokens but this bundle holds at most "
                               f"{self.seq_length} (its --seq-length); shorten the prompt or reconvert with a "
                               "larger --seq-length")
        outputs, todo = [], len(keys) - start
        begin = start
        while begin < len(keys):
            end = min(begin + self.chunk_length, len(keys))
            while groups is not None and end < len(keys) and groups[end] >= 0 and groups[end] == groups[end - 1]:
                end += 1  # the chunk takes the rest of the image block it has started
            embeds = self.embed(token_ids[begin:end])
            deepstack = np.zeros((self.deepstack, end - begin, self.hidden_size), np.float32) if self.deepstack \
                else None
            for slots, _, rows in media or ():
                inside = (slots >= begin) & (slots < end)
                if inside.any():
                    values, at = rows()[inside], slots[inside] - begin
                    embeds[at] = values[:, :self.hidden_size]
                    if self.deepstack:
                        deepstack[:, at] = values[:, self.hidden_size:].reshape(len(at), self.deepstack, -1) \
                            .transpose(1, 0, 2)
            index = np.arange(end - begin) if all_logits else np.array([end - begin - 1])
            rotary = positions[:, begin:end] if positions is not None else None
            outputs.append(self.forward(embeds, index, keys[begin:end], rotary,
                                        groups[begin:end] if groups is not None else None, deepstack))
            if on_chunk:
                on_chunk(end - start, todo)
            begin = end
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward(self.embed([token_id]), np.zeros(1, np.int64), [token_id])[0]


def image_blocks(spans: list[np.ndarray], length: int) -> np.ndarray:
    """Per prompt position, the index of the run of consecutive image positions it belongs to, or -1 (as
    transformers' Gemma 3 numbers its bidirectional blocks)."""
    is_image = np.zeros(length, bool)
    for slots in spans:
        is_image[slots] = True
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    return np.where(is_image, np.cumsum(starts) - 1, -1)
