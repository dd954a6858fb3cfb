"""Just enough of the protobuf wire format to edit an ONNX graph's node list at load, without the onnx package
(running a bundle never imports it): a message is a list of fields kept as they were read, so what is not touched
is written back byte for byte.

Field numbers are onnx.proto's: ModelProto (opset_import 8, graph 7), GraphProto (node 1, initializer 5, output 12),
NodeProto (input 1, output 2, name 3, op_type 4, attribute 5, domain 7), AttributeProto (name 1, f 2, i 3, g 6,
ints 8, graphs 11, type 20), TensorProto (dims 1, data_type 2, int64_data 7, name 8, raw_data 9), OperatorSetIdProto
(domain 1, version 2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import overload

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


def read_varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields: two's complement in ten bytes
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


@dataclass
class Field:
    number: int
    wire: int
    value: int | bytes  # an int (varint and fixed), or the bytes of a length-delimited field

    def encode(self) -> bytes:
        key = varint(self.number << 3 | self.wire)
        if isinstance(self.value, bytes):
            return key + varint(len(self.value)) + self.value
        if self.wire == VARINT:
            return key + varint(self.value)
        return key + struct.pack("<Q" if self.wire == FIXED64 else "<I", self.value)


@dataclass
class Message:
    fields: list[Field] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes) -> Message:
        view = memoryview(data)
        fields: list[Field] = []
        at = 0
        value: int | bytes
        while at < len(view):
            key, at = read_varint(view, at)
            number, wire = key >> 3, key & 7
            if wire == VARINT:
                value, at = read_varint(view, at)
            elif wire == BYTES:
                size, at = read_varint(view, at)
                value, at = bytes(view[at:at + size]), at + size
            elif wire == FIXED64:
                value, at = struct.unpack_from("<Q", data, at)[0], at + 8
            elif wire == FIXED32:
                value, at = struct.unpack_from("<I", data, at)[0], at + 4
            else:
                raise ValueError(f"unsupported protobuf wire type {wire}")
            fields.append(Field(number, wire, value))
        return cls(fields)

    def encode(self) -> bytes:
        return b"".join(f.encode() for f in self.fields)

    def all(self, number: int) -> list:
        return [f.value for f in self.fields if f.number == number]

    def first(self, number: int, default=None):
        return next((f.value for f in self.fields if f.number == number), default)

    def strings(self, number: int) -> list[str]:
        return [v.decode() for v in self.all(number)]

    def string(self, number: int, default: str = "") -> str:
        value = self.first(number)
        return default if value is None else value.decode()


# --- ONNX records ----------------------------------------------------------------------------------------------

@dataclass
class Node:
    """A NodeProto: what the rewrite reads, and the fields it does not, kept to write back."""

    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    name: str
    attributes: dict[str, Message]  # by name, as read
    rest: list[Field] = field(default_factory=list)  # doc string, metadata: kept as they are

    @classmethod
    def parse(cls, data: bytes) -> Node:
        m = Message.parse(data)
        attributes = {Message.parse(a).string(1): Message.parse(a) for a in m.all(5)}
        rest = [f for f in m.fields if f.number not in (1, 2, 3, 4, 5, 7)]
        return cls(m.string(4), m.string(7), m.strings(1), m.strings(2), m.string(3), attributes, rest)

    @overload
    def int_attribute(self, name: str) -> int | None: ...

    @overload
    def int_attribute(self, name: str, default: int) -> int: ...

    def int_attribute(self, name: str, default: int | None = None) -> int | None:
        a = self.attributes.get(name)
        if a is None:
            return default
        value = a.first(3, 0)
        return value - (1 << 64) if value >= 1 << 63 else value

    @overload
    def float_attribute(self, name: str) -> float | None: ...

    @overload
    def float_attribute(self, name: str, default: float) -> float: ...

    def float_attribute(self, name: str, default: float | None = None) -> float | None:
        a = self.attributes.get(name)
        return default if a is None else struct.unpack("<f", struct.pack("<I", a.first(2, 0)))[0]

    def subgraphs(self) -> list[Message]:
        return [Message.parse(g) for a in self.attributes.values() for g in a.all(6) + a.all(11)]

    def encode(self) -> bytes:
        fields = [Field(1, BYTES, i.encode()) for i in self.inputs] + [Field(2, BYTES, o.encode()) for o in
                                                                        self.outputs]
        if self.name:
            fields.append(Field(3, BYTES, self.name.encode()))
        fields.append(Field(4, BYTES, self.op_type.encode()))
        fields += [Field(5, BYTES, a.encode()) for a in self.attributes.values()]
        if self.domain:
            fields.append(Field(7, BYTES, self.domain.encode()))
        return Message(fields + self.rest).encode()


def int_attribute(name: str, value: int) -> Message:
    return Message([Field(1, BYTES, name.encode()), Field(3, VARINT, value), Field(20, VARINT, 2)])  # type INT


def float_attribute(name: str, value: float) -> Message:
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return Message([Field(1, BYTES, name.encode()), Field(2, FIXED32, bits), Field(20, VARINT, 1)])  # type FLOAT


def tensor_name(data: bytes) -> str:
    return Message.parse(data).string(8)


def tensor_ints(data: bytes) -> list[int] | None:
    """The values of a small int64 TensorProto stored in the graph (raw_data or int64_data); None for others."""
    t = Message.parse(data)
    if t.first(2) != 7:  # INT64
        return None
    raw = t.first(9)
    if raw is not None:
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    values = []
    for v in t.all(7):
        if isinstance(v, bytes):  # packed
            at = 0
            while at < len(v):
                x, at = read_varint(v, at)
                values.append(x - (1 << 64) if x >= 1 << 63 else x)
        else:
            values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values


def names_used_in(graph: Message) -> set[str]:
    """Every value name a graph's nodes read, its subgraphs' nodes included (a subgraph reads outer values by
    name, without listing them), and its outputs."""
    used = {Message.parse(o).string(1) for o in graph.all(12)}
    for data in graph.all(1):
        node = Node.parse(data)
        used.update(node.inputs)
        for sub in node.subgraphs():
            used |= names_used_in(sub)
    return used
