"""edgellm's own CPU kernels, loaded into ONNX Runtime as the custom-op domain ai.edgellm.kernels.

The C++ library (csrc/) is compiled by `pip install` with the machine's compiler and picks its instruction set at
run time: AVX2 (the floor), AVX-512 VNNI, AMX. When a session is opened on the cpu device, the bundle's
MatMulNBits nodes are swapped for the library's MatMulBlocks and its GroupQueryAttention nodes for DecoderAttention
(rewrite.py; docs/architecture.md, "The kernels"). MatMulBlocks repacks each weight once: decoding streams every
weight block once for all rows at the memory's speed, prefill multiplies int8 blocks on the widest units the CPU
has. Where the library cannot run (not built, ONNX Runtime older than 1.17, a CPU without AVX2, or
EDGELLM_KERNELS=off) ONNX Runtime's own kernels run the bundle as it is, and the reason is logged once.

EDGELLM_KERNELS: `auto` (default: the best level the CPU has), `off`, or a highest level to use: `avx2`,
`avx512`, `amx`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import onnxruntime as ort

from ..errors import EdgeLLMError

LEVELS = {"avx2": 1, "avx512": 2, "amx": 3}  # kernels.h Isa
NAMES = {1: "avx2", 2: "avx512-vnni", 3: "amx-int8"}
SWITCH = "EDGELLM_KERNELS"
MIN_ORT = (1, 17)  # KernelContext_ParallelFor, the newest entry of the C API the library uses
VERSION = 1  # the ops and attributes rewrite.py emits; csrc/ops.cpp's edgellm_version() must say the same

log = logging.getLogger("edgellm.kernels")


def library_path() -> Path | None:
    """The built library (setup.py compiles it next to this file; EDGELLM_KERNELS_LIBRARY names another build, to
    compare builds), or None."""
    if os.environ.get("EDGELLM_KERNELS_LIBRARY"):
        return Path(os.environ["EDGELLM_KERNELS_LIBRARY"])
    found = sorted(Path(__file__).parent.glob("_native*.so"))
    return found[0] if found else None


@dataclass(frozen=True)
class KernelStatus:
    active: bool
    level: int  # the instruction-set level in use (0: none)
    reason: str = ""  # why they are not in use, or why a lower level than the CPU's runs

    @property
    def isa(self) -> str:
        return NAMES.get(self.level, "none")

    def describe(self) -> str:
        if not self.active:
            return f"ONNX Runtime's kernels ({self.reason})"
        return f"edgellm kernels ({self.isa}" + (f"; {self.reason})" if self.reason else ")")


@cache
def native() -> ctypes.CDLL | None:
    """The library's C API (ctypes), for the status checks, tests and tools; None where it is not built."""
    path = library_path()
    return None if path is None else bind(ctypes.CDLL(str(path)))


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the C API's signatures on a loaded library."""
    lib.edgellm_isa_name.restype = ctypes.c_char_p
    lib.edgellm_pack.restype = ctypes.c_void_p
    lib.edgellm_pack.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    lib.edgellm_packed_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.edgellm_free.argtypes = [ctypes.c_void_p]
    lib.edgellm_matmul.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int]
    return lib


def requested_level() -> int | None:
    """The highest level EDGELLM_KERNELS allows (None: off); an unknown value is one clear error."""
    value = os.environ.get(SWITCH, "auto").strip().lower()
    if value in ("off", "0", "no", "false", "none"):
        return None
    if value in ("", "auto", "on", "1", "yes", "true"):
        return max(LEVELS.values())
    if value not in LEVELS:
        raise EdgeLLMError(f"{SWITCH}={value!r} is not a kernel setting; use auto, off, {', '.join(LEVELS)}")
    return LEVELS[value]


def status() -> KernelStatus:
    """Whether sessions opened now use edgellm's kernels, at which level, or why not."""
    return _status(os.environ.get(SWITCH, "auto"))


@cache
def _status(_switch: str) -> KernelStatus:
    wanted = requested_level()
    if wanted is None:
        return KernelStatus(False, 0, f"{SWITCH}=off")
    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ORT:
        return KernelStatus(False, 0, f"onnxruntime {ort.__version__} is older than 1.17")
    lib = native()
    if lib is None:
        return KernelStatus(False, 0, "the kernel library was not built: reinstall edgellm where a C++ compiler "
                                      "(g++) is installed")
    try:
        built = lib.edgellm_version()
    except AttributeError:  # a build from before the library said its version
        built = 0
    if built != VERSION:
        return KernelStatus(False, 0, f"the kernel library was built from another version of edgellm ({built}, this "
                                      f"one needs {VERSION}): reinstall edgellm (pip install -e .) to rebuild it")
    best = lib.edgellm_best_isa()
    if best == 0:
        return KernelStatus(False, 0, "this CPU has no AVX2")
    level = min(best, wanted)
    if level == LEVELS["amx"]:
        # the AMX kernel runs once in a child process against AVX-512's results: a compiler's or CPU's fault there
        # costs the speed, not the answers or the process
        check = lib.edgellm_amx_self_test()
        if check != 1:
            what = "gave other results than AVX-512" if check == 0 else "crashed"
            return KernelStatus(True, LEVELS["avx512"], f"the AMX kernel {what} in its self-test")
    return KernelStatus(True, level)


@dataclass
class KernelUse:
    """What the sessions of one bundle run their matmuls with (bench and the load line report it)."""

    status: KernelStatus
    swapped: int = 0  # MatMulNBits nodes on edgellm's kernels
    attention: int = 0  # GroupQueryAttention nodes on edgellm's attention
    kept: Counter = field(default_factory=Counter)  # reason -> MatMulNBits nodes on ONNX Runtime's

    def describe(self) -> str:
        if not self.status.active:
            return self.status.describe()
        text = f"edgellm kernels ({self.status.isa}): {self.swapped} matmuls, {self.attention} attention"
        if self.kept:
            text += "; ONNX Runtime's: " + ", ".join(f"{n} ({why})" for why, n in self.kept.items())
        return text


def swap(model: bytes, use: KernelUse) -> bytes | None:
    """The graph with its eligible MatMulNBits on edgellm's kernels (None: nothing to swap, or they are not in
    use, which is logged once where the graph has MatMulNBits to give them)."""
    if b"MatMulNBits" not in model and b"GroupQueryAttention" not in model:
        return None
    if not use.status.active:
        say_once(f"{use.status.describe()} run the 4/8-bit matmuls")
        return None
    from .rewrite import rewrite

    result = rewrite(model, use.status.level)
    use.swapped += result.swapped
    use.attention += result.attention
    use.kept.update(result.kept)
    return result.model if result.swapped or result.attention else None


_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("edgellm: %s", message)
