"""What one batched decode step costs the engine alone (no server, no client), by the number of sequences in it:
the ceiling that `serve --parallel N` can reach on tokens/s.

    .venv/bin/python benchmarks/batch_step.py BUNDLE [--rows 1,2,4] [--steps 30]

Every slot is prefilled with the same short prompt; then steps of each row count alternate, medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab import cpu_flags  # noqa: E402

import edgellm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    model = edgellm.load(args.bundle, slots=max(rows), threads=args.threads)
    engine = model.engine
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    for slot in engine.slots:
        with engine.using(slot):
            engine.prefill(ids)
    times: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(args.steps):
        for r in rows:
            started = time.perf_counter()
            engine.decode_batch(engine.slots[:r], [ids[-1]] * r)
            times[r].append(time.perf_counter() - started)
    print(f"{args.bundle}: {engine.kernels.describe()}; host: {cpu_flags()}")
    base = statistics.median(times[rows[0]]) / rows[0]
    for r, ts in times.items():
        t = statistics.median(ts)
        print(f"{r} row(s): {t * 1e3:.2f} ms a step, {r / t:.0f} tokens/s ({r * base / t:.2f}x the first line's)")


if __name__ == "__main__":
    main()
