"""edgellm against llama.cpp and onnxruntime-genai at the sizes people deploy: prefill, decode after a short and a
long context, load time, peak memory, and the bytes each engine reads per decoded token against this host's
measured read bandwidth. Every engine runs in a process of its own (so its load time and peak RSS are its own),
the engines alternating round by round; the table shows medians.

    .venv/bin/python benchmarks/random_model.py qwen2.5-1.5b M --gguf Q4_0     # M and M-q4_0.gguf, same weights
    .venv/bin/python benchmarks/edge_sizes.py --hf M --gguf M-q4_0.gguf [--rounds 3] [--devices cpu,openvino]
    .venv/bin/python benchmarks/edge_sizes.py --gguf SmolLM2.gguf          # --hf: the GGUF's weights dequantized

edgellm runs up to four bundles (--bundles): the float folder converted with the defaults ("float") and with
--kv-cache int8 ("int8-cache"), the GGUF with its own blocks ("gguf", the default) and with --reblock ("reblock");
each on every --devices entry (openvino: prefill on OpenVINO, decode on ONNX Runtime; not the int8 cache, which
OpenVINO cannot read) and with every --kernels setting (EDGELLM_KERNELS: off is ONNX Runtime's own kernels; a level
this CPU lacks is skipped). Peers, each used when installed (see compare.py's header): llama.cpp on the GGUF,
onnxruntime-genai on its builder's int4 export of the float folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ab import cpu_flags  # noqa: E402
from compare import genai_export, hf_folder_from_gguf, last_line  # noqa: E402

# --- what each engine reads per decoded token ---------------------------------------------------------------------

def matmul_nbits_bytes(graph: Path) -> int:
    """Bytes ONNX Runtime's packed MatMulNBits weights take: codes plus an f32 scale and an f32 block sum per
    block (its CPU layout), summed over the graph's MatMulNBits nodes; float initializers as they are."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            blocks = -(-a["K"] // a["block_size"])
            total += a["N"] * blocks * (a["block_size"] * a["bits"] // 8 + 8)
    quantized = {i for n in model.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
    for init in model.graph.initializer:
        if init.name not in quantized and init.data_type in (1, 10):  # float, float16 (widened at load)
            total += 4 * int(np.prod(init.dims))
    return total


def kernel_bytes(graph: Path) -> int:
    """Bytes edgellm's kernels stream per token: each MatMulNBits at accuracy level 4 in panels of 16 outputs, its
    codes and a scale per block (float16 for 4-bit codes, and for 8-bit ones whose scales are float16 values;
    float32 otherwise), and as many minimums where it has zero points or folded minimums; the rest as
    matmul_nbits_bytes counts it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    inits = {i.name: i for i in model.graph.initializer}
    made_by = {o: n for n in model.graph.node for o in n.output}
    total, counted = 0, set()
    for node in model.graph.node:
        a = {x.name: x.i for x in node.attribute}
        if node.op_type != "MatMulNBits" or a.get("accuracy_level", 0) != 4:
            continue
        scales = numpy_helper.to_array(inits[node.input[2]])
        source = made_by.get(node.input[0])
        folded = source is not None and source.op_type == "Concat"
        k = a["K"]
        if folded:  # the input is [x, block_sums(x), ...]: the kernel reads x's blocks only
            width = made_by[made_by[source.input[1]].input[0]]
            k = int(np.prod(numpy_helper.to_array(inits[width.input[1]])[2:]))
        blocks = -(-k // a["block_size"])
        exact = np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
        scale = 2 if a["bits"] == 4 or exact else 4
        minimums = folded or (len(node.input) > 3 and bool(node.input[3]))
        total += -(-a["N"] // 16) * 16 * blocks * (a["block_size"] * a["bits"] // 8 + scale * (2 if minimums else 1))
        counted.update(node.input[1:])
    for init in model.graph.initializer:
        if init.name not in counted and init.data_type in (1, 10):
            total += 4 * int(np.prod(init.dims))
    return total


def gguf_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors llama.cpp reads per token: all but the token embedding table, unless that is
    the (tied) output projection too."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)


def kv_bytes_per_position(config: dict, width: int) -> int:
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * heads * head_dim * width


def read_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """GB/s of `threads` threads summing disjoint halves of a 1 GiB float32 array (numpy releases the GIL in
    reductions): the best of five passes, the array written once beforehand."""
    data = np.ones(size // 4, np.float32)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            started = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, size / (time.perf_counter() - started) / 1e9)
    return best


# --- one engine, in its own process ---------------------------------------------------------------------------------

WORKER = r"""
import json, sys, time
import numpy as np
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])
rng = np.random.default_rng(spec["seed"])
kind = spec["kind"]
if "kernels" in spec:
    import os
    os.environ["EDGELLM_KERNELS"] = spec["kernels"]
if kind == "llama.cpp":  # (before the clock starts: it imports edgellm)
    sys.path.insert(0, spec["root"] + "/benchmarks")
    from compare import llama_last_choice
started = time.perf_counter()
if kind == "edgellm":
    import edgellm
    model = edgellm.load(spec["path"], device=spec["device"], threads=spec["threads"])
    engine = model.engine
    def prefill(ids):
        engine.reset()
        return int(np.argmax(engine.prefill(ids)))
    step = lambda t: int(np.argmax(engine.decode(t)))
elif kind == "llama.cpp":
    from llama_cpp import Llama
    llm = Llama(spec["path"], n_ctx=spec["context"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_batch=512, verbose=False)
    last = lambda: llama_last_choice(llm)
    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return last()
    def step(t):
        llm.eval([t])
        return last()
else:
    import onnxruntime_genai as og
    model = og.Model(spec["path"])
    state = {}
    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=spec["context"])
        state["gen"] = og.Generator(model, params)
        state["gen"].append_tokens(ids)
        return 0
    def step(t):
        state["gen"].generate_next_token()
        return 0
load_s = time.perf_counter() - started
out = {"load_s": load_s}
if kind == "edgellm":
    out["kernels"] = engine.kernels.describe()
for n in spec["prompts"]:
    ids = rng.integers(100, spec["vocab"], n).tolist()
    t = time.perf_counter(); prefill(ids); out[f"prefill {n}"] = n / (time.perf_counter() - t)
for n in spec["after"]:
    token = prefill(rng.integers(100, spec["vocab"], n).tolist())
    t = time.perf_counter()
    for _ in range(spec["decode"]):
        token = step(token)
    out[f"decode @{n}"] = spec["decode"] / (time.perf_counter() - t)
status = open("/proc/self/status").read()
out["peak RSS MiB"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps(out))
"""


def measure(spec: dict) -> dict | None:
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        print(f"  {spec['name']} failed: {last_line(done.stderr)}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, help="the float Hugging Face folder (default: the GGUF's weights dequantized)")
    p.add_argument("--gguf", type=Path, required=True, help="a Q4_0 (or other) GGUF of the same weights")
    p.add_argument("--bundles", default="float,int8-cache,gguf,reblock", help="the edgellm bundles to run")
    p.add_argument("--kernels", default="off,avx2,avx512,amx", help="EDGELLM_KERNELS settings to run each with")
    p.add_argument("--prompts", default="128,512", help="prefill lengths")
    p.add_argument("--after", default="128,1024", help="context lengths that decoding is timed after")
    p.add_argument("--decode", type=int, default=32, help="tokens decoded per timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--devices", default="cpu", help="edgellm devices, e.g. cpu,openvino")
    args = p.parse_args()

    import edgellm
    from edgellm.kernels import LEVELS, native

    lib = native()
    settings = []
    for setting in args.kernels.split(","):
        if setting != "off" and not (lib and lib.edgellm_cpu_has(LEVELS[setting])):
            print(f"skipping kernels {setting}: {'not built' if lib is None else 'this CPU lacks it'}")
        else:
            settings.append(setting)
    args.hf = args.hf or hf_folder_from_gguf(args.gguf)
    prompts, after = [int(x) for x in args.prompts.split(",")], [int(x) for x in args.after.split(",")]
    context = max(prompts + after) + args.decode + 8
    config = json.loads((args.hf / "config.json").read_text())
    config = config.get("text_config", config)
    work = Path(tempfile.mkdtemp())
    engines = []  # (name, spec, bytes read per token at position 0, KV bytes per position)
    kv_f32 = kv_bytes_per_position(config, 4)
    bundles = {"float": ("float, -q w4", args.hf, {}), "int8-cache": ("float, -q w4 --kv-cache int8", args.hf,
                                                                      {"kv_cache": "int8"}),
               "gguf": ("GGUF blocks", args.gguf, {}), "reblock": ("GGUF --reblock", args.gguf, {"reblock": True})}
    for label, src, options in (bundles[b] for b in args.bundles.split(",")):
        started = time.perf_counter()
        bundle = edgellm.convert(src, work / label.replace(" ", "_"), seq_length=context, progress=False, **options)
        print(f"converted {label} in {time.perf_counter() - started:.1f} s")
        graph = bundle / "decoder.onnx"
        int8_cache = options.get("kv_cache") == "int8"
        for device in args.devices.split(","):
            if int8_cache and device == "openvino":  # OpenVINO cannot read the int8 cache's scales
                continue
            for setting in settings:
                weights = matmul_nbits_bytes(graph) if setting == "off" else kernel_bytes(graph)
                engines.append((f"edgellm {label} ({device}, kernels {setting})",
                                {"kind": "edgellm", "path": str(bundle), "device": device, "kernels": setting},
                                weights, kv_bytes_per_position(config, 1) if int8_cache else kv_f32))
    try:
        import llama_cpp  # noqa: F401

        engines.append(("llama.cpp " + args.gguf.name, {"kind": "llama.cpp", "path": str(args.gguf)},
                        gguf_bytes(args.gguf), kv_bytes_per_position(config, 2)))
    except ImportError:
        print("skipping llama.cpp: pip install llama-cpp-python")
    try:
        import onnxruntime_genai  # noqa: F401

        exported = genai_export(args.hf, work / "genai", args.threads, context)
        engines.append(("onnxruntime-genai int4", {"kind": "genai", "path": str(exported)},
                        matmul_nbits_bytes(exported / "model.onnx"), kv_f32))
    except ImportError:
        print("skipping onnxruntime-genai: pip install onnxruntime-genai onnx-ir")
    except RuntimeError as e:
        print(f"skipping onnxruntime-genai: {e}")

    results = {name: [] for name, *_ in engines}
    probes = []  # the read-bandwidth probe, once a round among the engines (the host's bandwidth drifts too)
    for r in range(args.rounds):
        probes.append(read_bandwidth(args.threads))
        for name, spec, *_ in engines:  # alternate, so that noise hits all alike
            got = measure({**spec, "name": name, "root": str(ROOT), "seed": r, "threads": args.threads,
                           "prompts": prompts, "after": after, "decode": args.decode, "context": context,
                           "vocab": config["vocab_size"]})
            if got:
                results[name].append(got)
        print(f"round {r + 1} of {args.rounds} done")
    bandwidth = statistics.median(probes)

    columns = [f"prefill {n}" for n in prompts] + [f"decode @{n}" for n in after] + ["load_s", "peak RSS MiB"]
    print(f"\n{args.hf.name} / {args.gguf.name}, {args.threads} threads, medians of {args.rounds} rounds, "
          f"{args.decode} tokens per decode timing")
    print(f"host: {cpu_flags()}")
    print(f"read bandwidth probe ({args.threads} threads, numpy sum of 1 GiB, once a round): median {bandwidth:.1f} "
          f"GB/s (of {', '.join(f'{p:.1f}' for p in probes)})\n")
    print("| engine | " + " | ".join(columns) + f" | MB read per token @{after[0]} | GB/s achieved @{after[0]} "
          "| of the probe |")
    print("|---|" + "---:|" * (len(columns) + 3))
    medians = {}
    for name, _spec, weights, kv in engines:
        if not results[name]:
            continue
        med = {c: statistics.median(run[c] for run in results[name]) for c in columns}
        medians[name] = med
        read = weights + kv * after[0]
        achieved = read * med[f"decode @{after[0]}"] / 1e9
        print(f"| {name} | " + " | ".join(f"{med[c]:.1f}" for c in columns) + f" | {read / 1e6:.0f} | {achieved:.1f} "
              f"| {achieved / bandwidth:.0%} |")
    for name in medians:  # what each edgellm process said it ran its matmuls with
        said = {run["kernels"] for run in results[name] if "kernels" in run}
        if said:
            print(f"- {name}: {'; '.join(sorted(said))}")
    for peer in [n for n in medians if not n.startswith("edgellm")]:
        print(f"\nratios to {peer} (speed columns):")
        for name, med in medians.items():
            if name.startswith("edgellm"):
                print(f"| {name} | " + " | ".join(f"{med[c] / medians[peer][c]:.2f}" for c in columns[:-2]) + " |")


if __name__ == "__main__":
    main()
