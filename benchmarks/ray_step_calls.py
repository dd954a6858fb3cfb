"""What one decode step's calls through two stage actors cost in Ray itself, without a model: plain actor calls (as
runtime/ray_stages.py makes them, the hand-over passed by reference) against a Ray compiled graph of the same two
actors, with a SmolLM2-sized hand-over (576 floats, twice) and logits (49,152 floats); milliseconds per step.

    .venv/bin/python benchmarks/ray_step_calls.py [--steps 200]

(The compiled graph is not what the stages use: see docs/ray.md, "Not yet".)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import cpu_flags  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    import ray
    from ray.dag import InputNode

    print(f"CPU flags: {cpu_flags()}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Stage:
        def first(self, feed):
            return {"hidden": feed["embeds"] + 1, "residual": feed["embeds"].copy()}

        def last(self, carried, feed):
            return np.zeros((1, 1, 49152), np.float32) + carried["hidden"][0, 0, 0]

    a, b = Stage.remote(), Stage.remote()
    feed = {"embeds": np.ones((1, 1, 576), np.float32)}

    def plain():
        return ray.get(b.last.remote(a.first.remote(feed), feed))

    with InputNode() as given:
        graph = b.last.bind(a.first.bind(given), given).experimental_compile()

    def compiled():
        return graph.execute(feed).get()

    for name, step in (("plain actor calls", plain), ("compiled graph", compiled)):
        for _ in range(20):
            step()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{name}: {(time.perf_counter() - started) / args.steps * 1000:.2f} ms per two-stage step")
    graph.teardown()
    ray.shutdown()


if __name__ == "__main__":
    main()
