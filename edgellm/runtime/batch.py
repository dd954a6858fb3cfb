"""Continuous batching: several answers decode together, one graph call per step for all of them.

A Batcher owns the model's engine on one thread. Requests wait in a bounded queue; each one that gets a free cache
slot is prefilled a chunk at a time, between the decode steps of the answers already running (so a long prompt
never holds the others up for more than one chunk), then joins them: every step decodes one token of each running
answer in one call (Engine.decode_batch). An answer leaves at any step (EOS, a stop string, its limit, a full
context, or its client gone).

A finished sequence stays in its slot, where a later prompt that starts the same way (the next turn of a chat, a
shared system prompt) continues it without a copy; it is copied to the prompt cache only when its slot is about to be
overwritten (and, for those still in slots, when the Batcher closes), so that the cache holds what the slots lose.
The running answers keep neighbouring slots (one graph call takes a contiguous range of the cache): a prompt joins
them at either end of their range, moving there if it was prefilled elsewhere; when one in the middle leaves, the
last one moves into its place.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import EdgeLLMError
from .engine import Chunks
from .kv_cache import Slot, common_prefix
from .model import Generation
from .prompt_cache import PromptCache

# A finished sequence that a new prompt overwrites goes to the prompt cache first, unless the prompt keeps all of it
# but fewer positions than this: a unique question's tail after a shared document costs less to recompute, if it is
# ever asked again, than a copy of the whole sequence (a conversation's turn, its answer included, is longer).
WORTH_SAVING = 64


@dataclass
class Request:
    """An answer handed to the Batcher, and where its text goes: deliver(kind, value) with ("piece", text),
    ("done", GenerationResult) or ("error", message), called on the Batcher's thread."""

    answer: Generation
    deliver: Callable[[str, object], None]
    arrived: float = field(default_factory=time.perf_counter)
    tag: object = None  # the caller's (the server's job)
    slot: Slot | None = None  # from its admission (prefilling, then decoding) until it ends
    chunks: Chunks | None = None  # the prefill's Chunks while it runs

    prefilled_chunks: int = 0
    last_token: int = -1  # what the next decode step feeds
    cancelled: bool = False

    @property
    def held(self) -> Slot:
        """The slot of a request that holds one (prefilling or decoding)."""
        assert self.slot is not None, "a request holds a slot from its admission until it ends"
        return self.slot

    @property
    def prefill(self) -> Chunks:
        """The prefill of a request that is prefilling."""
        assert self.chunks is not None, "a request has its prefill while it is prefilling"
        return self.chunks


class QueueFull(Exception):
    pass


class Batcher:
    def __init__(self, model, cache: PromptCache | None = None, max_queue: int = 64, on_finished=None):
        """Decode up to len(model.engine.slots) answers together; `max_queue` requests wait beyond those;
        on_finished(request, outcome) after each request ends (outcome: its finish reason, "stopped" or "error")."""
        self.model, self.engine, self.cache = model, model.engine, cache
        self.max_queue, self.on_finished = max_queue, on_finished
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []  # decoding, in slot order: neighbouring slots
        self.free: list[Slot] = list(self.engine.slots)
        self.unsaved: set[Slot] = set()  # free slots holding a finished sequence the prompt cache does not have
        self.steps = self.batched_tokens = 0  # decode steps run, tokens they produced (their ratio: mean batch)
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="edgellm-batcher", daemon=True)
        self.thread.start()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self.running) + (self.prefilling is not None)

    def submit(self, answer: Generation, deliver, arrived: float | None = None, tag=None) -> Request:
        """Queue an answer; QueueFull when `max_queue` requests already wait."""
        request = Request(answer, deliver, arrived or time.perf_counter(), tag)
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(request)
            self.wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The client left: the answer stops at the next step (a queued one never starts)."""
        with self.wake:
            request.cancelled = True
            self.wake.notify()

    def close(self) -> None:
        """Stop the loop; the sequences still in slots go to the prompt cache, which is flushed to its folder."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)
        if self.cache is not None and not self.thread.is_alive() and not self.engine.lost_stage:
            for slot in list(self.unsaved):
                self._save(slot)
            self.cache.flush()

    def _save(self, slot: Slot) -> None:
        if slot.adapter is None and self.cache is not None:  # the cache holds base-model KV
            self.cache.put(self.engine.snapshot(slot))
        self.unsaved.discard(slot)

    # --- the loop, on the Batcher's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.prefilling or self.running):
                    self.wake.wait()
                if self.stopping:
                    break
                self._drop_cancelled()
                if self.prefilling is None and self.waiting and self.free:
                    self._admit(self.waiting.popleft())
            try:
                if self.prefilling is not None:
                    self._prefill_chunk(self.prefilling)
                if self.running:
                    self._decode_step()
            except Exception as e:  # a bug must not leave every client waiting forever
                for request in [*self.running, *([self.prefilling] if self.prefilling else [])]:
                    self._end(request, "error", f"internal error: {type(e).__name__}: {e}")
        for request in [*self.waiting, *self.running, *([self.prefilling] if self.prefilling else [])]:
            request.deliver("error", "the server is shutting down")

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self._report(request, "stopped")

    def _admit(self, request: Request) -> None:
        """Give the request the free slot whose cached positions start most like its prompt."""
        request.answer.result.queued_s = time.perf_counter() - request.arrived
        prompt = request.answer.prompt
        keys = prompt.ids
        positions = prompt.positions if prompt.positions is not None else self.engine.text_positions(len(keys))

        adapter = request.answer.adapter

        def shared(slot: Slot) -> int:  # (a slot computed with another adapter shares nothing)
            return common_prefix(slot, keys, positions, len(keys)) if slot.adapter == adapter else 0

        window = self._window()

        def preference(slot: Slot) -> tuple:
            """Most shared; then one it need not move from to join the running answers; then one whose loss costs
            nothing; then the shortest."""
            beside = window is None or slot.index in (window[0] - 1, window[1])
            return shared(slot), beside, slot not in self.unsaved, -len(slot)

        self.model.last_result = request.answer.result  # (as Model.stream sets it)
        slot = max(self.free, key=preference)
        self._overwriting(slot, shared(slot))
        self.free.remove(slot)
        request.slot = slot
        with self.engine.using(slot):
            self.engine.set_adapter(adapter)
            request.chunks = self.engine.prefill_chunks(prompt.ids, media=prompt.media, positions=prompt.positions,
                                                        cache=self.cache)
        self.prefilling = request

    def _prefill_chunk(self, request: Request) -> None:
        if request.cancelled:
            self._end(request, "stopped")
            return
        engine, answer = self.engine, request.answer
        vision = self.model.vision
        vision_before = vision.encode_s if vision else 0.0
        try:
            with engine.using(request.held):
                done = next(request.prefill, None) is None
            if request.prefilled_chunks == 0:  # the first step chose what to reuse
                answer.result.reused_tokens = engine.reused
            request.prefilled_chunks += 1
        except EdgeLLMError as e:
            self._end(request, "error", str(e))
            return
        answer.result.vision_s += (vision.encode_s if vision else 0.0) - vision_before
        if not done:
            return
        self.prefilling = None
        self._join(request)
        self._take(request, answer.next_token(request.prefill.logits))

    def _window(self) -> tuple[int, int] | None:
        """The range of slot indices the running answers hold."""
        return (self.running[0].held.index, self.running[-1].held.index + 1) if self.running else None

    def _join(self, request: Request) -> None:
        """Add a prefilled request to the running ones, at an end of their range (moved there if need be)."""
        window, index = self._window(), request.held.index
        if window is None or index == window[1]:
            self.running.append(request)
            return
        if index == window[0] - 1:
            self.running.insert(0, request)
            return
        target = window[1] if window[1] < len(self.engine.slots) else window[0] - 1
        other = next(s for s in self.free if s.index == target)
        self._overwriting(other, 0)
        self.engine.move(request.held, other)
        if target == window[1]:
            self.running.append(request)
        else:
            self.running.insert(0, request)

    def _overwriting(self, slot: Slot, kept: int) -> None:
        """`slot`'s sequence is about to be overwritten after its first `kept` positions: the prompt cache gets it
        first, if it holds an answer and enough would be lost (WORTH_SAVING)."""
        if slot in self.unsaved and len(slot) - kept >= WORTH_SAVING:
            self._save(slot)
        self.unsaved.discard(slot)

    def _decode_step(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self._end(request, "stopped")
        if not self.running:
            return
        logits = self.engine.decode_batch([r.held for r in self.running], [r.last_token for r in self.running])
        self.steps += 1
        self.batched_tokens += len(self.running)
        for request, row in zip(list(self.running), logits):
            self._take(request, request.answer.next_token(row))

    def _take(self, request: Request, token: int) -> None:
        """The answer's next token: its text goes to the client; the answer ends here or decodes it next step."""
        answer = request.answer
        request.last_token = token
        piece = answer.push(token)
        if piece:
            request.deliver("piece", piece)
        if answer.done or len(request.held) + 1 >= self.engine.seq_length:
            self._end(request, answer.result.finish_reason)

    def _end(self, request: Request, outcome: str, message: str | None = None) -> None:
        """The request leaves: its text is finished, its sequence kept in the prompt cache, its slot freed (the
        last running answer moves into its place)."""
        slot = request.slot
        if slot is not None and self.cache is not None and outcome != "error" and len(slot) > 0:
            self.unsaved.add(slot)
        if request is self.prefilling:
            self.prefilling = None
            request.prefill.close()
        elif request in self.running:
            place = self.running.index(request)
            self.running.remove(request)
            if 0 < place < len(self.running):  # a hole in the range: the last running answer moves into it
                last = self.running.pop()
                assert slot is not None  # (a running request holds its slot)
                self._overwriting(slot, 0)
                self.engine.move(last.held, slot)
                self.running.insert(place, last)
        if slot is not None:
            self.free.append(slot)
            request.slot = None
        tail = request.answer.finish() if message is None else ""
        if message is None and outcome != "stopped":  # finishing may settle it (a held-back stop string, a tool call)
            outcome = request.answer.result.finish_reason
        self._report(request, outcome)  # logged and counted before the client hears the end
        if message is not None:
            request.deliver("error", message)
            return
        if tail:
            request.deliver("piece", tail)
        request.deliver("done", request.answer.result)

    def _report(self, request: Request, outcome: str) -> None:
        if self.on_finished is not None:
            self.on_finished(request, outcome)
