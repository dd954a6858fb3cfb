"""Multi-turn chat: the conversation is re-rendered each turn, and the engine's prefix reuse means only the new
turn is prefilled. When the context is full, the oldest turns are dropped (the system prompt stays) and the
shortened conversation is prefilled again."""

from __future__ import annotations

from typing import Iterator

from ..errors import EdgeLLMError


class Conversation:
    def __init__(self, model, system: str | None = None, max_new_tokens: int = 512, **sampling):
        self.model = model
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.messages: list[dict] = []
        self.last_result = None
        self.dropped_turns = 0

    def clear(self) -> None:
        self.messages = []
        self.model.engine.reset()

    def _history(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fit(self) -> list[int]:
        """Prompt ids of the conversation, dropping the oldest turns until the answer has room."""
        room = min(self.max_new_tokens, self.model.seq_length // 4)
        while True:
            ids = self.model.prompt_ids(self._history())
            if len(ids) + room <= self.model.seq_length:
                return ids
            if len(self.messages) <= 1:
                raise EdgeLLMError(f"this message is {len(ids)} tokens; with room for a {room}-token answer it does "
                                   f"not fit the bundle's {self.model.seq_length}-token context")
            drop = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:drop]
            self.dropped_turns += 1

    def stream(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._fit()
            pieces = []
            for piece in self.model.stream(ids, max_new_tokens=self.max_new_tokens, **self.sampling):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()
            raise
        self.last_result = self.model.last_result
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def send(self, text: str) -> str:
        return "".join(self.stream(text))
