"""4-bit matmuls alone: a chain of Qwen2.5-1.5B MLP-sized matmuls (1,536 <-> 8,960), ONNX Runtime's MatMulNBits
against edgellm's MatMulBlocks at each instruction-set level this CPU runs, sessions alternating, medians.

    .venv/bin/python benchmarks/kernel_chain.py [--count 160] [--rows 1,8] [--block-size 32,128]
    .venv/bin/python benchmarks/kernel_chain.py --count 8 --rows 128,512      # prefill: compute-bound

At one row the chain is a stream of weight codes (160 matmuls: 1.1 GB, beyond any L3), so GB/s of codes against the
read-bandwidth probe says how close a kernel gets to the memory wall; at many rows GOP/s says how well it computes.
Our graphs are made from the stock ones by the engine's own rewrite (edgellm.kernels.rewrite). Results are not
compared here: int8 rounding compounds along a chain of random matmuls; tests/test_kernels.py checks each kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from ab import cpu_flags  # noqa: E402
from edge_sizes import read_bandwidth  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgellm.kernels import LEVELS, library_path, native  # noqa: E402
from edgellm.kernels.rewrite import rewrite  # noqa: E402

HIDDEN, INTERMEDIATE = 1536, 8960


def chain(count: int, block: int) -> onnx.ModelProto:
    """`count` MatMulNBits, alternately widening and narrowing, random 4-bit codes whose scales keep the
    activations at unit size along the chain."""
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "x"
    for i in range(count):
        n, k = (INTERMEDIATE, HIDDEN) if i % 2 == 0 else (HIDDEN, INTERMEDIATE)
        codes = rng.integers(1, 16, (n, k // block, block), dtype=np.uint8)
        packed = np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))
        scales = ((0.8 + 0.4 * rng.random(n * (k // block), dtype=np.float32)) / np.sqrt(255 / 12 * k))
        initializers += [numpy_helper.from_array(packed, f"w{i}"),
                         numpy_helper.from_array(scales.astype(np.float16).astype(np.float32), f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block, accuracy_level=4))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def session(model: bytes, threads: int, library: Path | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=160, help="matmuls in the chain")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--block-size", default="32,128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    lib = native()
    if lib is None:
        sys.exit("edgellm's kernels are not built here (pip install -e . builds them)")
    levels = {name: level for name, level in LEVELS.items() if level <= lib.edgellm_best_isa()}
    print(f"host: {cpu_flags()}")
    print(f"read bandwidth probe: {read_bandwidth(args.threads):.1f} GB/s; {args.count} matmuls of {HIDDEN} <-> "
          f"{INTERMEDIATE}, {args.threads} threads, medians of {args.repeats}")
    for block in (int(b) for b in args.block_size.split(",")):
        model = chain(args.count, block)
        with tempfile.TemporaryDirectory() as tmp:
            # as a file with external data: a 1.1 GB chain is too big for one protobuf
            path = os.path.join(tmp, "chain.onnx")
            onnx.save(model, path, save_as_external_data=True, location="chain.data")
            del model
            stock = onnx.load(path, load_external_data=False).SerializeToString()
            sessions = {"MatMulNBits": session(path, args.threads, None)}
            for name, level in levels.items():
                ours = rewrite(stock, level).model
                ours_path = os.path.join(tmp, f"{name}.onnx")
                Path(ours_path).write_bytes(ours)
                sessions[f"edgellm {name}"] = session(ours_path, args.threads, library_path())
            codes = args.count * HIDDEN * INTERMEDIATE / 2
            for rows in (int(r) for r in args.rows.split(",")):
                x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
                times: dict[str, list[float]] = {name: [] for name in sessions}
                for s in sessions.values():
                    s.run(None, {"x": x})  # warm-up
                for _ in range(args.repeats):
                    for name, s in sessions.items():
                        t = time.perf_counter()
                        s.run(None, {"x": x})
                        times[name].append(time.perf_counter() - t)
                print(f"\nblocks of {block}, {rows} row(s):")
                base = np.median(times["MatMulNBits"])
                for name, ts in times.items():
                    t = float(np.median(ts))
                    print(f"  {name:22s} {t * 1e3:8.1f} ms  {codes / t / 1e9:5.1f} GB/s of codes"
                          f"  {rows * codes * 4 / t / 1e9:6.0f} GOP/s  {base / t:4.2f}x")
            sessions.clear()


if __name__ == "__main__":
    main()
