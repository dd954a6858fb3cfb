"""Builds edgellm's CPU kernel library (edgellm/kernels/csrc) with the machine's C++ compiler. The library is
optional: where it cannot be built (no compiler, another architecture) the install goes on and ONNX Runtime's own
kernels run bundles."""

import platform

from setuptools import Extension, setup

SOURCES = ["pack.cpp", "cpu.cpp", "matmul.cpp", "avx2.cpp", "avx512.cpp", "amx.cpp", "attention.cpp", "ops.cpp"]

native = []
if platform.machine().lower() in ("x86_64", "amd64"):
    native.append(Extension(
        "edgellm.kernels._native",
        sources=[f"edgellm/kernels/csrc/{name}" for name in SOURCES],
        depends=[f"edgellm/kernels/csrc/{name}"
                 for name in ("kernels.h", "ort_abi.h", "simd_avx2.h", "amx_emulation.h")],
        language="c++",
        # each instruction-set file selects its own target with a pragma; the rest stays baseline x86-64
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wno-maybe-uninitialized"],
        extra_link_args=["-pthread"],
        optional=True,
    ))

setup(ext_modules=native)
