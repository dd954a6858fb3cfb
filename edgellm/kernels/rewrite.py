"""The load-time graph rewrite: a bundle's `com.microsoft.MatMulNBits` nodes become edgellm's `MatMulBlocks` (same
inputs and attributes, the weights repacked when the session is created), so the bundle on disk stays a standard
graph that ONNX Runtime's own kernels, OpenVINO or another provider run as it is.

Two shapes of the converter's graphs are recognised: a MatMulNBits node alone, and one whose per-block minimums
(GGUF Q4_1, Q4_K, ...) were folded into extra columns over ``Concat(x, block_sums(x), ...)`` (convert.quantize.
fold_mins): that becomes one MatMulBlocks over x, which turns the extra columns back into minimums when it
repacks, and the Concat and block sums go. A fused gate/up projection followed by the gated MLP's activation,
``Split -> silu(gate) = gate * Sigmoid(gate) -> * up``, becomes one MatMulBlocks that returns silu(gate) * up: four
nodes and two passes over the activations less per layer. The RMS norm that feeds a swapped matmul, alone
(SimplifiedLayerNormalization) or after the residual add (SkipSimplifiedLayerNormalization, whose sum the matmul
then returns as its second output), goes into it too: a node less before each.

GroupQueryAttention nodes over a float cache whose attributes the library covers become DecoderAttention (the
same inputs, outputs and attributes; csrc/attention.cpp): ONNX Runtime's kernel has a fixed cost per call that a
small model's decoding and batched decoding feel.
Only nodes with int8 activations (accuracy_level 4, the contract the kernels keep) and weights as initializers are
swapped; the rest stay ONNX Runtime's, and the reason is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .proto import (
    BYTES,
    VARINT,
    Field,
    Message,
    Node,
    float_attribute,
    int_attribute,
    names_used_in,
    tensor_ints,
    tensor_name,
)

DOMAIN = "ai.edgellm.kernels"
OP = "MatMulBlocks"
FLOAT, UINT8 = 1, 2  # TensorProto data types


ATTENTION_OP = "DecoderAttention"
# GroupQueryAttention's attributes DecoderAttention computes; a node with any other (an int8 cache's quantization,
# smooth softmax...) stays ONNX Runtime's
ATTENTION_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
                        "rotary_interleaved"}


@dataclass
class Rewrite:
    model: bytes  # the graph to load (the original bytes when nothing was swapped)
    swapped: int = 0  # MatMulNBits nodes now MatMulBlocks
    attention: int = 0  # GroupQueryAttention nodes now DecoderAttention
    kept: Counter = field(default_factory=Counter)  # reason -> MatMulNBits nodes left to ONNX Runtime


class _Graph:
    def __init__(self, graph: Message):
        self.nodes = [Node.parse(d) for d in graph.all(1)]
        self.initializers = {tensor_name(t): Message.parse(t) for t in graph.all(5)}
        self.producer = {o: n for n in self.nodes for o in n.outputs if o}
        self.readers: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                self.readers.setdefault(i, []).append(n)
        # names read other than as a listed input of a node: graph outputs, and outer values read by subgraphs
        self.implicit = names_used_in(graph) - set(self.readers)

    def made_by(self, name: str, op_type: str) -> Node | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def block_sums_of(self, name: str, x: str) -> int | None:
        """The width of x when `name` is ReduceSum(Reshape(x, [0, 0, blocks, block]), [-1]): block sums of x."""
        total = self.made_by(name, "ReduceSum")
        if total is None or not total.inputs:
            return None
        reshape = self.made_by(total.inputs[0], "Reshape")
        if reshape is None or reshape.inputs[0] != x or reshape.inputs[1] not in self.initializers:
            return None
        shape = tensor_ints(self.initializers[reshape.inputs[1]].encode())
        if not shape or len(shape) != 4 or shape[2] <= 0 or shape[3] <= 0:
            return None
        return shape[2] * shape[3]


def _eligible(g: _Graph, node: Node) -> str | None:
    """Why a MatMulNBits node stays ONNX Runtime's (None: it can be swapped)."""
    if node.int_attribute("accuracy_level", 0) != 4:
        return "float activations (accuracy level below 4)"
    bits, block = node.int_attribute("bits", 4), node.int_attribute("block_size", 0)
    if bits not in (4, 8):
        return f"{bits}-bit codes"
    if block not in (16, 32, 64, 128, 256):
        return f"blocks of {block}"
    if any(name for name in node.inputs[4:]):
        return "g_idx or bias inputs"
    weights = [name for name in node.inputs[1:4] if name]
    if len(weights) < 2 or any(name not in g.initializers for name in weights):
        return "weights computed in the graph"
    if g.initializers[node.inputs[2]].first(2) != FLOAT:
        return "non-float32 scales"
    if len(node.inputs) > 3 and node.inputs[3] and g.initializers[node.inputs[3]].first(2) != UINT8:
        return "float zero points"
    return None


def rewrite(model_bytes: bytes, isa: int) -> Rewrite:
    """The model with every eligible MatMulNBits swapped for MatMulBlocks at instruction-set level `isa`."""
    model = Message.parse(model_bytes)
    graph_bytes = model.first(7)
    if graph_bytes is None:
        return Rewrite(model_bytes)
    graph = Message.parse(graph_bytes)
    g = _Graph(graph)
    out = Rewrite(model_bytes)
    replaced: dict[int, Node] = {}  # id(original node) -> its MatMulBlocks
    removed: set[int] = set()  # nodes a MatMulBlocks took over
    bypassed: list[Node] = []  # nodes whose only reader was swapped away: dropped if nothing reads them now
    for node in g.nodes:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            if set(node.attributes) <= ATTENTION_ATTRIBUTES and len(node.inputs) <= 9 and len(node.outputs) == 3:
                replaced[id(node)] = Node(ATTENTION_OP, DOMAIN, node.inputs, node.outputs, node.name,
                                          node.attributes, node.rest)
                out.attention += 1
            continue
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        reason = _eligible(g, node)
        if reason:
            out.kept[reason] += 1
            continue
        # MatMulNBits requires K, N and block_size (ONNX Runtime refuses a graph without them)
        x, k, n = node.inputs[0], node.int_attribute("K", 0), node.int_attribute("N", 0)
        inputs = [x] + [node.inputs[i] if i < len(node.inputs) else "" for i in (1, 2, 3)]
        attributes = {"K": k, "N": n, "bits": node.int_attribute("bits", 4), "block_size":
                      node.int_attribute("block_size", 0), "isa": isa}
        concat = g.made_by(x, "Concat")
        if concat is not None and len(concat.inputs) > 1:
            sums = set(concat.inputs[1:])
            width = g.block_sums_of(concat.inputs[1], concat.inputs[0]) if len(sums) == 1 else None
            if width is None:
                out.kept["an input built in an unknown way"] += 1
                continue
            inputs[0] = concat.inputs[0]
            attributes["widened_k"] = width
            bypassed.append(concat)
        outputs = list(node.outputs[:1])
        gated = _silu_glu(g, node)
        if gated is not None:
            outputs = list(gated[-1].outputs[:1])
            attributes["glu"] = 1
            removed |= {id(n) for n in gated}
        replaced[id(node)] = Node(OP, DOMAIN, inputs, outputs, node.name,
                                  {name: int_attribute(name, v) for name, v in attributes.items()})
        out.swapped += 1
    if not out.swapped and not out.attention:
        return out

    nodes = [replaced.get(id(n), n) for n in g.nodes if id(n) not in removed]
    nodes = _without_dead(nodes, bypassed, graph)
    nodes = _with_norms_fused(nodes, g.implicit)
    # initializers only the removed nodes read (block shapes, axes) go with them
    read = {i for n in nodes for i in n.inputs} | g.implicit
    dropped = {i for n in g.nodes for i in n.inputs if i in g.initializers and i not in read}
    fields, placed = [], False
    for f in graph.fields:
        if f.number == 1:
            if not placed:
                fields += [Field(1, BYTES, n.encode()) for n in nodes]
                placed = True
        elif not (f.number == 5 and isinstance(f.value, bytes) and tensor_name(f.value) in dropped):
            fields.append(f)
    opset = Message([Field(1, BYTES, DOMAIN.encode()), Field(2, VARINT, 1)])
    model_fields = [Field(7, BYTES, Message(fields).encode()) if f.number == 7 else f for f in model.fields]
    model_fields.append(Field(8, BYTES, opset.encode()))
    out.model = Message(model_fields).encode()
    return out


def _silu_glu(g: _Graph, node: Node) -> list[Node] | None:
    """[Split, Sigmoid, Mul, Mul] when node's output is only split into equal gate and up halves (each a whole
    number of the kernels' 16-output panels) that only become silu(gate) * up; else None."""
    y = node.outputs[0]
    y_readers = g.readers.get(y, [])
    if len(y_readers) != 1 or y in g.implicit or y_readers[0].op_type != "Split" or len(y_readers[0].outputs) != 2:
        return None
    split = y_readers[0]
    n = node.int_attribute("N", 0)
    sizes = tensor_ints(g.initializers[split.inputs[1]].encode()) if len(split.inputs) > 1 and \
        split.inputs[1] in g.initializers else None
    if split.int_attribute("axis", 0) != -1 or sizes != [n // 2, n // 2] or (n // 2) % 16:
        return None
    gate, up = split.outputs
    gate_readers = g.readers.get(gate, [])
    sigmoid = next((r for r in gate_readers if r.op_type == "Sigmoid"), None)
    silu = next((r for r in gate_readers if r.op_type == "Mul"), None)
    if len(gate_readers) != 2 or sigmoid is None or silu is None or sorted(silu.inputs) != sorted(
            [gate, sigmoid.outputs[0]]) or g.readers.get(sigmoid.outputs[0]) != [silu]:
        return None
    silu_readers = g.readers.get(silu.outputs[0], [])
    if len(silu_readers) != 1:
        return None
    times_up = silu_readers[0]
    if (times_up.op_type != "Mul"
            or sorted(times_up.inputs) != sorted([silu.outputs[0], up]) or g.readers.get(up) != [times_up]):
        return None
    if {gate, up, sigmoid.outputs[0], silu.outputs[0]} & g.implicit:
        return None
    return [split, sigmoid, silu, times_up]


def _with_norms_fused(nodes: list[Node], implicit: set[str]) -> list[Node]:
    """Each MatMulBlocks whose input is an RMS norm's output that nothing else reads takes the norm in: inputs 4-5
    (the residual to add first, or empty, and the norm's weight), attribute norm_epsilon, and the norm's residual
    sum as its second output where anything reads it."""
    reads = Counter(i for n in nodes for i in n.inputs)
    producer = {o: n for n in nodes for o in n.outputs if o}
    fused: set[int] = set()
    for node in nodes:
        if node.op_type != OP or node.domain != DOMAIN or reads[node.inputs[0]] != 1 or node.inputs[0] in implicit:
            continue
        norm = producer.get(node.inputs[0])
        if norm is None or norm.outputs[0] != node.inputs[0] or id(norm) in fused:
            continue
        if norm.op_type == "SimplifiedLayerNormalization" and norm.domain in ("", "ai.onnx"):
            if norm.int_attribute("axis", -1) != -1 or len(norm.inputs) != 2 or any(o for o in norm.outputs[1:]):
                continue
            skip, total = "", None
        elif norm.op_type == "SkipSimplifiedLayerNormalization" and norm.domain == "com.microsoft":
            if len(norm.inputs) != 3 or any(o and (reads[o] or o in implicit) for o in norm.outputs[1:3]):
                continue
            skip, total = norm.inputs[1], (norm.outputs[3] if len(norm.outputs) > 3 and norm.outputs[3] else None)
        else:
            continue
        node.inputs = [norm.inputs[0], node.inputs[1], node.inputs[2], node.inputs[3], skip, norm.inputs[-1]]
        node.attributes["norm_epsilon"] = float_attribute("norm_epsilon", norm.float_attribute("epsilon", 1e-5))
        if total is not None:
            node.outputs = [node.outputs[0], total]
        fused.add(id(norm))
    return [n for n in nodes if id(n) not in fused]


def _without_dead(nodes: list[Node], candidates: list[Node], graph: Message) -> list[Node]:
    """`nodes` without those of `candidates` (and, in turn, their inputs' producers among the bypassed kinds) that
    nothing reads any more."""
    reads = Counter(i for n in nodes for i in n.inputs)
    kept = {n for node in nodes for sub in node.subgraphs() for n in names_used_in(sub)}
    kept |= {Message.parse(o).string(1) for o in graph.all(12)}
    producer = {o: node for node in nodes for o in node.outputs if o}
    dead: set[int] = set()
    todo = list(candidates)
    while todo:
        node = todo.pop()
        if id(node) in dead or any(reads[o] or o in kept for o in node.outputs):
            continue
        dead.add(id(node))
        for i in node.inputs:
            reads[i] -= 1
            if i in producer and producer[i].op_type in ("Reshape", "ReduceSum", "Concat"):
                todo.append(producer[i])
    return [n for n in nodes if id(n) not in dead]
