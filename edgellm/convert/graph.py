"""A small ONNX graph builder: one method per op the model families use, so a family file reads like the model.

Activations are float32 everywhere (the CPU kernels are fastest and exact there); only weights change with the
precision policy: float32, float16 (stored half-size, widened once at session start), or MatMulNBits blocks.
Weights go to the graph's external data file the moment they are made (`DataFile`), so converting a model holds
one weight at a time, never the graph's.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, overload

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..format import QuantizedWeight
from ..modeling.layers import MS
from .quantize import concat_rows, fold_mins, folded_sums_copies, quantize, row_pieces

OPSET = 17
IR_VERSION = 10  # onnx 1.23 writes IR 12 by default, which ONNX Runtime 1.31 refuses
DTYPES = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}


@dataclass
class WeightPolicy:
    """How float weights are stored. Pre-quantized blocks (from a GGUF) are kept whenever the mode is w4/w8."""

    mode: str = "w4"  # f32 | f16 | w8 | w4
    group_size: int = 64
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: int8 activations (VNNI/AMX path); 0 keeps float activations
    # MatMulNBits blocks over this many bytes of codes are stored as row pieces, one node each (+ Concat): ONNX
    # Runtime holds a weight's mapped bytes and its packed copy at once while it packs it, so one large lm_head
    # raises the load's peak by its whole size
    max_piece_bytes: int | None = None

    @property
    def bits(self) -> int | None:
        return {"w4": 4, "w8": 8}.get(self.mode)


@dataclass
class LoraSlots:
    """LoRA branches compiled into a decoder (convert --lora-slots): every targeted projection y = x W^T gains
    + (x A) B, A [in, rank] and B [rank, out] (the adapter's scale folded in) graph inputs per sequence of the batch
    that the runtime fills from a loaded adapter (zeros: none)."""

    rank: int
    batch: int | str  # the decoder's batch dimension
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shapes: dict = field(default_factory=dict)  # projection -> [in, out], as compiled

    def wants(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1] in self.targets


def _in_out(weight) -> tuple[int, int]:
    """(in, out) features of a projection's weight: [out, in] floats or blocks."""
    return (weight.shape[1], weight.shape[0]) if isinstance(weight, np.ndarray) else (weight.k, weight.n)


class DataFile:
    """A graph's external data file, written as the graph is built: each initializer of EXTERNAL_BYTES or more is
    appended, and the graph keeps only where it is, as onnx.save_model(save_as_external_data=True) lays them out.
    (Its bytes never enter a TensorProto: protobuf keeps a message's bytes until the message goes, even cleared.)"""

    EXTERNAL_BYTES = 1024 - sys.getsizeof(b"")  # onnx's size_threshold of 1024, which counts the bytes object

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file: BinaryIO | None = None

    def wants(self, array: np.ndarray) -> bool:
        return array.nbytes >= self.EXTERNAL_BYTES

    def write(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if self.file is None:  # created on first use: a graph without large weights has no data file
            self.file = open(self.path, "wb")
        file = self.file
        offset = file.tell()
        file.write(np.ascontiguousarray(array).data)
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", offset), ("length", file.tell() - offset)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.chmod(self.path, 0o644)


class GraphBuilder:
    def __init__(self, policy: WeightPolicy, data: DataFile | None = None):
        """`data`: where large initializers go as they are made (None: kept in the graph, as tests build them)."""
        self.policy = policy
        self.data = data
        self.lm_head_policy = policy  # the converter may keep the lm_head at higher precision
        self.lora: LoraSlots | None = None  # LoRA branches to compile beside the targeted projections
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count: dict[str, int] = {}
        self._block_sums: dict[tuple, str] = {}  # per input and layout: its block sums, or it widened by them
        self.matmul_formats: dict[str, int] = {}  # e.g. {"4-bit/32 +mins": 120}: what the bundle really holds
        # per MatMulNBits weight: its format and, per row piece, its initializers' names (codes, scales[, zeros])
        self.nbits_weights: dict[str, dict] = {}

    # --- plumbing ------------------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def input(self, name: str, dtype, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], shape))
        return name

    def output(self, name: str, dtype, shape: list, value: str | None = None) -> None:
        """Declare a graph output; `value` is the tensor to expose under `name` if a node made it under another."""
        if value is not None and value != name:
            self.op("Identity", [value], name=name, outputs=[name])  # (named after its one output)
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], shape))

    def const(self, array: np.ndarray, name: str) -> str:
        name = self._fresh(name)
        array = np.asarray(array)  # (np.ascontiguousarray would turn a scalar into a 1-element vector)
        # rotary tables are as long as the bundle: kept in the graph, so that bundles of one model at other lengths
        # write the same data file (--share-weights-with)
        if self.data is not None and self.data.wants(array) and not name.startswith("rope."):
            self.initializers.append(self.data.write(array, name))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array) if array.ndim else array,
                                                             name))
        return name

    @overload
    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: Literal[1] = 1,
           domain: str = "", **attrs) -> str: ...

    @overload
    def op(self, op_type: str, inputs: list[str], name: str | None = None, *, outputs: list[str] | int,
           domain: str = "", **attrs) -> list[str]: ...

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: list[str] | int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        """A node; its one output's name, or (outputs: a count above 1, or names) the list of them."""
        base = self._fresh(name or op_type)
        if isinstance(outputs, int):
            outputs = [base if outputs == 1 else f"{base}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def branch(self) -> GraphBuilder:
        """A builder for an If branch: it may read this graph's values, and its names stay unique in the model. Its
        constants (a few numbers each) stay inside the graph."""
        sub = GraphBuilder(self.policy)
        sub._count = self._count
        return sub

    def if_then_else(self, condition: str, then: tuple[GraphBuilder, str], otherwise: tuple[GraphBuilder, str],
                     name: str) -> str:
        """One float tensor: the `then` branch's value when `condition` (a bool scalar) holds, else `otherwise`'s."""
        graphs = []
        for kind, (sub, value) in (("then", then), ("else", otherwise)):
            out = helper.make_tensor_value_info(value, TensorProto.FLOAT, None)
            graphs.append(helper.make_graph(sub.nodes, f"{name}/{kind}", [], [out], sub.initializers))
        return self.op("If", [condition], name=name, then_branch=graphs[0], else_branch=graphs[1])

    def to_model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "edgellm", self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="edgellm")

    # --- ops -------------------------------------------------------------------------------------
    def ints(self, values, name: str) -> str:
        return self.const(np.asarray(values, np.int64), name)

    def reshape(self, x: str, shape: list[int], name: str = "reshape") -> str:
        return self.op("Reshape", [x, self.ints(shape, f"{name}/shape")], name=name)

    def add(self, a: str, b: str, name: str = "add") -> str:
        return self.op("Add", [a, b], name=name)

    def mul(self, a: str, b: str, name: str = "mul") -> str:
        return self.op("Mul", [a, b], name=name)

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        w = self.const(weight.astype(np.float32), f"{name}.weight")
        return self.op("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=float(eps), stash_type=1)

    def layer_norm(self, x: str, weight: np.ndarray, bias: np.ndarray, eps: float, name: str) -> str:
        w = self.const(weight.astype(np.float32), f"{name}.weight")
        b = self.const(bias.astype(np.float32), f"{name}.bias")
        return self.op("LayerNormalization", [x, w, b], name=name, axis=-1, epsilon=float(eps))

    def add_rms_norm(self, x: str, residual: str, weight: np.ndarray, eps: float, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual) in one fused kernel."""
        w = self.const(weight.astype(np.float32), f"{name}.weight")
        outs = [f"{name}:out", "", "", f"{name}:sum"]
        self.op("SkipSimplifiedLayerNormalization", [x, residual, w], name=name, outputs=outs, domain=MS,
                epsilon=float(eps))
        return outs[0], outs[3]

    def rotary(self, x: str, position_ids: str, cos: str, sin: str, num_heads: int, name: str,
               interleaved: bool = False, rotary_dim: int | None = None) -> str:
        """RotaryEmbedding over x [B, S, heads * head]: the first `rotary_dim` dimensions of each head (all of them
        by default) turned at their positions; cos and sin are [positions, rotary_dim / 2]."""
        if rotary_dim:
            return self.op("RotaryEmbedding", [x, position_ids, cos, sin], name=name, domain=MS, num_heads=num_heads,
                           interleaved=int(interleaved), rotary_embedding_dim=rotary_dim)
        return self.op("RotaryEmbedding", [x, position_ids, cos, sin], name=name, domain=MS, num_heads=num_heads,
                       interleaved=int(interleaved))

    def linear(self, x: str, weight: np.ndarray | QuantizedWeight, name: str, bias: np.ndarray | None = None,
               policy: WeightPolicy | None = None) -> str:
        """x @ weight.T (+ bias); weight is [out_features, in_features] like a torch Linear."""
        policy = policy or self.policy
        if isinstance(weight, QuantizedWeight) and policy.bits is None:
            weight = weight.dequantize()
        if isinstance(weight, np.ndarray) and policy.bits is not None:
            weight = quantize(weight, policy.bits, policy.group_size, policy.symmetric)
        if isinstance(weight, QuantizedWeight):
            y = self._matmul_nbits(x, weight, name, policy.accuracy_level, policy.max_piece_bytes)
        else:
            w_t = np.ascontiguousarray(weight.T)
            if policy.mode == "f16":
                w = self.op("Cast", [self.const(w_t.astype(np.float16), f"{name}.weight")], name=f"{name}/cast",
                            to=TensorProto.FLOAT)
            else:
                w = self.const(w_t.astype(np.float32), f"{name}.weight")
            y = self.op("MatMul", [x, w], name=name)
        if bias is not None:
            y = self.add(y, self.const(bias.astype(np.float32), f"{name}.bias"), name=f"{name}/bias")
        if self.lora is not None and self.lora.wants(name):
            y = self.add(y, self.lora_branch(x, name, *_in_out(weight)), name=f"{name}/lora")
        return y

    def lora_branch(self, x: str, name: str, k: int, n: int) -> str:
        """(x A) B of the projection `name` [in k, out n], A and B graph inputs (LoraSlots)."""
        assert self.lora is not None, "LoRA branches are built only for bundles with LoRA slots"
        r, batch = self.lora.rank, self.lora.batch
        self.lora.shapes[name] = [k, n]
        a = self.input(f"lora_a.{name}", np.float32, [batch, k, r])
        b = self.input(f"lora_b.{name}", np.float32, [batch, r, n])
        return self.op("MatMul", [self.op("MatMul", [x, a], name=f"{name}/lora_a"), b], name=f"{name}/lora_b")

    def rounded(self, weight: np.ndarray | QuantizedWeight) -> np.ndarray:
        """A projection's weight as floats, rounded as this bundle's precision stores projections: for a family that
        uses a checkpoint's projection in another form than one matmul (split per head, multiplied into another)."""
        if isinstance(weight, QuantizedWeight):
            return weight.dequantize()
        if self.policy.bits is not None:
            return quantize(weight, self.policy.bits, self.policy.group_size, self.policy.symmetric).dequantize()
        return weight.astype(np.float16).astype(np.float32) if self.policy.mode == "f16" else weight

    @overload
    def fused_linear(self, x: str, weights: list, name: str, biases: list | None = None,
                     split: Literal[True] = True, parts: list[str] | None = None) -> list[str]: ...

    @overload
    def fused_linear(self, x: str, weights: list, name: str, biases: list | None = None, *,
                     split: Literal[False], parts: list[str] | None = None) -> str | None: ...

    def fused_linear(self, x: str, weights: list, name: str, biases: list | None = None,
                     split: bool = True, parts: list[str] | None = None) -> list[str] | str | None:
        """Several projections of the same input as one matmul (QKV, gate+up), split afterwards unless split=False.
        Pre-quantized weights of different block formats cannot share a matmul: then they stay apart, or, with
        split=False, None is returned. `parts`: the projections' own names, for LoRA branches (LoraSlots)."""
        sizes = [_in_out(w)[1] for w in weights]
        fused: np.ndarray | QuantizedWeight | None
        if all(isinstance(w, QuantizedWeight) for w in weights) and self.policy.bits is not None:
            fused = concat_rows(weights)
            if fused is None:
                if not split:
                    return None
                return [self.linear(x, w, f"{name}.{i}", None if biases is None else biases[i])
                        for i, w in enumerate(weights)]
        else:
            fused = np.concatenate([w if isinstance(w, np.ndarray) else w.dequantize() for w in weights])
        bias = None if biases is None else np.concatenate(biases)
        y = self.linear(x, fused, name, bias)
        if parts and self.lora is not None and all(self.lora.wants(p) for p in parts):  # one branch per part
            deltas = [self.lora_branch(x, p, *_in_out(w)) for p, w in zip(parts, weights)]
            y = self.add(y, self.op("Concat", deltas, name=f"{name}/lora", axis=-1), name=f"{name}/lora_add")
        if not split:
            return y
        return self.op("Split", [y, self.ints(sizes, f"{name}/sizes")], name=f"{name}/split", outputs=len(sizes),
                       axis=-1)

    def _matmul_nbits(self, x: str, w: QuantizedWeight, name: str, accuracy_level: int,
                      max_piece_bytes: int | None = None) -> str:
        kind = f"{w.bits}-bit/{w.block_size}" + (" +mins" if w.mins is not None else "")
        self.matmul_formats[kind] = self.matmul_formats.get(kind, 0) + 1
        if w.k_order is not None:  # the checkpoint's blocks group input columns out of order
            x = self.op("Gather", [x, self.const(w.k_order.astype(np.int64), f"{name}.k_order")],
                        name=f"{name}/k_order", axis=-1)
        mins: np.ndarray | None = w.mins
        if mins is not None and accuracy_level == 4:  # int8 activations: the mins become rows of the matmul itself
            x, w, mins = self._widened(x, w, name), fold_mins(w), None
        pieces = row_pieces(w, max_piece_bytes)
        record = self.nbits_weights[name] = {"bits": w.bits, "block_size": w.block_size, "k": w.k, "pieces": []}
        outputs = []
        for i, piece in enumerate(pieces):
            part = name if len(pieces) == 1 else f"{name}.{i}"
            inputs = [x, self.const(piece.packed_codes(), f"{part}.qweight"),
                      self.const(piece.scales.reshape(-1).astype(np.float32), f"{part}.scales")]
            zero_points = piece.packed_zero_points()
            if zero_points is not None:
                inputs.append(self.const(zero_points, f"{part}.zero_points"))
            record["pieces"].append(inputs[1:])
            outputs.append(self.op("MatMulNBits", inputs, name=part, domain=MS, K=w.k, N=piece.n, bits=w.bits,
                                   block_size=w.block_size, accuracy_level=accuracy_level))
        y = outputs[0] if len(outputs) == 1 else self.op("Concat", outputs, name=f"{name}/concat", axis=-1)
        if mins is None:
            return y
        # Float activations: sum_k x_k * (s q_k + m) = MatMulNBits(x) + block_sums(x) @ mins, exact.
        sums = self._block_sums_of(x, w.k, w.block_size, name=name)
        mins_name = self.const(np.ascontiguousarray(mins.T.astype(np.float32)), f"{name}.mins")
        return self.add(y, self.op("MatMul", [sums, mins_name], name=f"{name}/mins"), name=f"{name}/sum")

    def _block_sums_of(self, x: str, k: int, block_size: int, name: str) -> str:
        """block_sums(x) [1, S, k / block_size] of x [1, S, k] (the decoder's activations; min formats come from
        GGUF decoders only): a Reshape, which copies nothing, and a ReduceSum. Once per input (a fused QKV or
        gate/up shares it)."""
        key = (x, "sums", block_size)
        if key not in self._block_sums:
            blocks = self.reshape(x, [0, 0, k // block_size, block_size], name=f"{name}/blocks")
            self._block_sums[key] = self.op("ReduceSum", [blocks, self.ints([-1], f"{name}/axes")],
                                            name=f"{name}/block_sums", keepdims=0)
        return self._block_sums[key]

    def _widened(self, x: str, w: QuantizedWeight, name: str) -> str:
        """[x, block_sums(x), block_sums(x), ...], the input that `fold_mins(w)` multiplies; once per input."""
        copies = folded_sums_copies(w)
        key = (x, "widened", w.block_size, copies)
        if key not in self._block_sums:
            sums = self._block_sums_of(x, w.k, w.block_size, name=name)
            self._block_sums[key] = self.op("Concat", [x] + [sums] * copies, name=f"{name}/widen", axis=-1)
        return self._block_sums[key]


def data_file(folder: Path, graph_file: str) -> DataFile:
    """The data file beside graph `graph_file` in `folder`, which its large weights are written to as they are made."""
    return DataFile(folder / (graph_file + ".data"))


def save_graph(g: GraphBuilder, path: Path) -> None:
    """The graph itself; its large weights are in the data file already."""
    if g.data is not None:
        g.data.close()
    onnx.save_model(g.to_model(), path)
