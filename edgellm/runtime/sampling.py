"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and min-p; and checking a
drafted token so that speculative decoding keeps that choice's distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from ..errors import EdgeLLMError


@dataclass(frozen=True)
class Bound:
    """The values a sampling setting takes: from `low` (or above it) to `high`."""

    low: float
    high: float = math.inf
    low_allowed: bool = True
    integer: bool = False
    low_means: str = ""  # what the lowest value does, for the message ("greedy")

    def allows(self, value) -> bool:  # NaN fails every comparison; infinities are refused too
        finite = isinstance(value, int) or math.isfinite(value)
        return finite and (value >= self.low if self.low_allowed else value > self.low) and value <= self.high

    def describe(self) -> str:
        low = f"{self.low} ({self.low_means})" if self.low_means else f"{self.low}"
        if self.high == math.inf:
            return f"{low} or more" if self.low_allowed else f"above {self.low}"
        return f"between {low} and {self.high}" if self.low_allowed else f"above {self.low} and at most {self.high}"


# The one statement of what each setting may be: SamplingParams checks it, the server checks requests with it.
BOUNDS = {"temperature": Bound(0, low_means="greedy"), "top_k": Bound(0, integer=True, low_means="off"),
          "top_p": Bound(0, 1, low_allowed=False), "min_p": Bound(0, 1),
          "repetition_penalty": Bound(0, low_allowed=False), "seed": Bound(0, (1 << 63) - 1, integer=True)}


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, value in ((f.name, self.__dict__[f.name]) for f in fields(self)):
            if value is not None and not BOUNDS[name].allows(value):
                raise EdgeLLMError(f"{name} must be {BOUNDS[name].describe()}, got {value!r}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    def _penalized(self, logits: np.ndarray, previous: list[int]) -> np.ndarray:
        p = self.params
        logits = np.asarray(logits, np.float32)
        if p.repetition_penalty != 1.0 and previous:
            # As in transformers (CTRL paper): shrink the logits of tokens already seen towards "less likely".
            seen = np.unique(np.asarray(previous, np.int64))
            values = logits[seen].astype(np.float64)
            logits = logits.astype(np.float64)
            with np.errstate(over="ignore"):
                logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            # an extreme penalty overflows: the largest finite value keeps the order and the sampler's arithmetic
            logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max)
        return logits

    def distribution(self, logits: np.ndarray, previous: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) the next token is drawn from, most likely first (sampling only)."""
        p = self.params
        with np.errstate(over="ignore"):
            scaled = self._penalized(logits, previous).astype(np.float64) / p.temperature
        scaled = np.nan_to_num(scaled, nan=-np.inf, posinf=np.finfo(np.float64).max)
        if 0 < p.top_k < len(scaled):  # the top k found without sorting the whole vocabulary
            top = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
            order = top[np.argsort(-scaled[top], kind="stable")]
        else:
            order = np.argsort(-scaled)
        with np.errstate(over="ignore"):  # -max - max: -inf, whose probability is 0
            probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = len(order)
        if p.top_p < 1.0:  # smallest set whose mass reaches top_p (the token that crosses it is kept)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.sum(probs >= p.min_p * probs[0]))))
        return order[:keep], probs[:keep] / probs[:keep].sum()

    def __call__(self, logits: np.ndarray, previous: list[int]) -> int:
        if self.greedy:
            return int(np.argmax(self._penalized(logits, previous)))
        return self._draw(*self.distribution(logits, previous))

    def _draw(self, tokens: np.ndarray, probs: np.ndarray) -> int:
        return int(tokens[self.rng.choice(len(tokens), p=probs)])

    def check(self, logits: np.ndarray, previous: list[int], guess: int) -> int:
        """The next token given that a drafter guessed `guess` (speculative decoding): `guess` itself with the
        probability the model gives it, otherwise a token drawn from the model's distribution without it. The
        result is distributed exactly as __call__'s (the rule of Leviathan et al. and Chen et al., 2023, for a
        draft that proposes one token for sure: prompt lookup and a greedy draft model both do). Greedy: the
        model's own choice, kept when it equals the guess."""
        if self.greedy:
            return self(logits, previous)
        tokens, probs = self.distribution(logits, previous)
        at = np.flatnonzero(tokens == guess)
        p_guess = float(probs[at[0]]) if len(at) else 0.0
        if p_guess > 0 and self.rng.random() < p_guess:
            return guess
        if len(at):
            probs = np.delete(probs, at[0])
            tokens = np.delete(tokens, at[0])
            probs = probs / probs.sum()
        return self._draw(tokens, probs)


class HeadSampler(Sampler):
    """A Sampler whose distribution comes from a bundle's sampling head graph (convert.sampling_head): the same
    steps as Sampler.distribution, top_k at most the head's width (0: the width), so that only the width's
    candidates and probabilities leave the device."""

    def __init__(self, params: SamplingParams, session):
        super().__init__(params)
        self.session = session
        self.vocab = session.get_inputs()[0].shape[1]

    def distribution(self, logits: np.ndarray, previous: list[int]) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        seen = np.zeros((1, self.vocab), np.float32)
        if previous and p.repetition_penalty != 1.0:
            seen[0, np.unique(np.asarray(previous, np.int64))] = 1
        value = lambda v: np.array([v], np.float32)  # noqa: E731
        probs, ids = self.session.run(["probs", "ids"], {
            "logits": np.asarray(logits, np.float32).reshape(1, -1), "seen": seen,
            "repetition_penalty": value(p.repetition_penalty), "temperature": value(p.temperature),
            "top_p": value(p.top_p), "min_p": value(p.min_p), "top_k": np.array([p.top_k], np.int64)})
        keep = probs[0] > 0
        kept = probs[0][keep].astype(np.float64)
        return ids[0][keep], kept / kept.sum()
