"""A/B: the same bundle run by two edgellm checkouts (say, main and a change), in alternating fresh processes, as
ratios of medians. For changes that should not cost time: a restructuring, a refactor of the engine.

    git worktree add /tmp/base main
    python benchmarks/ab.py /tmp/base . BUNDLE --rounds 8

Each process loads the bundle and times greedy decoding of --decode tokens after a --prompt-token prompt, three
times; a round runs A then B (B then A on odd rounds, so neither always follows the other).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = """
import json, statistics, sys
sys.path.insert(0, sys.argv[1])
import edgellm
model = edgellm.load(sys.argv[2])
prompt, decode = int(sys.argv[3]), int(sys.argv[4])
runs = []
for _ in range(3):
    model.engine.reset()
    runs.append(model.generate(list(range(100, 100 + prompt)), max_new_tokens=decode, ignore_eos=True))
print(json.dumps({"load_ms": model.load_s * 1000,
                  "prefill": statistics.median(r.prefill_tokens_per_s for r in runs),
                  "decode": statistics.median(r.decode_tokens_per_s for r in runs)}))
"""


def column_medians(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The median of each column of `rows` (one tuple of figures per run)."""
    return tuple(statistics.median(column) for column in zip(*rows))


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx512[a-z_0-9]*|amx[a-z_0-9]*|avx2)\b", text)))
    return f"{model.group(1) if model else 'unknown CPU'}; {' '.join(flags)}"


def run(checkout: str, bundle: str, prompt: int, decode: int) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(Path(checkout).resolve()), bundle, str(prompt),
                           str(decode)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{checkout}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="checkout A (a folder holding the edgellm package)")
    p.add_argument("b", help="checkout B")
    p.add_argument("bundle")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode", type=int, default=64)
    args = p.parse_args()
    print(cpu_flags())
    results = {"a": [], "b": []}
    for i in range(args.rounds):
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
            results[side].append(run({"a": args.a, "b": args.b}[side], args.bundle, args.prompt_tokens, args.decode))
            print(side, json.dumps(results[side][-1]), flush=True)
    print("medians, their ratio, and the median of the rounds' own B/A (the steadier figure on a noisy machine):")
    for key in ("prefill", "decode", "load_ms"):
        a, b = (statistics.median(r[key] for r in results[s]) for s in "ab")
        paired = statistics.median(rb[key] / ra[key] for ra, rb in zip(results["a"], results["b"]))
        print(f"{key:8} A {a:8.1f}  B {b:8.1f}  B/A {b / a:5.2f}  per round {paired:5.2f}")


if __name__ == "__main__":
    main()
