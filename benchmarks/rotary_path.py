"""What the RotaryEmbedding path costs (the decoder's attention for heads and rotary widths GroupQueryAttention cannot
turn itself): SmolLM2's GGUF converted twice, once as usual (fused rotary) and once forced onto that path, then
prefill and decode speed, alternating, medians of --rounds.

    .venv/bin/python benchmarks/rotary_path.py [--rounds 5]
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
from edgellm.demo import smollm2_gguf  # noqa: E402
from edgellm.modeling.decoder import Decoder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"CPU flags: {cpu_flags()}")
    work, gguf = Path(tempfile.mkdtemp()), smollm2_gguf()
    fused = edgellm.load(edgellm.convert(gguf, work / "fused", seq_length=1024, progress=False, report=False))
    fused_rotary = Decoder.fused_rotary
    Decoder.fused_rotary = lambda self: False  # as for heads of 24 or a rotary over 8 dimensions
    try:
        nodes = edgellm.load(edgellm.convert(gguf, work / "nodes", seq_length=1024, progress=False, report=False))
    finally:
        Decoder.fused_rotary = fused_rotary
    prompt = list(range(1000, 1512))
    runs: dict[str, list] = {"fused rotary": [], "RotaryEmbedding nodes": []}
    for _ in range(args.rounds):
        for name, model in (("fused rotary", fused), ("RotaryEmbedding nodes", nodes)):
            model.engine.reset()
            r = model.generate(prompt, 128, ignore_eos=True)
            runs[name].append((r.prefill_tokens_per_s, r.decode_tokens_per_s))
    medians = {name: column_medians(rows) for name, rows in runs.items()}
    for name, (prefill, decode) in medians.items():
        print(f"{name}: prefill(512) {prefill:.0f} tok/s, decode {decode:.1f} tok/s")
    (fp, fd), (np_, nd) = medians["fused rotary"], medians["RotaryEmbedding nodes"]
    print(f"ratio: prefill {np_ / fp:.2f}x, decode {nd / fd:.2f}x")


if __name__ == "__main__":
    main()
