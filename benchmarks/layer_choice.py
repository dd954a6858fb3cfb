"""What a per-layer precision choice costs and gains: the layers the quality report names worst (and, for
comparison, the first and last) run their matmuls with float activations (accuracy level 0, ONNX Runtime's float
path) while the rest keep int8 activations (level 4, edgellm's kernels). Perplexity on tests/data/english.txt and
teacher-forced top-1 agreement with the float32 bundle of the same GGUF; prefill and decode speed.

    .venv/bin/python benchmarks/layer_choice.py [--tokens 1024] [--rounds 3]

A measurement, not an option of the converter: the variants are made by converting with those layers' matmuls
written at level 0 (patching the graph builder for the run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from ab import column_medians, cpu_flags  # noqa: E402
from kernel_quality import nll_and_top1  # noqa: E402

import edgellm  # noqa: E402
from edgellm.convert import graph as graph_module  # noqa: E402
from edgellm.demo import gemma3_270m_gguf, smollm2_gguf  # noqa: E402


def convert_with_float_layers(gguf: Path, out: Path, layers: set[int] | None) -> Path:
    """The GGUF's w4 bundle, with the matmuls of `layers` (None: all) at accuracy level 0."""
    original = graph_module.GraphBuilder._matmul_nbits

    def patched(self, x, w, name, accuracy_level, max_piece_bytes=None):
        index = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layers is None or index in layers:
            accuracy_level = 0
        return original(self, x, w, name, accuracy_level, max_piece_bytes)

    graph_module.GraphBuilder._matmul_nbits = patched
    try:
        return edgellm.convert(gguf, out, seq_length=2048, progress=False, force=True)
    finally:
        graph_module.GraphBuilder._matmul_nbits = original


def speed(model, rounds: int) -> tuple[float, ...]:
    """Median prefill(512) and decode tokens/s."""
    runs = []
    for _ in range(rounds):
        model.engine.reset()
        r = model.generate(list(range(1000, 1512)), 64, ignore_eos=True)
        runs.append((r.prefill_tokens_per_s, r.decode_tokens_per_s))
    return column_medians(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"CPU flags: {cpu_flags()}")
    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    work = Path(tempfile.mkdtemp())
    for title, gguf in (("SmolLM2-135M-Instruct Q4_1", smollm2_gguf()), ("Gemma 3 270M Q4_K_M", gemma3_270m_gguf())):
        f32 = edgellm.load(edgellm.convert(gguf, work / "f32", quantize="f32", seq_length=2048, progress=False,
                                           force=True, report=False))
        ids = f32.tokenizer.encode(text)[:args.tokens]
        _, ref_top1 = nll_and_top1(f32.logits(ids), ids)
        default = edgellm.load(convert_with_float_layers(gguf, work / "w4", set()))
        report = default.manifest.quality
        layers = default.manifest.model.num_hidden_layers
        variants = {"all layers at level 4 (the default)": set(),
                    f"the report's worst {report['worst_layers']} at level 0": set(report["worst_layers"]),
                    f"first and last ({0}, {layers - 1}) at level 0": {0, layers - 1},
                    "all layers at level 0": None}
        print(f"\n{title}: {len(ids)} tokens; f32 perplexity "
              f"{float(np.exp(nll_and_top1(f32.logits(ids), ids)[0].mean())):.3f}")
        print("| variant | perplexity | top-1 vs f32 | prefill tok/s | decode tok/s |")
        print("|---|---:|---:|---:|---:|")
        for name, chosen in variants.items():
            model = default if not chosen and chosen is not None else edgellm.load(
                convert_with_float_layers(gguf, work / "variant", chosen))
            nll, top1 = nll_and_top1(model.logits(ids), ids)
            prefill, decode = speed(model, args.rounds)
            print(f"| {name} | {float(np.exp(nll.mean())):.3f} | {(top1 == ref_top1).mean():.2%} "
                  f"| {prefill:.0f} | {decode:.1f} |")


if __name__ == "__main__":
    main()
