"""edgellm's own CPU kernels (edgellm/kernels): every block layout against a numpy reference at every
instruction-set level this CPU runs (a level the CPU lacks is skipped, saying so; AVX2 runs everywhere), odd
shapes, 1 and 2 threads; the AMX kernel's tiling also through a software model of the tile instructions, built
here, where the CPU has AVX-512 but no AMX; the load-time graph rewrite; the EDGELLM_KERNELS switch and the
fallback to ONNX Runtime's kernels. numpy-only apart from the end-to-end tests, which use the tiny bundles."""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import edgellm
from edgellm import kernels
from edgellm.convert.quantize import fold_mins
from edgellm.errors import EdgeLLMError
from edgellm.format.blocks import QuantizedWeight
from edgellm.kernels import swap
from edgellm.kernels.rewrite import DOMAIN
from helpers import relative_error

LIB = kernels.native()
LEVELS = {"avx2": 1, "avx512": 2, "amx": 3}
SHAPES = [(37, 100), (16, 16), (130, 520), (64, 256)]  # N not a multiple of 16, K tails, one panel, whole blocks
ROWS = [1, 2, 3, 8, 127, 512]


def test_the_library_is_built_where_a_compiler_is():
    if LIB is None and shutil.which("g++") and shutil.which("gcc"):
        pytest.fail("g++ is installed but edgellm/kernels/_native*.so was not built: `pip install -e .` failed to "
                    "compile edgellm/kernels/csrc (see its output)")
    if LIB is None:
        pytest.skip("no C++ compiler on this machine: the kernels are not built (ONNX Runtime's run instead)")
    assert kernels.status().active and LIB.edgellm_cpu_has(1), "every x86-64 host of the project has AVX2"


@pytest.fixture(scope="module")
def emulated_amx(tmp_path_factory):
    """The library built with the tile instructions modelled in C++ (csrc/amx_emulation.h), so that the AMX
    kernel's tiling runs on this CPU; None where it has AMX itself (the real one is tested) or lacks AVX-512."""
    if LIB is None or LIB.edgellm_cpu_has(LEVELS["amx"]) or not LIB.edgellm_cpu_has(LEVELS["avx512"]):
        return None
    csrc = Path(kernels.__file__).parent / "csrc"
    if not shutil.which("g++") or not (csrc / "amx.cpp").is_file():
        return None
    out = tmp_path_factory.mktemp("amx-emulation") / "libemulated.so"
    done = subprocess.run(["g++", "-O2", "-std=c++17", "-fPIC", "-shared", "-DEDGELLM_AMX_EMULATION", "-o", str(out),
                           *sorted(str(p) for p in csrc.glob("*.cpp")), "-pthread"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return kernels.bind(ctypes.CDLL(str(out)))


@pytest.fixture(params=["avx2", "avx512", "amx", pytest.param("amx-emulated", marks=pytest.mark.slow)])  # (compiles)
def level(request):
    """(library, level) for each instruction-set level this CPU runs."""
    if LIB is None:
        pytest.skip("the kernel library is not built")
    if request.param == "amx-emulated":
        emulated_amx = request.getfixturevalue("emulated_amx")
        if emulated_amx is None:
            pytest.skip("this CPU runs AMX itself (tested as amx), has no AVX-512 for the model's epilogue, or g++ "
                        "or the kernels' sources are missing")
        return emulated_amx, LEVELS["amx"]
    if not LIB.edgellm_cpu_has(LEVELS[request.param]):
        pytest.skip(f"this CPU (or OS) does not run {request.param} "
                    f"(best: {LIB.edgellm_isa_name(LIB.edgellm_best_isa()).decode()})")
    return LIB, LEVELS[request.param]


# --- the numpy reference ---------------------------------------------------------------------------------------

def quantize_rows(x: np.ndarray, block: int):
    """Activations rounded as the kernels round them: per block, scale = amax / 127, q = round-half-even(x * 127 /
    amax)."""
    k_blocks = -(-x.shape[1] // block)
    padded = np.zeros((x.shape[0], k_blocks * block), np.float32)
    padded[:, :x.shape[1]] = x
    blocks = padded.reshape(x.shape[0], k_blocks, block)
    amax = np.abs(blocks).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[..., None])
    return q.astype(np.float64), (amax / np.float32(127)).astype(np.float64)


def reference(x: np.ndarray, w: QuantizedWeight, half: bool, magnitude: bool = False) -> np.ndarray:
    """x @ w^T with int8 activations per block, the weight as the kernel stores it: scales (and the minimums of the
    min form, scale * code + min, which zero points and GGUF minimums become) in float16 when `half`. magnitude:
    the sums of the terms' absolute values instead, the scale of float32's rounding in the kernels' sums."""
    q, dx = quantize_rows(x, w.block_size)
    scales = w.scales.astype(np.float64)
    codes = w.codes.astype(np.float64)
    symmetric = w.zero_points is None and w.mins is None
    if symmetric:
        codes = codes - (1 << (w.bits - 1))
        mins = np.zeros_like(scales)
    else:
        mins = -scales * w.zero_points_or_default() + (0 if w.mins is None else w.mins)
    if half:  # (rounded to float32 first, as the library does)
        scales, mins = (a.astype(np.float32).astype(np.float16).astype(np.float64) for a in (scales, mins))
    dots = np.einsum("mbi,nbi->mnb", q, codes)
    if magnitude:
        return np.einsum("mnb,mb,nb->mn", np.abs(dots), dx, np.abs(scales)) + np.abs(q.sum(-1) * dx) @ np.abs(mins.T)
    y = np.einsum("mnb,mb,nb->mn", dots, dx, scales) + (q.sum(-1) * dx) @ mins.T
    return y.astype(np.float32)


def random_weight(rng, n: int, k: int, bits: int, block: int, form: str) -> QuantizedWeight:
    k_blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k_blocks, block)).astype(np.uint8)
    scales = ((0.5 + rng.random((n, k_blocks))) * 0.01).astype(np.float16).astype(np.float32)
    zero_points = rng.integers(0, 1 << bits, (n, k_blocks)).astype(np.uint8) if form == "zero points" else None
    mins = (rng.standard_normal((n, k_blocks)) * 0.05).astype(np.float32) if form == "minimums" else None
    return QuantizedWeight(bits, block, k, codes, scales, zero_points, mins)


class Packed:
    """A weight repacked by a library (its C API), freed with the object."""

    def __init__(self, lib, w: QuantizedWeight, widened_k: int = 0, mins: np.ndarray | None = None,
                 glu: bool = False):
        codes, scales = w.packed_codes(), np.ascontiguousarray(w.scales.reshape(-1), np.float32)
        zero_points = w.packed_zero_points()
        mins = None if mins is None else np.ascontiguousarray(mins, np.float32)
        message = ctypes.create_string_buffer(256)
        self.n, self.lib = w.n // 2 if glu else w.n, lib
        self.handle = lib.edgellm_pack(codes.ctypes.data, scales.ctypes.data,
                                       None if zero_points is None else zero_points.ctypes.data,
                                       None if mins is None else mins.ctypes.data, w.n, w.k, w.bits, w.block_size,
                                       widened_k, int(glu), message, 256)
        assert self.handle, message.value.decode()
        info = np.zeros(4, np.int64)
        lib.edgellm_packed_info(self.handle, info.ctypes.data)
        self.bytes, self.half, self.min_form, self.k = (int(v) for v in info)

    def __call__(self, x: np.ndarray, level: int, threads: int = 1) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        y = np.full((x.shape[0], self.n), np.nan, np.float32)
        used = self.lib.edgellm_matmul(self.handle, x.ctypes.data, x.shape[0], y.ctypes.data, level, threads)
        assert used == level
        return y

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.edgellm_free(self.handle)


# --- every layout, every level ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["symmetric", "zero points", "minimums"])
@pytest.mark.parametrize("block", [pytest.param(b, marks=[] if b == 32 else [pytest.mark.slow])  # (GGUF's size)
                                   for b in (16, 32, 64, 128, 256)])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_block_layout_matches_numpy(level, bits, block, form):
    lib, level = level
    rng = np.random.default_rng(bits * 1000 + block)
    for n, k in SHAPES:
        w = random_weight(rng, n, k, bits, block, form)
        mins = None if w.mins is None else np.ascontiguousarray(w.mins.T)  # the C API takes them [k_blocks, n]
        packed = Packed(lib, QuantizedWeight(w.bits, w.block_size, w.k, w.codes, w.scales, w.zero_points), mins=mins)
        # float16 scales (and minimums) for 4-bit blocks; 8-bit ones only where they are float16 values already
        assert packed.half == (bits == 4 or form == "symmetric") and packed.min_form == (form != "symmetric")
        for rows in ROWS:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            x[:, :3] *= 30  # outlier channels
            expected = reference(x, w, half=packed.half)
            # the kernels sum per-block terms in float32: their rounding scales with the terms, which cancel (in the
            # min form, scale * codes, all positive, against the minimums)
            terms = reference(x, w, half=packed.half, magnitude=True).max()
            for threads in (1, 2):
                got = packed(x, level, threads)
                assert np.abs(got - expected).max() / terms < 1e-6, (n, k, rows, threads)


def test_float16_scales_where_they_keep_the_value_float32_elsewhere(level):
    lib, level = level
    rng = np.random.default_rng(5)
    w = random_weight(rng, 40, 96, 4, 32, "symmetric")
    w.scales[3, 1] = 1e-7  # below float16's normal range: the whole weight keeps float32 scales
    packed = Packed(lib, w)
    assert not packed.half
    x = rng.standard_normal((20, 96)).astype(np.float32)
    assert relative_error(packed(x, level), reference(x, w, half=False)) < 2e-6
    # bytes: 16 outputs x 32 inputs of 4-bit codes and 16 float32 scales per block and panel
    assert packed.bytes == 3 * 3 * (16 * 32 // 2 + 16 * 4)


def test_folded_minimums_are_read_back_as_minimums(level):
    """A GGUF min-format weight as the converter folds it for int8 activations (convert.quantize.fold_mins: extra
    columns over [x, block_sums(x), ...]) runs as one matmul over x: its zero points and extra columns become
    per-block minimums again. Checked against numpy reading the folded weight the same way, and against the
    original minimums within the fold's own precision."""
    lib, level = level
    rng = np.random.default_rng(7)
    for bits in (4, 8):
        original = random_weight(rng, 50, 256, bits, 32, "minimums")
        original.mins = (original.mins + original.scales * 5).astype(np.float32)
        folded = fold_mins(original)
        packed = Packed(lib, folded, widened_k=original.k)
        assert packed.k == original.k and packed.min_form
        # numpy: the folded weight decoded, its extra columns summed into the block each copy's position holds
        decoded = folded.dequantize().astype(np.float64)
        k_blocks = original.k_blocks
        mins = -folded.scales[:, :k_blocks] * folded.zero_points_or_default()[:, :k_blocks].astype(np.float64)
        for column in range(original.k, folded.k):
            mins[:, (column - original.k) % k_blocks] += decoded[:, column]
        read_back = QuantizedWeight(bits, 32, original.k, folded.codes[:, :k_blocks], folded.scales[:, :k_blocks],
                                    np.zeros((50, k_blocks), np.uint8), mins.astype(np.float32))
        x = rng.standard_normal((21, original.k)).astype(np.float32)
        got = packed(x, level)
        assert relative_error(got, reference(x, read_back, half=packed.half)) < 2e-6
        # the fold keeps each minimum to 1/196 of its row's largest remainder (4-bit digits; 1/254 for 8-bit)
        assert relative_error(got, reference(x, original, half=packed.half)) < 1e-2


def test_a_gated_weight_returns_silu_of_the_gate_times_up(level):
    """A fused gate/up projection packed for the gated MLP: silu(x @ gate^T) * (x @ up^T), from the same matmul."""
    lib, level = level
    rng = np.random.default_rng(11)
    for form in ("symmetric", "zero points"):
        w = random_weight(rng, 96, 200, 4, 32, form)
        plain, gated = Packed(lib, w), Packed(lib, w, glu=True)
        for rows in (1, 5, 40):
            x = rng.standard_normal((rows, 200)).astype(np.float32)
            full = plain(x, level)
            gate, up = full[:, :48].astype(np.float64), full[:, 48:]
            assert relative_error(gated(x, level, threads=2), gate / (1 + np.exp(-gate)) * up) < 1e-6
    with pytest.raises(AssertionError, match="halves of whole panels"):
        Packed(lib, random_weight(rng, 40, 64, 4, 32, "symmetric"), glu=True)


def test_a_bad_layout_is_one_clear_error():
    if LIB is None:
        pytest.skip("the kernel library is not built")
    message = ctypes.create_string_buffer(256)
    codes, scales = np.zeros(64, np.uint8), np.ones(4, np.float32)
    for bits, block, what in ((2, 32, "only 4- and 8-bit"), (4, 24, "power of two"), (4, 512, "power of two")):
        assert not LIB.edgellm_pack(codes.ctypes.data, scales.ctypes.data, None, None, 4, 32, bits, block, 0, 0,
                                    message, 256)
        assert what in message.value.decode()


# --- in ONNX Runtime ---------------------------------------------------------------------------------------------

def load(bundle, setting: str, monkeypatch):
    monkeypatch.setenv(kernels.SWITCH, setting)
    return edgellm.load(bundle)


def test_a_bundle_runs_on_the_kernels_with_the_stock_answers(bundle, monkeypatch):
    """The tiny llama at w4 (and its w8 lm_head): every MatMulNBits swapped; against the same weights with float
    activations (accuracy level 0, which the kernels leave to ONNX Runtime), the kernels' int8 rounding errs no more
    than ONNX Runtime's own at level 4; the same greedy answer."""
    if LIB is None:
        pytest.skip("the kernel library is not built")
    path = bundle("llama", "w4")
    stock = load(path, "off", monkeypatch)
    assert not stock.engine.kernels.status.active and stock.engine.kernels.swapped == 0
    mine = load(path, "auto", monkeypatch)
    use = mine.engine.kernels
    assert use.status.active and use.swapped == 2 * 4 + 1 and not use.kept, use.describe()  # qkv, o, gate_up, down
    ops = [n.op_type for n in onnx.load_from_string(swap((path / "decoder.onnx").read_bytes(), use)).graph.node]
    assert ops.count("MatMulBlocks") == 9 and "MatMulNBits" not in ops
    assert not {"Split", "Sigmoid"} & set(ops)  # the gated MLP's activation went into the gate/up matmul
    # and the RMS norms into the matmuls they feed (qkv, gate/up, and the final norm into the lm_head)
    assert not {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} & set(ops)
    ids = stock.tokenizer.encode(open(__file__).read()[:400])
    exact = load(bundle("llama", "w4", accuracy_level=0), "auto", monkeypatch).logits(ids)
    mine_error, stock_error = (relative_error(m.logits(ids), exact) for m in (mine, stock))
    print(f"int8 activations against float ones: edgellm {mine_error:.2e}, ONNX Runtime {stock_error:.2e}")
    assert mine_error < 1.25 * stock_error
    for model in (stock, mine):
        model.answer = model.generate("Hello there", max_new_tokens=12).token_ids
    assert mine.answer == stock.answer


def test_the_switch_forces_a_level_or_turns_them_off(bundle, monkeypatch):
    if LIB is None:
        pytest.skip("the kernel library is not built")
    path = bundle("llama", "w4")
    assert load(path, "avx2", monkeypatch).engine.kernels.status.level == 1
    monkeypatch.setenv(kernels.SWITCH, "sse9")
    with pytest.raises(EdgeLLMError, match="EDGELLM_KERNELS='sse9' is not a kernel setting; use auto, off"):
        edgellm.load(path)


def test_without_the_library_onnx_runtime_runs_the_bundle_saying_so_once(bundle, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "library_path", lambda: None)
    kernels.native.cache_clear()
    kernels._status.cache_clear()
    kernels._said.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="edgellm.kernels"):
            first = edgellm.load(bundle("llama", "w4"))
            edgellm.load(bundle("llama", "w4"))
        said = [r.getMessage() for r in caplog.records if r.name == "edgellm.kernels"]
        assert len(said) == 1 and "kernel library was not built" in said[0], said
        assert "ONNX Runtime's kernels" in first.engine.kernels.describe()
        assert first.generate("Hello", max_new_tokens=4).token_ids
    finally:
        kernels.native.cache_clear()
        kernels._status.cache_clear()


def test_a_library_of_another_version_is_not_used(bundle, monkeypatch, caplog):
    """A stale build (the Python side updated, the library not rebuilt) would be handed ops it does not know: it is
    refused, saying how to rebuild, and ONNX Runtime's kernels run the bundle."""
    if LIB is None:
        pytest.skip("the kernel library is not built")
    monkeypatch.setattr(kernels, "VERSION", kernels.VERSION + 1)
    kernels._status.cache_clear()
    kernels._said.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="edgellm.kernels"):
            model = edgellm.load(bundle("llama", "w4"))
        assert "built from another version of edgellm" in model.engine.kernels.describe()
        assert "pip install -e ." in caplog.text and model.generate("Hi", max_new_tokens=3).token_ids
    finally:
        kernels._status.cache_clear()


def test_the_rewrite_leaves_float_activations_and_float_graphs_alone(bundle, monkeypatch):
    if LIB is None:
        pytest.skip("the kernel library is not built")
    exact = load(bundle("llama", "w4", accuracy_level=0), "auto", monkeypatch).engine.kernels
    assert exact.swapped == 0 and exact.kept == {"float activations (accuracy level below 4)": 9}
    assert load(bundle("llama", "f32"), "auto", monkeypatch).engine.kernels.swapped == 0


# --- attention ---------------------------------------------------------------------------------------------------

def attention_session(op: str, domain: str, attributes: dict, packed: bool, rotary: bool):
    from onnx import TensorProto, helper

    inputs = ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value", "seqlens_k",
              "total"] + (["cos", "sin"] if rotary else [])
    declared = [helper.make_tensor_value_info(n, TensorProto.INT32 if n in ("seqlens_k", "total") else
                                              TensorProto.FLOAT, None) for n in inputs if n]
    node = helper.make_node(op, inputs, ["out", "present_key", "present_value"], domain=domain, **attributes)
    graph = helper.make_graph([node], "attention", declared,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("out", "present_key", "present_value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
                              ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if domain == DOMAIN:
        options.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


ATTENTION_CASES = {  # (heads, kv heads, head size, packed, rotary dims, interleaved, window, softcap, scale)
    "packed, rotary": (8, 2, 32, True, 32, False, -1, 0.0, 0.0),
    "separate q/k/v, no rotary": (4, 4, 16, False, 0, False, -1, 0.0, 0.0),
    "partial interleaved rotary": (6, 3, 32, True, 16, True, -1, 0.0, 0.0),
    "window and softcap": (4, 1, 16, True, 16, False, 5, 3.0, 0.2),
    "multi-query, head 64": (4, 1, 64, False, 0, False, -1, 0.0, 0.125),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_group_query_attention(case):
    """DecoderAttention against ONNX Runtime's GroupQueryAttention on the same inputs: new rows of sequences at
    different lengths (decoding, S = 1), a chunk of rows after a past (prefill, S = 7), the caches bound in place (as
    the engine binds them) and not (copied first)."""
    if LIB is None:
        pytest.skip("the kernel library is not built")
    heads, kv_heads, d, packed, rotary_dim, interleaved, window, softcap, scale = ATTENTION_CASES[case]
    attributes = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary_dim > 0),
                      rotary_interleaved=int(interleaved))
    if window > 0:
        attributes["local_window_size"] = window
    if softcap:
        attributes["softcap"] = softcap
    if scale:
        attributes["scale"] = scale
    stock = attention_session("GroupQueryAttention", "com.microsoft", attributes, packed, rotary_dim > 0)
    mine = attention_session("DecoderAttention", DOMAIN, attributes, packed, rotary_dim > 0)
    rng = np.random.default_rng(len(case))
    capacity = 40
    for batch, s, lengths in ((1, 1, [13]), (3, 1, [0, 9, 30]), (1, 7, [7]), (1, 7, [20])):
        feed = {"seqlens_k": np.array(lengths, np.int32) + s - 1, "total": np.array(max(lengths) + s, np.int32)}
        width = (heads + 2 * kv_heads) * d if packed else heads * d
        feed["query"] = rng.standard_normal((batch, s, width)).astype(np.float32)
        if not packed:
            feed["key"] = rng.standard_normal((batch, s, kv_heads * d)).astype(np.float32)
            feed["value"] = rng.standard_normal((batch, s, kv_heads * d)).astype(np.float32)
        if rotary_dim:
            angles = np.arange(capacity)[:, None] * (0.3 / (1 + np.arange(rotary_dim // 2)))[None]
            feed["cos"], feed["sin"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        past = rng.standard_normal((2, batch, kv_heads, capacity, d)).astype(np.float32)
        results = {}
        for name, session in (("stock", stock), ("mine", mine)):
            caches = past.copy()
            binding = session.io_binding()
            for key, value in feed.items():
                binding.bind_cpu_input(key, value)
            for i, kind in enumerate(("key", "value")):  # in place, as the engine binds them
                value = ort.OrtValue.ortvalue_from_numpy(caches[i])
                binding.bind_ortvalue_input(f"past_{kind}", value)
                binding.bind_ortvalue_output(f"present_{kind}", value)
            binding.bind_output("out")
            session.run_with_iobinding(binding)
            results[name] = (binding.get_outputs()[-1].numpy(), caches)  # "out", bound last
            if name == "mine":  # and not in place: the past is copied into fresh present buffers
                apart = session.run(None, {**feed, "past_key": past[0], "past_value": past[1]})
                np.testing.assert_allclose(apart[0], results[name][0], rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(np.stack(apart[1:]), caches)
        (want, want_caches), (got, got_caches) = results["stock"], results["mine"]
        for b, length in enumerate(lengths):  # positions past each sequence's end hold the stock kernel's leftovers
            np.testing.assert_allclose(got_caches[:, b, :, :length + s], want_caches[:, b, :, :length + s],
                                       rtol=1e-6, atol=1e-6)
        assert relative_error(got, want) < 1e-5, (batch, s, lengths)


def test_attention_outside_the_cache_is_one_clear_error():
    if LIB is None:
        pytest.skip("the kernel library is not built")
    session = attention_session("DecoderAttention", DOMAIN, dict(num_heads=2, kv_num_heads=1), True,
                                False)
    feed = {"query": np.zeros((1, 1, 4 * 8), np.float32), "past_key": np.zeros((1, 1, 4, 8), np.float32),
            "past_value": np.zeros((1, 1, 4, 8), np.float32), "seqlens_k": np.array([4], np.int32),
            "total": np.array(5, np.int32)}
    with pytest.raises(Exception, match="seqlens_k\\[0\\] = 4 is outside the cache"):
        session.run(None, feed)
