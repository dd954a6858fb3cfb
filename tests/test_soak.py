"""The 30-second soak (benchmarks/soak.py): 32 concurrent clients with cancellations mixed in, against a server
process of its own. No request fails, and the server's open files and memory stay flat after warm-up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from soak import soak  # noqa: E402

pytestmark = pytest.mark.soak


def test_a_short_soak_fails_nothing_and_leaks_nothing(bundle):
    out = soak(str(bundle("llama", "f32", seq_length=256)), seconds=30, clients=32, every=10, threads=1,
               report=lambda line: None)
    counts = out["counts"]
    assert counts["failed"] == 0, out["failures"]
    assert counts["completed"] > 32 and counts["cancelled streams"] > 0 and out["health"] == 200
    warm, end = out["samples"][1], out["samples"][-1]  # [0] is before any request
    assert end[2] <= warm[2] + 8, out["samples"]  # open files: no growth after warm-up (clients' sockets close)
    assert end[1] - warm[1] < 64, out["samples"]  # RSS (MiB): flat after warm-up
