"""ONNX Runtime sessions of a bundle's graphs: devices, threads, options, and the swap to edgellm's kernels."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..errors import EdgeLLMError
from ..format import Bundle
from ..kernels import KernelUse, library_path, swap
from ..kernels import status as kernel_status

# ONNX Runtime's providers per device; "openvino" keeps ONNX Runtime's CPU session for decoding (see openvino.py)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "openvino": ["CPUExecutionProvider"]}
DEVICES = tuple(PROVIDERS)


def default_threads() -> int:
    """Physical cores available to this process (hyper-threads slow ONNX Runtime's matmuls down)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        siblings = open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read()
        per_core = len(siblings.replace("-", ",").split(",")) if siblings.strip() else 1
    except OSError:
        per_core = 1
    return max(1, available // max(1, per_core))


def check_device(device: str) -> None:
    if device not in PROVIDERS:
        raise EdgeLLMError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EdgeLLMError("device cuda asked for, but this onnxruntime has no CUDA provider "
                           "(pip install onnxruntime-gpu)")


def session_options(threads: int | None, spinning: bool, profile_prefix: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning pool wins a little when the cores are idle and loses several-fold when they are shared.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def open_session(path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for unreadable graphs
        raise EdgeLLMError(f"{path}: ONNX Runtime could not load the graph ({e})") from e


def open_graph(bundle: Bundle, name: str, options: ort.SessionOptions, providers: list[str],
               kernels: KernelUse | None = None) -> ort.InferenceSession:
    """A session of the bundle's graph file `name`; an encrypted bundle's graph and its data file are decrypted into
    memory and handed to ONNX Runtime from there (nothing decrypted is written anywhere). On the CPU provider its
    MatMulNBits run on edgellm's own kernels where they are in use (`kernels` records what ran)."""
    encrypted = bundle.is_encrypted(name)
    model = bytes(bundle.read(name)) if encrypted else None
    if providers[0] == "CPUExecutionProvider":
        use = kernels or KernelUse(kernel_status())
        swapped = swap(model if model is not None else bundle.file(name).read_bytes(), use)
        if swapped is not None:
            options.register_custom_ops_library(str(library_path()))
            if not encrypted:  # the data file stays where the graph names it
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(bundle.file(name).parent))
            model = swapped
    if encrypted:
        data = [f for f in bundle.manifest.files if f == f"{name}.data"]
        buffers = [np.frombuffer(bundle.read(f), np.uint8) for f in data]
        if data:
            options.add_external_initializers_from_files_in_memory(data, buffers, [b.nbytes for b in buffers])
    if model is None:
        return open_session(bundle.file(name), options, providers)
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as e:
        raise EdgeLLMError(f"{bundle.file(name)}: ONNX Runtime could not load the graph ({e})") from e
