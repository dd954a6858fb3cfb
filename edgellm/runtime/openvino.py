"""OpenVINO as a device (`-c openvino`, `load(..., device="openvino")`, the `openvino` extra).

The `openvino` runtime reads the bundle's ONNX graphs as they are (MatMulNBits becomes its compressed
fully-connected layer, GroupQueryAttention is decomposed) and computes in bf16 on CPUs with AVX512_BF16 or AMX,
where ONNX Runtime's CPU provider has no bf16 GEMM. It is faster on many rows at once and slower on one
(docs/benchmarks.md), so the engine hands it the prefill chunks of many tokens and keeps ONNX
Runtime's session for decoding; both read and write the engine's one KV cache array. A vision graph runs on it
entirely. ONNX Runtime's OpenVINO execution provider is not used: it offers no device on non-Intel CPUs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError


def _runtime():
    try:
        import openvino
    except ImportError:
        raise EdgeLLMError("device openvino needs the OpenVINO runtime: pip install 'edgellm[openvino]' "
                           "(or use -c cpu)") from None
    return openvino


class CompiledGraph:
    """One ONNX graph compiled for OpenVINO's CPU plugin; run(feed) -> {output name: array}."""

    def __init__(self, path: Path, threads: int):
        ov = _runtime()
        core = ov.Core()
        if "CPU" not in core.available_devices:
            raise EdgeLLMError(f"device openvino: OpenVINO finds no CPU device it can run on here "
                               f"(it lists {', '.join(core.available_devices) or 'none'}); use -c cpu")
        try:
            model = core.read_model(str(path))
            # the graph's output names, as read: compiling may give an output its producer's name as well
            self.outputs = [o.get_any_name() for o in model.outputs]
            self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with its own message
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise EdgeLLMError(f"{path}: OpenVINO could not compile the graph ({lines[-1] if lines else e}); "
                               "use -c cpu") from e
        self.request = self.compiled.create_infer_request()
        self.inputs = {name for i in self.compiled.inputs for name in i.get_names()}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: the KV cache's layers are read where they lie instead of being copied in on every call
        result = self.request.infer({name: value for name, value in feed.items() if name in self.inputs},
                                    share_inputs=True)
        return {name: result[port] for name, port in zip(self.outputs, self.compiled.outputs)}
