"""The wire API's message classes, built at import from the shipped ``megaclass.proto``.

No generated ``*_pb2.py`` is shipped: generated code pins the protobuf runtime it was generated for. Instead
this module reads ``megaclass.proto`` (the single source of truth, the same file other languages compile),
turns it into a ``FileDescriptorProto`` with a small parser for the proto3 subset the file uses (messages
with scalar, ``bytes``, message and ``repeated`` fields; one service of unary calls), and asks the installed
protobuf runtime for the message classes. A test checks the parse against ``protoc``'s.

Also here: raw little-endian array and id encoding, shared by server and client.
"""

from __future__ import annotations

import importlib.resources
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

PACKAGE = "megaclass.paramserver.v1"
SERVICE = "ParameterServer"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_SCALARS = {
    "double": 1,
    "float": 2,
    "int64": 3,
    "uint64": 4,
    "int32": 5,
    "bool": 8,
    "string": 9,
    "bytes": 12,
    "uint32": 13,
}
_TOKEN = re.compile(r"//[^\n]*|[A-Za-z_][\w.]*|\d+|[{}();=\[\]<>,]|\"[^\"]*\"")


@dataclass(frozen=True)
class Method:
    """One unary call of the service."""

    name: str
    request: str
    response: str


def proto_text() -> str:
    """The shipped ``megaclass.proto``."""
    return importlib.resources.files("megaclass.paramserver").joinpath("megaclass.proto").read_text()


def parse_proto(text: str, *, name: str = "megaclass.proto") -> tuple[Any, list[Method]]:
    """Parse the proto3 subset ``megaclass.proto`` uses into a ``FileDescriptorProto`` and its methods.

    Raises:
        ValueError: on anything outside the subset, naming the token.
    """
    from google.protobuf import descriptor_pb2

    tokens = [t for t in _TOKEN.findall(text) if not t.startswith("//")]
    file = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto3")
    methods: list[Method] = []
    i = 0

    def expect(value: str) -> None:
        nonlocal i
        if tokens[i] != value:
            raise ValueError(f"{name}: expected {value!r}, got {tokens[i]!r} (token {i})")
        i += 1

    while i < len(tokens):
        word = tokens[i]
        if word == "syntax":
            i += 4  # syntax = "proto3" ;
        elif word == "package":
            file.package = tokens[i + 1]
            i += 3
        elif word == "message":
            i = _parse_message(tokens, i, file.message_type.add(), file.package, name)
        elif word == "service":
            service = file.service.add(name=tokens[i + 1])
            i += 2
            expect("{")
            while tokens[i] == "rpc":
                method = Method(tokens[i + 1], tokens[i + 3], tokens[i + 7])
                i += 8
                expect(")")
                expect(";")
                service.method.add(
                    name=method.name,
                    input_type=f".{file.package}.{method.request}",
                    output_type=f".{file.package}.{method.response}",
                )
                methods.append(method)
            expect("}")
        else:
            raise ValueError(f"{name}: unsupported construct {word!r} (token {i})")
    return file, methods


def _parse_message(tokens: list[str], i: int, message: Any, package: str, name: str) -> int:
    """Parse ``message Name { [repeated] type field = number; ... }`` starting at token ``i``."""
    from google.protobuf import descriptor_pb2

    field_proto = descriptor_pb2.FieldDescriptorProto
    message.name = tokens[i + 1]
    if tokens[i + 2] != "{":
        raise ValueError(f"{name}: expected '{{' after message {message.name}, got {tokens[i + 2]!r}")
    i += 3
    while tokens[i] != "}":
        label = field_proto.LABEL_OPTIONAL
        if tokens[i] == "repeated":
            label = field_proto.LABEL_REPEATED
            i += 1
        type_name, field_name, equals, number, end = tokens[i : i + 5]
        if equals != "=" or end != ";" or not number.isdigit():
            raise ValueError(f"{name}: malformed field {field_name!r} in message {message.name}")
        field = message.field.add(name=field_name, number=int(number), label=label)
        field.json_name = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), field_name)
        if type_name in _SCALARS:
            field.type = _SCALARS[type_name]
        else:
            field.type = field_proto.TYPE_MESSAGE
            field.type_name = f".{package}.{type_name}"
        i += 5
    return i + 1


def _build() -> tuple[dict[str, type], list[Method]]:
    from google.protobuf import descriptor_pool

    file, methods = parse_proto(proto_text())
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())
    classes = {}
    for message in file.message_type:
        descriptor = pool.FindMessageTypeByName(f"{PACKAGE}.{message.name}")
        classes[message.name] = _message_class(descriptor)
    return classes, methods


def _message_class(descriptor: Any) -> type:
    from google.protobuf import message_factory

    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)  # older runtimes


MESSAGES, METHODS = _build()


def message(name: str, **fields: Any) -> Any:
    """A new message of type ``name`` (e.g. ``"PullRowsRequest"``)."""
    return MESSAGES[name](**fields)


def method_path(method: str) -> str:
    """The gRPC path of ``method``: ``/megaclass.paramserver.v1.ParameterServer/<method>``."""
    return f"/{PACKAGE}.{SERVICE}/{method}"


def encode_array(tensor: Tensor, dtype: str = "float32") -> Any:
    """An ``Array`` message holding ``tensor`` converted to ``dtype`` as little-endian bytes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    data = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        data = data.view(torch.int16)  # numpy has no bfloat16; the bytes are the same
    return message("Array", dtype=dtype, shape=list(tensor.shape), data=data.numpy().tobytes())


def array_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of an ``Array`` of ``dtype`` (one of :data:`DTYPES`) and ``shape``."""
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize


def decode_array(array: Any, *, what: str, ndim: int | None = None, copy: bool = True) -> Tensor:
    """The tensor an ``Array`` message holds (a private copy), in its own dtype; with ``copy=False``, where
    its bytes are writable (memory shared with a client), the tensor is a view of them.

    Raises:
        ValueError: naming ``what`` when the dtype, shape or byte count is wrong.
    """
    if array.dtype not in DTYPES:
        raise ValueError(f"{what}: dtype {array.dtype!r} is not one of {sorted(DTYPES)}")
    shape = tuple(int(s) for s in array.shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {list(shape)}")
    if any(s < 0 for s in shape):
        raise ValueError(f"{what}: negative size in shape {list(shape)}")
    expected = array_nbytes(array.dtype, shape)
    if len(array.data) != expected:
        raise ValueError(
            f"{what}: shape {list(shape)} needs {expected} bytes of {array.dtype}, got {len(array.data)}"
        )
    float32 = array.dtype == "float32"
    raw = np.frombuffer(array.data, dtype="<f4" if float32 else "<i2").reshape(shape)
    tensor = torch.from_numpy(raw if not copy and raw.flags.writeable else raw.copy())
    return tensor if float32 else tensor.view(torch.bfloat16)


def encode_ids(ids: np.ndarray | Tensor) -> bytes:
    """Row ids as little-endian int64 bytes."""
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def decode_ids(data: bytes, *, what: str) -> np.ndarray:
    """Row ids from little-endian int64 bytes (a read-only view).

    Raises:
        ValueError: naming ``what`` when the byte count is not a multiple of 8.
    """
    if len(data) % 8:
        raise ValueError(f"{what}: {len(data)} bytes is not a whole number of int64 ids")
    return np.frombuffer(data, dtype="<i8")


# -- zero-copy paths for the row blocks -------------------------------------------------------------------
# Row blocks are most of the bytes on the wire. The generic protobuf path copies each one several times
# (tobytes, message construction, serialization; parse, field access, decode). The helpers below produce and
# read the very same protobuf encoding with one copy each way: a message is serialized without its array,
# then the array field is appended (protobuf merges a repeated occurrence of an embedded message and keeps
# the last occurrence of a scalar, so the bytes parse as the full message in any implementation).


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def array_buffer(tensor: Tensor, dtype: str) -> memoryview:
    """The little-endian bytes of ``tensor`` converted to ``dtype``, without a copy when it already is."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    data = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        data = data.view(torch.int16)
    return memoryview(data.numpy()).cast("B") if data.numel() else memoryview(b"")


def serialize_with_array(message: Any, number: int, tensor: Tensor, dtype: str) -> bytes:
    """``message`` serialized with its ``Array`` field ``number`` holding ``tensor`` (one data copy)."""
    payload = array_buffer(tensor, dtype)
    header = MESSAGES["Array"](dtype=dtype, shape=list(tensor.shape)).SerializeToString()
    data_key = _key(3, 2) + _varint(len(payload))
    field_key = _key(number, 2) + _varint(len(header) + len(data_key) + len(payload))
    return b"".join([message.SerializeToString(), field_key, header, data_key, payload])


class Prepared:
    """A message plus one ``Array`` field to append at serialization (see :func:`serialize_with_array`)."""

    def __init__(self, message: Any, number: int, tensor: Tensor, dtype: str) -> None:
        self.message, self.number, self.tensor, self.dtype = message, number, tensor, dtype

    def serialize(self) -> bytes:
        return serialize_with_array(self.message, self.number, self.tensor, self.dtype)


class Encoded:
    """Serialized request bytes, already holding ``incarnation`` (field number ``field``), which a retry may
    override: sent as they are (no copy of a large message) until :attr:`incarnation` changes."""

    def __init__(self, data: bytes, field: int, incarnation: int) -> None:
        self.data, self.field, self.incarnation = data, field, incarnation
        self._encoded = incarnation  # the incarnation ``data`` holds

    def serialize(self) -> bytes:
        if self.incarnation == self._encoded:
            return self.data
        return self.data + _key(self.field, 0) + _varint(self.incarnation)  # the last occurrence wins


def serialize(message: Any) -> bytes:
    """Bytes of a protobuf message, a :class:`Prepared` or an :class:`Encoded` (gRPC serializer)."""
    if isinstance(message, (Prepared, Encoded)):
        return message.serialize()
    return message.SerializeToString()


@dataclass
class ArrayView:
    """An ``Array`` whose ``data`` is a view into the received bytes."""

    dtype: str = ""
    shape: tuple[int, ...] = ()
    data: memoryview = memoryview(b"")

    def numpy(self, *, what: str) -> np.ndarray:
        """The array as a read-only numpy view (``bfloat16`` as its ``int16`` bit pattern)."""
        if self.dtype not in DTYPES:
            raise ValueError(f"{what}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if any(s < 0 for s in self.shape) or array_nbytes(self.dtype, self.shape) != len(self.data):
            raise ValueError(
                f"{what}: shape {list(self.shape)} does not match {len(self.data)} bytes of {self.dtype}"
            )
        return np.frombuffer(self.data, dtype="<f4" if self.dtype == "float32" else "<i2").reshape(self.shape)


@dataclass
class PullView:
    """A ``PullRowsResponse`` read without copying its rows (:func:`parse_pull_response`)."""

    rows: ArrayView
    ids: memoryview
    version: int = 0
    incarnation: int = 0


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    """The varint at ``view[i:]`` and the index after it."""
    value = shift = 0
    while True:
        if i >= len(view) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(view: memoryview) -> list[tuple[int, int, Any]]:
    """``(number, wire type, value)`` of every field of a serialized message (varints as ints, the rest as
    memoryviews into ``view``)."""
    fields, i, end = [], 0, len(view)
    while i < end:
        key, i = _read_varint(view, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(view, i)
            fields.append((number, 0, value))
        elif wire_type == 2:
            length, i = _read_varint(view, i)
            if i + length > end:
                raise ValueError("truncated length-delimited field")
            fields.append((number, 2, view[i : i + length]))
            i += length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            fields.append((number, wire_type, view[i : i + width]))
            i += width
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if i != end:
        raise ValueError("truncated fixed-width field")
    return fields


def _parse_array(chunks: list[memoryview]) -> ArrayView:
    view = chunks[0] if len(chunks) == 1 else memoryview(b"".join(chunks))  # repeated occurrences merge
    array = ArrayView()
    shape: list[int] = []
    for number, wire_type, value in _fields(view):
        if number == 1 and wire_type == 2:
            array.dtype = bytes(value).decode(errors="replace")
        elif number == 2 and wire_type == 0:
            shape.append(value)
        elif number == 2 and wire_type == 2:  # packed (the proto3 default)
            i = 0
            while i < len(value):
                item, i = _read_varint(value, i)
                shape.append(item)
        elif number == 3 and wire_type == 2:
            array.data = value
    array.shape = tuple(s - (1 << 64) if s >= 1 << 63 else s for s in shape)  # int64 two's complement
    return array


def parse_pull_response(data: bytes) -> PullView:
    """Read a serialized ``PullRowsResponse`` with its rows as a view into ``data`` (gRPC deserializer)."""
    rows: list[memoryview] = []
    response = PullView(ArrayView(), memoryview(b""))
    for number, wire_type, value in _fields(memoryview(data)):
        if number == 1 and wire_type == 2:
            rows.append(value)
        elif number == 2 and wire_type == 2:
            response.ids = value
        elif number == 3 and wire_type == 0:
            response.version = value
        elif number == 4 and wire_type == 0:
            response.incarnation = value
    if rows:
        response.rows = _parse_array(rows)
    return response


@dataclass
class PushView:
    """A ``PushGradientsRequest`` read without copying its gradients (:func:`parse_push_request`)."""

    ids: memoryview
    grads: ArrayView
    step: int = 0
    trainer: int = 0
    lr: float | None = None  # None: the field is absent
    incarnation: int = 0
    buffer: int = 0
    buffer_offset: int = 0


def _signed(value: int, bits: int) -> int:
    """A varint read as a two's complement ``bits``-bit integer (protobuf's int32/int64)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def parse_push_request(data: bytes) -> PushView:
    """Read a serialized ``PushGradientsRequest`` with its gradients as a view into ``data`` (server side)."""
    grads: list[memoryview] = []
    request = PushView(memoryview(b""), ArrayView())
    for number, wire_type, value in _fields(memoryview(data)):
        if number == 1 and wire_type == 2:
            request.ids = value
        elif number == 2 and wire_type == 2:
            grads.append(value)
        elif number == 3 and wire_type == 0:
            request.step = _signed(value, 64)
        elif number == 4 and wire_type == 0:
            request.trainer = _signed(value, 32)
        elif number == 5 and wire_type == 2:
            request.lr = request.lr or 0.0  # present; a Scalar's value is its last double
            for inner, inner_type, scalar in _fields(value):
                if inner == 1 and inner_type == 1:
                    request.lr = struct.unpack("<d", scalar)[0]
        elif number == 6 and wire_type == 0:
            request.incarnation = value
        elif number == 7 and wire_type == 0:
            request.buffer = value
        elif number == 8 and wire_type == 0:
            request.buffer_offset = _signed(value, 64)
    if grads:
        request.grads = _parse_array(grads)
    return request
