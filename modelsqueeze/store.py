"""Weights kept outside the protobuf: a logical model's big tensors are *stubs*.

A stub is an initializer marked as external data whose location names an entry of this process's
store, not a file. The entry says where the bytes are: a byte range of a file on disk (the input
model, or its external data: read when asked, never all at once) or a value held in memory (a
compressed record, decoded when asked). So a model of any size loads in the memory of its graph,
passes read one tensor at a time, and protobuf never has to hold (or serialise) the weights:
`resolved` materialises a copy for onnxruntime, `model.save_model` streams big models tensor by
tensor into an external data file.

Stubs never leave the process: every writer resolves them.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import open_input

PREFIX = "modelsqueeze-lazy:"
# Tensors of at least this many bytes of data are kept out of the protobuf.
MIN_BYTES = 1024


class Source:
    """Where a stub's bytes are: `raw()` gives them little-endian, as ONNX raw_data holds them."""

    nbytes: int

    def raw(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def file(self) -> Path | None:
        return None


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True, eq=False)
class FileRange(Source):
    """`nbytes` bytes at `offset` of the file at `path` (absolute), read on each access. The file
    must stay the one that was loaded (same device, inode, size and modification time)."""

    path: Path
    offset: int
    nbytes: int
    identity: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.identity is None:
            object.__setattr__(self, "identity", _identity(self.path))

    def raw(self) -> np.ndarray:
        changed = ModelSqueezeError(f"{self.path}: the file changed or shrank while in use (it was replaced or "
                                    f"rewritten after it was loaded); run the command again")
        try:
            with open_input(self.path, "a weights file") as handle:
                st = os.fstat(handle.fileno())
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
                    raise changed
                handle.seek(self.offset)
                data = np.fromfile(handle, dtype=np.uint8, count=self.nbytes)
        except OSError as exc:
            raise ModelSqueezeError(f"{self.path}: cannot read weights: {exc.strerror or exc}") from None
        if data.size != self.nbytes:
            raise changed
        return data

    def file(self) -> Path | None:
        return self.path


@dataclass(frozen=True, eq=False)
class Held(Source):
    """A value held in memory: `make()` builds the dense array (e.g. a record's decode)."""

    make: Callable[[], np.ndarray]
    nbytes: int

    def raw(self) -> np.ndarray:
        array = np.ascontiguousarray(self.make())
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        return array.reshape(-1).view(np.uint8)


_sources: dict[str, Source] = {}
_next_id = 0
_lock = threading.Lock()


def _register(source: Source) -> str:
    global _next_id
    with _lock:
        key = f"{PREFIX}{_next_id}"
        _next_id += 1
        _sources[key] = source
    return key


def mark() -> int:
    """The number the next source will get: `retain(..., since=mark())` leaves older ones alone."""
    return _next_id


def _number(key: str) -> int:
    return int(key[len(PREFIX):])


def _location(tensor: onnx.TensorProto) -> str | None:
    if not (tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL):
        return None
    for entry in tensor.external_data:
        if entry.key == "location" and entry.value.startswith(PREFIX):
            return entry.value
    return None


def is_stub(tensor: onnx.TensorProto) -> bool:
    return _location(tensor) is not None


def source_of(tensor: onnx.TensorProto) -> Source | None:
    key = _location(tensor)
    if key is None:
        return None
    try:
        return _sources[key]
    except KeyError:
        raise ModelSqueezeError(f"tensor {tensor.name!r}: its weights were released (internal error)") from None


def make_stub(tensor: onnx.TensorProto, source: Source) -> None:
    """Turn `tensor` (name, type and dims set; data fields empty) into a stub reading `source`."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", _register(source)


def np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")


def stub_array(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer `name` holding `array` (kept in memory, out of the protobuf when big)."""
    array = np.asarray(array)
    if array.nbytes < MIN_BYTES or array.dtype.kind not in "fiub":
        return numpy_helper.from_array(array, name)
    held = array.copy() if array.flags.writeable else array  # no caller's later edit reaches it
    held.flags.writeable = False
    return lazy_tensor(name, array.dtype, array.shape, Held(lambda: held, array.nbytes))


def lazy_tensor(name: str, dtype: np.dtype, shape: tuple[int, ...], source: Source,
                data_type: int | None = None) -> onnx.TensorProto:
    """A stub `name` of `shape` reading `source` (ONNX type: `data_type`, else that of `dtype`)."""
    if data_type is None:
        data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensor = onnx.TensorProto(name=name, dims=list(shape), data_type=data_type)
    make_stub(tensor, source)
    return tensor


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of any initializer, stub or not (stubs read their source now)."""
    source = source_of(tensor)
    if source is None:
        return numpy_helper.to_array(tensor)
    array = source.raw().view(np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def raw_bytes(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's data as raw_data would hold it (uint8), stub or not."""
    source = source_of(tensor)
    if source is not None:
        return source.raw()
    if tensor.raw_data:
        return np.frombuffer(tensor.raw_data, np.uint8)
    array = numpy_helper.to_array(tensor)
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8)


def materialize(tensor: onnx.TensorProto) -> None:
    """Replace a stub, in place, by an ordinary tensor holding its data."""
    data = source_of(tensor).raw().tobytes()
    tensor.ClearField("data_location")
    del tensor.external_data[:]
    tensor.raw_data = data


def varint_bytes(n: int) -> int:
    """Bytes of the protobuf varint of `n` (a length prefix)."""
    return max(1, (n.bit_length() + 6) // 7)


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of data a tensor holds (a stub: its source's)."""
    source = source_of(tensor)
    if source is not None:
        return source.nbytes
    return len(tensor.raw_data) + 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
        len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)
    )


def inline_size(tensor: onnx.TensorProto) -> int:
    """tensor.ByteSize() once resolved (a stub holds its data as raw_data)."""
    if not is_stub(tensor):
        return tensor.ByteSize()
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    header.ClearField("data_location")
    del header.external_data[:]
    n = source_of(tensor).nbytes
    return header.ByteSize() + 1 + varint_bytes(n) + n  # raw_data, field 9 (a 1-byte tag): set even when empty


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from iter_graphs(sub)


def stubs(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every stub of the model (they are only ever initializers), in graph order."""
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if is_stub(tensor):
                yield tensor


def non_initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model that is not an initializer: sparse initializers' parts and node
    attributes (Constant values), in all graphs."""
    for graph in iter_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                yield from attr.tensors


def has_stubs_below(graph: onnx.GraphProto) -> bool:
    """Whether a subgraph of `graph` (not `graph` itself) holds a stub."""
    return any(is_stub(t) for sub in iter_graphs(graph) if sub is not graph for t in sub.initializer)


def has_stubs(model: onnx.ModelProto) -> bool:
    return next(stubs(model), None) is not None


def resolved(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when it has no stubs, else a copy with every stub's data in place."""
    if not has_stubs(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in stubs(copy):
        materialize(tensor)
    return copy


def files(model: onnx.ModelProto) -> set[Path]:
    """The files the model's stubs read."""
    return {f for f in (source_of(t).file() for t in stubs(model)) if f is not None}


def retain(*models: onnx.ModelProto, since: int = 0) -> None:
    """Forget the in-memory sources registered from number `since` on (see `mark`) that no stub
    of `models` uses; older sources, which other models of the process may use, stay (file ranges
    are tiny and always stay)."""
    live = {_location(t) for m in models if m is not None for t in stubs(m)}
    with _lock:
        for key in [k for k, s in _sources.items()
                    if isinstance(s, Held) and k not in live and _number(k) >= since]:
            del _sources[key]


@contextmanager
def released() -> Iterator[None]:
    """In-memory sources registered inside the block are forgotten when it ends: for work whose
    models are measured and dropped inside it (e.g. one candidate of a search)."""
    since = mark()
    try:
        yield
    finally:
        retain(since=since)


def checkable(model: onnx.ModelProto, folder: str, name: str = "lazy.bin") -> onnx.ModelProto:
    """A copy of `model` whose stubs are ordinary external data in `folder`/`name`: a sparse file
    as long as the largest stub (no disk used, nothing read), so onnx.checker can check the model
    without its weights in memory (save the copy in `folder` and check that file)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    longest = 0
    for tensor in stubs(copy):
        n = source_of(tensor).nbytes
        longest = max(longest, n)
        del tensor.external_data[:]
        for key, value in (("location", name), ("offset", "0"), ("length", str(n))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    with open(os.path.join(folder, name), "wb") as handle:
        handle.truncate(longest)
    return copy


# ----------------------------------------------------------------------------------------------
# Reading a model file without its big raw_data: a protobuf wire-format walk finds each main-graph
# initializer's raw_data bytes, the graph is parsed without them, and they become file ranges.

_GRAPH, _INITIALIZER, _RAW_DATA, _DATA_LOCATION = 7, 5, 9, 14  # ModelProto.graph, GraphProto.initializer, TensorProto fields
_TYPED_DATA = {4, 5, 6, 7, 10, 11}  # TensorProto float_data, int32_data, string_data, int64_data, double_data, uint64_data


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:  # no message has a field 0: zero bytes are not protobuf (a 3 GB file of them cost minutes)
            raise _Malformed
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            yield number, wire, begin, pos, pos
            continue
        if wire == 1:
            size = 8
        elif wire == 5:
            size = 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
        else:  # groups (3, 4) are not used by ONNX
            raise _Malformed
        if pos + size > end:
            raise _Malformed
        yield number, wire, begin, pos, pos + size
        pos += size


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _strip_tensor(buf, start: int, end: int) -> tuple[bytes, int, int] | None:
    """The tensor's bytes without its raw_data, and where that raw_data lies; None to keep it whole."""
    raw = []
    for number, wire, begin, vstart, vend in _fields(buf, start, end):
        if number == _DATA_LOCATION or number in _TYPED_DATA:  # typed data too: left whole, checked as such
            return None
        if number == _RAW_DATA and wire == 2:
            raw.append((begin, vstart, vend))
    if len(raw) != 1 or raw[0][2] - raw[0][1] < MIN_BYTES:
        return None
    begin, vstart, vend = raw[0]
    return bytes(buf[start:begin]) + bytes(buf[vend:end]), vstart, vend - vstart


_MAX_TOP_FIELDS = 100_000  # a model has a few dozen (opsets, metadata); millions are a walk in Python


class NotProtobuf(ValueError):
    """The bytes are not a protobuf message at all: their top-level fields do not parse (a field
    number 0, as in a file of zero bytes; a length past the end; a group)."""


def check_head(head: bytes, size: int) -> None:
    """Raise NotProtobuf when the first bytes of a `size`-byte file already show it is not a
    protobuf message: a field number 0 (a file of zero bytes), a group, a varint too long, a
    field longer than the file. Only `head` is read, so a huge file costs what it shows."""
    pos = 0
    while pos < len(head):
        begin = pos
        try:
            key, pos = _varint(head, pos, len(head))
        except _Malformed:
            if len(head) - begin >= 10 or len(head) == size:
                raise NotProtobuf from None
            return  # the head ends inside a varint
        number, wire = key >> 3, key & 7
        if number == 0 or wire in (3, 4, 6, 7):
            raise NotProtobuf
        try:
            if wire == 0:
                _, pos = _varint(head, pos, len(head))
                continue
            length, pos = (8, pos) if wire == 1 else (4, pos) if wire == 5 else _varint(head, pos, len(head))
        except _Malformed:
            if len(head) == size:
                raise NotProtobuf from None
            return
        if pos + length > size:
            raise NotProtobuf
        pos += length


def split_model_bytes(buf) -> tuple[bytes, list[tuple[int, int, int]]] | None:
    """The serialized model without the raw_data of its main graph's big initializers, and for
    each of them (index among the initializers, offset of its data in `buf`, length). None when
    there is nothing to take out or the bytes are not what this walk expects (the caller then
    parses the whole file, which gives the proper error). Bytes whose top-level fields do not
    parse raise NotProtobuf: protobuf would refuse them too, so nothing more need be read."""
    end = len(buf)
    top = []
    try:
        for field in _fields(buf, 0, end):
            top.append(field)
            if len(top) > _MAX_TOP_FIELDS:  # not a model this walk knows: protobuf will tell
                return None
    except _Malformed:
        raise NotProtobuf from None
    try:
        graphs = [f for f in top if f[0] == _GRAPH]
        if len(graphs) != 1 or graphs[0][1] != 2:
            return None
        _, _, gbegin, gstart, gend = graphs[0]
        parts, taken, index = [], [], 0
        for number, wire, begin, vstart, vend in _fields(buf, gstart, gend):
            if number == _INITIALIZER and wire == 2:
                stripped = _strip_tensor(buf, vstart, vend)
                if stripped is not None:
                    body, offset, length = stripped
                    parts.append(_encode_varint((_INITIALIZER << 3) | 2) + _encode_varint(len(body)) + body)
                    taken.append((index, offset, length))
                    index += 1
                    continue
                index += 1
            parts.append(bytes(buf[begin:vend]))
        if not taken:
            return None
        graph = b"".join(parts)
        head = _encode_varint((_GRAPH << 3) | 2) + _encode_varint(len(graph))
        return bytes(buf[:gbegin]) + head + graph + bytes(buf[gend:end]), taken
    except _Malformed:
        return None


def _first_field_after(data: bytes, number: int) -> int:
    """Offset of the first field numbered above `number` in a deterministic serialization (its
    fields are in number order), or len(data)."""
    for field, _, begin, _, _ in _fields(data, 0, len(data)):
        if field > number:
            return begin
    return len(data)


def serialize_to(model: onnx.ModelProto, write: Callable[[bytes], object]) -> None:
    """Write exactly `resolved(model).SerializeToString(deterministic=True)` through `write`, one
    initializer at a time: a stub's data is read, written and let go before the next. (A
    deterministic serialization has its fields in number order, so the main graph's initializers,
    field 5, sit between its fields 1-4 and 6-; a tensor's raw_data, field 9, between 1-8 and 10-.)"""
    if not has_stubs(model):
        write(model.SerializeToString(deterministic=True))
        return
    if has_stubs_below(model.graph):  # rare: stubs inside subgraphs are resolved together
        write(resolved(model).SerializeToString(deterministic=True))
        return
    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.graph.ClearField("initializer")
    top = shell.SerializeToString(deterministic=True)
    _, _, gbegin, gstart, gend = next(f for f in _fields(top, 0, len(top)) if f[0] == _GRAPH)
    graph = top[gstart:gend]
    split = _first_field_after(graph, _INITIALIZER)
    sizes = [inline_size(t) for t in model.graph.initializer]
    length = len(graph) + sum(1 + varint_bytes(n) + n for n in sizes)
    write(top[:gbegin] + _encode_varint((_GRAPH << 3) | 2) + _encode_varint(length) + graph[:split])
    for tensor, size in zip(model.graph.initializer, sizes):
        write(_encode_varint((_INITIALIZER << 3) | 2) + _encode_varint(size))
        source = source_of(tensor)
        if source is None:
            write(tensor.SerializeToString(deterministic=True))
            continue
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        header.ClearField("data_location")
        del header.external_data[:]
        head = header.SerializeToString(deterministic=True)
        cut = _first_field_after(head, _RAW_DATA)
        raw = source.raw()
        write(head[:cut] + _encode_varint((_RAW_DATA << 3) | 2) + _encode_varint(raw.size))
        write(memoryview(raw))
        del raw
        write(head[cut:])
    write(graph[split:] + top[gend:])
