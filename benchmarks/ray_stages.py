"""What running a staged decoder's stages in Ray actors costs on one machine: SmolLM2 as one graph, as two stages in
this process (`-c cpu,cpu`), and as two stages in Ray actors (`--ray-stages`), alternating, the same greedy answers;
TTFT of a --prompt-token prompt and decode tokens/s, medians over --rounds, and their ratios to the one graph.

    .venv/bin/python benchmarks/ray_stages.py [--rounds 5] [--prompt 256] [--decode 64]

On one machine this measures the actors' overhead (each step's hand-over through Ray's object store, each call's
scheduling); across nodes add the network's latency per stage per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ab import column_medians, cpu_flags  # noqa: E402

import edgellm  # noqa: E402
from edgellm.demo import MODELS, demo_bundle  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--decode", type=int, default=64)
    args = p.parse_args()
    import ray

    print(f"CPU flags: {cpu_flags()}")
    staged = Path(tempfile.mkdtemp()) / "smollm2-2-stages"
    edgellm.convert(MODELS["smollm2"].gguf(), staged, num_devices=2, progress=False, report=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    models = {"one graph": edgellm.load(demo_bundle()),
              "2 stages, this process": edgellm.load(staged, device="cpu,cpu"),
              "2 stages, Ray actors": edgellm.load(staged, stage_placement="pack")}
    prompt = list(range(100, 100 + args.prompt))
    answers = {name: m.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids for name, m in models.items()}
    assert len({tuple(a) for a in answers.values()}) == 1, answers  # the same tokens from all three
    runs: dict[str, list] = {name: [] for name in models}
    for r in range(args.rounds):
        for name in list(models)[::1 if r % 2 == 0 else -1]:
            model = models[name]
            model.engine.reset()
            result = model.generate(prompt, max_new_tokens=args.decode, ignore_eos=True)
            runs[name].append((result.ttft_s, result.decode_tokens_per_s))
    ray.shutdown()
    medians = {name: column_medians(rows) for name, rows in runs.items()}
    base_ttft, base_speed = medians["one graph"]
    print(f"SmolLM2 w4, {args.prompt}-token prompt, {args.decode} tokens, medians of {args.rounds}:")
    for name, (ttft, speed) in medians.items():
        print(f"  {name:24} TTFT {ttft * 1000:7.1f} ms ({ttft / base_ttft:.2f}x)   decode {speed:6.1f} tok/s "
              f"({speed / base_speed:.2f}x)")


if __name__ == "__main__":
    main()
