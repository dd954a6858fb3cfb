"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and min-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        checks = (("temperature", self.temperature, self.temperature >= 0, "0 (greedy) or more"),
                  ("top_k", self.top_k, self.top_k >= 0, "0 (off) or more"),
                  ("top_p", self.top_p, 0 < self.top_p <= 1, "above 0 and at most 1"),
                  ("min_p", self.min_p, 0 <= self.min_p <= 1, "from 0 to 1"),
                  ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "above 0"))
        for name, value, ok, allowed in checks:  # NaN fails every comparison, so it is refused too
            if not ok:
                raise EdgeLLMError(f"{name} must be {allowed}, got {value!r}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: list[int]) -> int:
        p = self.params
        logits = np.asarray(logits, np.float32)
        if p.repetition_penalty != 1.0 and previous:
            # As in transformers (CTRL paper): shrink the logits of tokens already seen towards "less likely".
            seen = np.unique(np.asarray(previous, np.int64))
            values = logits[seen]
            logits = logits.copy()
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        order = np.argsort(-scaled)
        if p.top_k > 0:
            order = order[: p.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = len(order)
        if p.top_p < 1.0:  # smallest set whose mass reaches top_p (the token that crosses it is kept)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.sum(probs >= p.min_p * probs[0]))))
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(keep, p=probs)])
