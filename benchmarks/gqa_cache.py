"""ONNX Runtime's CPU GroupQueryAttention for one decoded token, by KV cache precision: what `--kv-cache int8`
saves per layer as the context grows.

    .venv/bin/python benchmarks/gqa_cache.py [--heads 12 --kv-heads 2 --head-dim 128 --layers 28] [--past 128,1024]

One GroupQueryAttention node (the decoder's own form: one query row, the cache bound as past and present, max
length 2,048) timed per cache precision: float32, float16, int8 with per-channel or per-tensor scales, and 4-bit;
medians of 50 runs after 3 warm-ups, times the layer count for a whole token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import cpu_flags  # noqa: E402

CAPACITY = 2048
KINDS = {  # name: (cache element type, numpy type, quantization, bits)
    "float32": (TensorProto.FLOAT, np.float32, None, 8),
    "float16": (TensorProto.FLOAT16, np.float16, None, 8),
    "int8 per channel": (TensorProto.INT8, np.int8, "PER_CHANNEL", 8),
    "int8 per tensor": (TensorProto.INT8, np.int8, "PER_TENSOR", 8),
    "int4 per channel": (TensorProto.UINT8, np.uint8, "PER_CHANNEL", 4),
}


def graph(heads: int, kv_heads: int, dim: int, kind: str) -> bytes:
    element, _, quant, bits = KINDS[kind]
    width = dim if bits == 8 else dim // 2
    attrs, inputs, inits = dict(num_heads=heads, kv_num_heads=kv_heads), ["q", "k", "v", "pk", "pv", "sl", "tl"], []
    if quant:
        attrs.update(k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=bits)
        inputs += ["", "", "", "", "", "ks", "vs"]
        shape = [1, kv_heads, 1, dim] if quant == "PER_CHANNEL" else [1]
        inits = [helper.make_tensor(n, TensorProto.FLOAT, shape, np.full(int(np.prod(shape)), 0.05))
                 for n in ("ks", "vs")]
    node = helper.make_node("GroupQueryAttention", inputs, ["o", "pk_out", "pv_out"], domain="com.microsoft", **attrs)
    cache = [1, kv_heads, CAPACITY, width]
    g = helper.make_graph([node], "gqa", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, heads * dim]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 1, kv_heads * dim]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 1, kv_heads * dim]),
        helper.make_tensor_value_info("pk", element, cache), helper.make_tensor_value_info("pv", element, cache),
        helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("tl", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("pk_out", element, None),
         helper.make_tensor_value_info("pv_out", element, None)],
        inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def time_one(session, heads, kv_heads, dim, kind, past, rng) -> float:
    _, dtype, _, bits = KINDS[kind]
    width = dim if bits == 8 else dim // 2
    if np.issubdtype(dtype, np.integer):
        cache = rng.integers(0, 100, (1, kv_heads, CAPACITY, width)).astype(dtype)
    else:
        cache = rng.standard_normal((1, kv_heads, CAPACITY, width)).astype(dtype)
    feed = {"q": rng.standard_normal((1, 1, heads * dim), np.float32),
            "k": rng.standard_normal((1, 1, kv_heads * dim), np.float32),
            "v": rng.standard_normal((1, 1, kv_heads * dim), np.float32), "pk": cache, "pv": cache.copy(),
            "sl": np.array([past], np.int32), "tl": np.array(past + 1, np.int32)}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(50):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--past", default="128,1024")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    pasts = [int(x) for x in a.past.split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    rng = np.random.default_rng(0)
    print(f"GroupQueryAttention, {a.heads} heads / {a.kv_heads} KV heads of {a.head_dim}, {a.threads} threads, "
          f"ONNX Runtime {ort.__version__}; host: {cpu_flags()}\n")
    print("| cache | " + " | ".join(f"ms per layer @{n}" for n in pasts) + " | "
          + " | ".join(f"ms per token ({a.layers} layers) @{n}" for n in pasts) + " |")
    print("|---|" + "---:|" * (2 * len(pasts)))
    for kind in KINDS:
        try:
            session = ort.InferenceSession(graph(a.heads, a.kv_heads, a.head_dim, kind), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # a precision this ONNX Runtime's CPU kernel does not take
            print(f"| {kind} | not available: {str(e).splitlines()[0][:80]} |")
            continue
        ms = [time_one(session, a.heads, a.kv_heads, a.head_dim, kind, n, rng) * 1e3 for n in pasts]
        print(f"| {kind} | " + " | ".join(f"{x:.3f}" for x in ms) + " | "
              + " | ".join(f"{x * a.layers:.1f}" for x in ms) + " |")


if __name__ == "__main__":
    main()
