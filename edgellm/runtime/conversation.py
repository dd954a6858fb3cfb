"""Multi-turn chat: the conversation is re-rendered each turn, and the engine's prefix reuse means only the new
turn is prefilled (images of earlier turns are neither encoded nor prefilled again). When the context is full,
the oldest turns are dropped with their images (the system prompt stays) and the shortened conversation is
prefilled again."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

from ..errors import EdgeLLMError
from .chat import user_content
from .sampling import SamplingParams


class Conversation:
    def __init__(self, model, system: str | None = None, max_new_tokens: int = 512, **sampling):
        self.model = model
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.frames = sampling.pop("frames", None)  # per video, when the conversation holds videos
        self.sampling = sampling
        # an out-of-range setting is refused now, not at the first answer
        SamplingParams(**{f.name: sampling[f.name] for f in fields(SamplingParams) if f.name in sampling})
        self.messages: list[dict] = []
        self.media: list[tuple[list, list]] = []  # (images, videos) of each message
        self.last_result = None
        self.dropped_turns = 0

    def clear(self) -> None:
        self.messages, self.media = [], []
        self.model.engine.reset()

    def _attachments(self) -> dict:
        return {"images": [i for m in self.media for i in m[0]], "videos": [v for m in self.media for v in m[1]]}

    def _history(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fit(self):
        """The conversation prepared for prefill (a runtime.model.Prompt), dropping the oldest turns until the
        answer has room."""
        room = min(self.max_new_tokens, self.model.seq_length // 4)
        while True:
            prompt = self.model.prepare(self._history(), frames=self.frames, **self._attachments())
            if len(prompt.ids) + room <= self.model.seq_length:
                return prompt
            if len(self.messages) <= 1:
                raise EdgeLLMError(f"this message is {len(prompt.ids)} tokens; with room for a {room}-token answer it "
                                   f"does not fit the bundle's {self.model.seq_length}-token context")
            drop = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:drop]
            del self.media[:drop]
            self.dropped_turns += 1

    def stream(self, text: str, images=(), videos=()) -> Iterator[str]:
        """The answer to `text`; images and videos given here go before the text of this turn."""
        images, videos = list(images), list(videos)
        self.messages.append({"role": "user", "content": user_content(text, len(images), len(videos))})
        self.media.append((images, videos))
        try:
            prompt = self._fit()
            pieces = []
            for piece in self.model.stream(prompt, max_new_tokens=self.max_new_tokens, **self.sampling):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()
            self.media.pop()
            raise
        self.last_result = self.model.last_result
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.media.append(([], []))

    def send(self, text: str, images=(), videos=()) -> str:
        return "".join(self.stream(text, images, videos))
