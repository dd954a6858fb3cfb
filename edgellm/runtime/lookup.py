"""Prompt lookup: draft the next tokens by finding the end of the text so far earlier in it (an n-gram of the
prompt or the answer) and taking what followed there. Answers that quote, edit or summarise their prompt repeat
long runs of it, and the decoder checks a whole draft in one run: it reads its weights once for all of them."""

from __future__ import annotations

import numpy as np


def prompt_lookup(history: list[int], count: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to `count` tokens that followed the latest earlier occurrence of the longest n-gram (min_ngram <= n <=
    max_ngram) that ends `history`; [] when none recurs. (One recurring token is too weak a sign: drafts from it
    are mostly wrong, and checking them costs more than it saves.)"""
    if count < 1 or len(history) < min_ngram + 1:
        return []
    ids = np.asarray(history, np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        starts = len(ids) - n  # candidate occurrences begin before the tail itself
        found = np.ones(starts, bool)
        for j in range(n):
            found &= ids[j:starts + j] == ids[starts + j]
        hits = np.flatnonzero(found)
        if len(hits):
            after = int(hits[-1]) + n
            return ids[after:after + count].tolist()
    return []
