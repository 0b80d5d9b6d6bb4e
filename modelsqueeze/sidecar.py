"""The sidecar container `OUT.msq`: CompressedTensor records to bytes and back (spec: docs/FORMAT.md).

The reader checks every length, offset and checksum before it allocates, and names the bad record.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np

from modelsqueeze.codecs import get_codec, int_param
from modelsqueeze.codecs.sparse import smaller_form
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import open_input
from modelsqueeze.kernels.quant import Layout, qrange
from modelsqueeze.tensor import FLOAT_DTYPES, CompressedTensor

MAGIC = b"\x89MSQ\r\n\x1a\n"  # PNG-style: catches 7-bit transfers, CRLF/LF conversion and `type` on DOS
VERSION = 1
GRAPH_HASH_BYTES = 32
ALIGN_BYTES = 8
MAX_META_BYTES = 1 << 20
# Anything larger than this many elements cannot be a real tensor and would overflow int64 arithmetic.
MAX_ELEMENTS = 1 << 62

_HEADER = struct.Struct("<8sIIQ32sII")  # magic, version, record_count, file_size, graph_hash, reserved, crc
_RECORD = struct.Struct("<4sIQII")  # magic, meta_len, payload_len, crc, reserved
RECORD_MAGIC = b"MSQR"
HEADER_BYTES = _HEADER.size
RECORD_HEADER_BYTES = _RECORD.size
_MIN_RECORD_BYTES = RECORD_HEADER_BYTES + ALIGN_BYTES  # a record's meta is at least `{}`

DEFAULT_CODECS = {"values": "raw", "codebook": "raw", "indices": "bitpack", "scale": "raw", "zero_point": "bitpack"}
# positions: the smaller form
_POSITION_FORMS = ("bitmap", "gaps")
_KIND_ROLES = {
    "raw": ("values",),
    "codebook": ("codebook", "indices"),
    "sparse+raw": ("positions", "values"),
    "sparse+codebook": ("positions", "codebook", "indices"),
    "quant": ("scale", "zero_point", "indices"),
    "sparse+quant": ("positions", "scale", "zero_point", "indices"),
}
_QUANT_KEYS = {"signed", "axis", "block_size"}
_META_KEYS = {"name", "dtype", "shape", "kind", "streams"}
_STREAM_KEYS = {"role", "codec", "count", "offset", "length"}


class SidecarError(ModelSqueezeError):
    """A sidecar that cannot be written or read; the message names the file and the record."""


@dataclass(frozen=True, eq=False)
class Sidecar:
    """A decoded sidecar. Arrays are read-only views of the bytes it was decoded from (no copies)."""

    version: int
    graph_hash: bytes
    records: dict[str, CompressedTensor]
    record_bytes: dict[str, int]  # per tensor: bytes on disk, record header and padding included
    stream_bytes: dict[str, dict[str, int]]  # per tensor, per role: the stream's bytes, padding excluded


def _pad(n_bytes: int) -> int:
    return -n_bytes % ALIGN_BYTES


def _aligned(n_bytes: int) -> int:
    return n_bytes + _pad(n_bytes)


# ---------------------------------------------------------------- writing


def _streams_of(record: CompressedTensor) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """(role, array, encoder hints) for each part the record has, in the order of _KIND_ROLES."""
    streams = []
    if record.positions is not None:
        streams.append(("positions", record.positions, {"size": record.n_params}))
    if record.values is not None:
        streams.append(("values", record.values, {"dtype": record.dtype}))
    if record.codebook is not None:
        if record.codebook.ndim != 1:
            raise SidecarError(f"tensor {record.name!r}: the codebook must be 1-D, got shape {record.codebook.shape}")
        streams.append(("codebook", record.codebook, {"dtype": record.codebook.dtype.name}))
        streams.append(("indices", record.indices, {"bits": record.index_bits}))
    if record.scale is not None:
        # Zero points lie on the code grid: stored like the codes, as offsets from qmin at index_bits.
        offsets = record.zero_point.reshape(-1).astype(np.int64) - qrange(record.index_bits, record.signed)[0]
        streams.append(("scale", record.scale.reshape(-1), {"dtype": "float32"}))
        streams.append(("zero_point", offsets, {"bits": record.index_bits}))
        streams.append(("indices", record.indices, {"bits": record.index_bits}))
    return streams


def _codec_key(record: CompressedTensor, role: str, array: np.ndarray) -> str:
    if role in record.stream_codecs:
        return record.stream_codecs[role]
    if role == "positions":
        return smaller_form(array, record.n_params)
    return DEFAULT_CODECS[role]


def _encode_record(record: CompressedTensor) -> list[bytes]:
    """The record's bytes as a list of chunks: header, meta, padding, streams with their padding."""
    streams = _streams_of(record)
    unknown_roles = set(record.stream_codecs) - {role for role, _, _ in streams}
    if unknown_roles:
        raise SidecarError(
            f"tensor {record.name!r}: stream_codecs names roles it does not have: {sorted(unknown_roles)}"
        )
    descriptors, payload = [], []
    payload_len = 0
    for role, array, hints in streams:
        key = _codec_key(record, role, array)
        try:
            data, params = get_codec(key).encode(array, **hints)
        except ModelSqueezeError as exc:
            raise SidecarError(f"tensor {record.name!r}: stream {role!r} ({key}): {exc}") from None
        descriptors.append(
            {"role": role, "codec": key, "count": int(array.size), "offset": payload_len, "length": len(data), **params}
        )
        payload += [data, bytes(_pad(len(data)))]
        payload_len += _aligned(len(data))
    meta = {"name": record.name, "dtype": record.dtype, "shape": list(record.shape), "kind": record.kind}
    if record.codebook is not None or record.scale is not None:
        meta["index_bits"] = record.index_bits
    if record.scale is not None:
        meta["quant"] = {"signed": record.signed, "axis": record.quant_axis, "block_size": record.block_size}
    meta["streams"] = descriptors
    try:
        meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SidecarError(f"tensor {record.name!r}: the name is not valid Unicode text ({exc.reason})") from None
    if len(meta_bytes) > MAX_META_BYTES:
        raise SidecarError(f"tensor {record.name!r}: its metadata takes {len(meta_bytes)} bytes, over the 1 MiB limit")
    body = [meta_bytes, bytes(_pad(len(meta_bytes))), *payload]
    crc = 0
    for chunk in body:
        crc = zlib.crc32(chunk, crc)
    return [_RECORD.pack(RECORD_MAGIC, len(meta_bytes), payload_len, crc, 0), *body]


def record_size_bound(record: CompressedTensor) -> int:
    """An upper bound of `record_size(record)` from the record's counts alone (nothing encoded):
    raw streams at their width, codes bit-packed (plus a whole Huffman table where a stream is
    Huffman coded: the huffman step keeps a coding only when it is smaller), positions as a
    bitmap (the stored form is the smaller of bitmap and gaps), and generous metadata."""
    slack = 12 + 2 * (1 << 16)  # a Huffman stream's header and code-length table, at most
    total = RECORD_HEADER_BYTES + 2048 + 6 * len(record.name) + 64 * len(record.stream_codecs)
    for role, array, hints in _streams_of(record):
        if role == "positions":
            n_bytes = (record.n_params + 7) // 8
        elif "bits" in hints:
            n_bytes = (int(array.size) * int(hints["bits"]) + 7) // 8
        else:
            n_bytes = int(array.size) * np.dtype(hints["dtype"]).itemsize
        total += n_bytes + ALIGN_BYTES + (slack if role in record.stream_codecs else 0)
    return total


def record_size(record: CompressedTensor) -> int:
    """Bytes `record` takes in a sidecar, record header and padding included."""
    return sum(len(chunk) for chunk in _encode_record(record))


def round_trip_record(record: CompressedTensor) -> tuple[CompressedTensor, int]:
    """What writing `record` into a sidecar and reading it back gives (one record's bytes at a
    time), and the record's bytes in the sidecar."""
    chunks = _encode_record(record)
    decoded, _ = _decode_record(memoryview(chunks[1]), memoryview(b"".join(chunks[3:])))
    return decoded, sum(len(chunk) for chunk in chunks)


def write_sidecar(handle: BinaryIO, records: Sequence[CompressedTensor], graph_hash: bytes) -> dict[str, int]:
    """Write exactly `encode_sidecar(records, graph_hash)` to the seekable binary file `handle`
    (at its start), one record at a time: the header, which holds the file's size, goes last.
    Returns each record's bytes."""
    if not isinstance(graph_hash, (bytes, bytearray)) or len(graph_hash) != GRAPH_HASH_BYTES:
        raise SidecarError(f"the graph hash must be {GRAPH_HASH_BYTES} bytes (a SHA-256 digest)")
    seen: set[str] = set()
    sizes: dict[str, int] = {}
    handle.write(bytes(HEADER_BYTES))
    file_size = HEADER_BYTES
    for record in records:
        if record.name in seen:
            raise SidecarError(f"tensor {record.name!r} appears twice in one sidecar")
        seen.add(record.name)
        sizes[record.name] = 0
        for chunk in _encode_record(record):
            handle.write(chunk)
            sizes[record.name] += len(chunk)
        file_size += sizes[record.name]
    handle.seek(0)
    handle.write(_header(len(seen), file_size, graph_hash))
    return sizes


def _header(record_count: int, file_size: int, graph_hash: bytes) -> bytes:
    """The 64-byte header, its CRC-32 last."""
    header = _HEADER.pack(MAGIC, VERSION, record_count, file_size, bytes(graph_hash), 0, 0)[:-4]
    return header + struct.pack("<I", zlib.crc32(header))


def rebound(header: bytes | memoryview, graph_hash: bytes, source: str = "<sidecar>") -> bytes:
    """The 64-byte sidecar `header` bound to another graph: its hash and checksum replaced."""
    _, _, record_count, file_size, _, reserved, crc = _HEADER.unpack(bytes(header[:HEADER_BYTES]))
    if zlib.crc32(bytes(header[: HEADER_BYTES - 4])) != crc or reserved:
        raise SidecarError(f"{source}: header checksum mismatch (file is corrupt)")
    return _header(record_count, file_size, graph_hash)


def rebind_sidecar(path: str | Path, handle: BinaryIO, graph_hash: bytes) -> int:
    """Copy the sidecar at `path` to `handle` bound to another graph (`graph_hash`): the header's
    hash and checksum change, every record is copied byte for byte. Returns the bytes written
    (the source's size: a rebound sidecar is exactly as big)."""
    if not isinstance(graph_hash, (bytes, bytearray)) or len(graph_hash) != GRAPH_HASH_BYTES:
        raise SidecarError(f"the graph hash must be {GRAPH_HASH_BYTES} bytes (a SHA-256 digest)")
    with open_input(path, "a sidecar file") as source:
        data = _FileBytes(source)
        _, file_size, _ = _check_header(data, str(path))
        handle.write(rebound(data[:HEADER_BYTES], graph_hash, str(path)))
        for start in range(HEADER_BYTES, file_size, _CRC_CHUNK_BYTES):
            handle.write(data[start : min(start + _CRC_CHUNK_BYTES, file_size)])
    return file_size


def sidecar_size(records: Sequence[CompressedTensor], record_bytes: Mapping[str, int] | None = None) -> int:
    """len(encode_sidecar(records, ...)), without building it (`record_bytes`: each record's
    bytes where already known, e.g. from `round_trip_record`)."""
    known = record_bytes or {}
    return HEADER_BYTES + sum(known[r.name] if r.name in known else record_size(r) for r in records)


def encode_sidecar(records: Sequence[CompressedTensor], graph_hash: bytes) -> bytes:
    """The sidecar holding `records` in order, bound to the graph whose SHA-256 is `graph_hash`.

    Deterministic: the same records and hash always give the same bytes.
    """
    buffer = io.BytesIO()
    write_sidecar(buffer, records, graph_hash)
    return buffer.getvalue()


# ---------------------------------------------------------------- reading


def _where(source: str, index: int, name: str | None) -> str:
    return f"{source}: record {index}" + (f" ({name!r})" if name is not None else "")


def _peek_name(meta_bytes: bytes | memoryview) -> str | None:
    """The tensor name in possibly corrupt meta, for error messages only."""
    try:
        meta = json.loads(bytes(meta_bytes).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


class _FileBytes:
    """A regular file's bytes as `decode_sidecar` reads them: its length, and slices read from
    disk only when asked, so a hostile header or record costs what it is checked with, not the
    file's size."""

    def __init__(self, handle: BinaryIO) -> None:
        self.fd = handle.fileno()
        self.size = os.fstat(self.fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> memoryview:
        start, stop, _ = part.indices(self.size)
        buffer = bytearray(max(stop - start, 0))
        done = 0
        while done < len(buffer):
            got = os.preadv(self.fd, [memoryview(buffer)[done:]], start + done)
            if got == 0:
                raise SidecarError("the sidecar file shrank while it was read")
            done += got
        return memoryview(buffer).toreadonly()


_CRC_CHUNK_BYTES = 16 << 20


def _crc32(data: "memoryview | _FileBytes", start: int, end: int) -> int:
    if not isinstance(data, _FileBytes):
        return zlib.crc32(data[start:end])
    crc = 0
    for lo in range(start, end, _CRC_CHUNK_BYTES):
        crc = zlib.crc32(data[lo : min(lo + _CRC_CHUNK_BYTES, end)], crc)
    return crc


def _locate_cut(data: "memoryview | _FileBytes") -> tuple[int, str | None]:
    """In a truncated file, the first record that does not fit (index, name if its meta survived)."""
    index, offset = 0, HEADER_BYTES
    while offset + RECORD_HEADER_BYTES <= len(data):
        magic, meta_len, payload_len, _, _ = _RECORD.unpack(data[offset : offset + RECORD_HEADER_BYTES])
        if magic != RECORD_MAGIC:  # not a record: the cut cannot be told apart from corruption
            return index, None
        meta_start = offset + RECORD_HEADER_BYTES
        end = meta_start + _aligned(meta_len) + _aligned(payload_len)
        if end > len(data):
            fits = meta_len <= MAX_META_BYTES and meta_start + meta_len <= len(data)
            return index, _peek_name(data[meta_start : meta_start + meta_len]) if fits else None
        index, offset = index + 1, end
    return index, None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key in {keys}")
    return dict(pairs)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _is_dim(value: Any) -> bool:
    # Each dimension is bounded on its own too, so the product is cheap and fits int64 even with a 0 beside it.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ELEMENTS


def _parse_meta(meta_bytes: memoryview) -> dict[str, Any]:
    """The record's JSON meta, checked for the top-level shape; raises ModelSqueezeError."""
    try:
        meta = json.loads(
            bytes(meta_bytes).decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise ModelSqueezeError(f"metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelSqueezeError("metadata is not a JSON object")
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in _KIND_ROLES:
        raise ModelSqueezeError(f"unknown record kind {kind!r}; expected one of {', '.join(_KIND_ROLES)}")
    roles = _KIND_ROLES[kind]
    expected_keys = _META_KEYS | ({"index_bits"} if "indices" in roles else set()) | (
        {"quant"} if "scale" in roles else set())
    if set(meta) != expected_keys:
        raise ModelSqueezeError(f"a {kind} record's metadata keys are {sorted(meta)}, expected {sorted(expected_keys)}")
    if not isinstance(meta["name"], str) or not isinstance(meta["dtype"], str):
        raise ModelSqueezeError("metadata 'name' and 'dtype' must be strings")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
        raise ModelSqueezeError(f"shape {shape!r} is not a list of non-negative integers")
    if math.prod(shape) >= MAX_ELEMENTS:
        raise ModelSqueezeError(f"shape {shape} has too many elements")
    if not isinstance(meta["streams"], list) or not all(isinstance(s, dict) for s in meta["streams"]):
        raise ModelSqueezeError("metadata 'streams' must be a list of objects")
    if "index_bits" in meta:
        int_param(meta, "index_bits", 1, 16)
    if "quant" in meta:
        quant = meta["quant"]
        if not isinstance(quant, dict) or set(quant) != _QUANT_KEYS:
            raise ModelSqueezeError(f"'quant' must be an object with keys {sorted(_QUANT_KEYS)}")
        if not isinstance(quant["signed"], bool):
            raise ModelSqueezeError("'quant.signed' must be true or false")
        if quant["axis"] is not None and not (_is_dim(quant["axis"]) and quant["axis"] < len(shape)):
            raise ModelSqueezeError(f"'quant.axis' {quant['axis']!r} is not an axis of shape {shape}")
        int_param(quant, "block_size", 0)
    return meta


def _check_layout(meta: dict[str, Any], payload: memoryview) -> None:
    """Streams are the kind's roles in order, back to back at 8-byte alignment, padding zero, nothing else."""
    roles = tuple(stream.get("role") for stream in meta["streams"])
    expected_roles = _KIND_ROLES[meta["kind"]]
    if roles != expected_roles:
        raise ModelSqueezeError(f"a {meta['kind']} record has streams {list(expected_roles)}, found {list(roles)}")
    offset = 0
    for stream in meta["streams"]:
        role = stream["role"]
        try:
            codec = get_codec(stream.get("codec"))
        except ModelSqueezeError as exc:
            raise ModelSqueezeError(f"stream {role!r}: {exc}") from None
        if set(stream) != _STREAM_KEYS | set(codec.param_names):
            raise ModelSqueezeError(
                f"stream {role!r}: keys {sorted(stream)}, expected {sorted(_STREAM_KEYS | set(codec.param_names))}"
            )
        try:
            int_param(stream, "count", 0)
            start = int_param(stream, "offset", 0)
            length = int_param(stream, "length", 0)
        except ModelSqueezeError as exc:
            raise ModelSqueezeError(f"stream {role!r}: {exc}") from None
        if start != offset or start + length > len(payload):
            raise ModelSqueezeError(
                f"stream {role!r}: bytes {start}..{start + length} are not where the layout puts them "
                f"(offset {offset}) or outside the {len(payload)}-byte payload"
            )
        if any(payload[start + length : start + _aligned(length)]):
            raise ModelSqueezeError(f"stream {role!r}: non-zero padding")
        offset = start + _aligned(length)
    if offset != len(payload):
        raise ModelSqueezeError(f"the streams cover {offset} bytes of a {len(payload)}-byte payload")


def _check_counts(meta: dict[str, Any]) -> None:
    """Each stream's declared count must be what the record's shape and kind need, before any
    stream is decoded: a decoder allocates in proportion to its count (a constant Huffman stream
    of a few bytes can claim any number of symbols), so the shape bounds every allocation."""
    n = math.prod(meta["shape"])
    counts = {stream["role"]: stream["count"] for stream in meta["streams"]}
    stored = counts.get("positions", n)
    if stored > n:
        raise ModelSqueezeError(f"stream 'positions': {stored} stored entries in a tensor of {n} elements")
    for role in ("values", "indices"):
        if role in counts and counts[role] != stored:
            raise ModelSqueezeError(f"stream {role!r}: {counts[role]} values, the tensor stores {stored} entries")
    if "codebook" in counts and not min(stored, 1) <= counts["codebook"] <= 1 << meta["index_bits"]:
        raise ModelSqueezeError(f"stream 'codebook': {counts['codebook']} centroids do not fit in {meta['index_bits']}-bit indices")
    if "scale" in counts:
        quant = meta["quant"]
        if quant["block_size"] and quant["axis"] is None:
            raise ModelSqueezeError("a block size needs a quantization axis")
        groups = math.prod(Layout(tuple(meta["shape"]), quant["axis"], quant["block_size"]).param_shape)
        for role in ("scale", "zero_point"):
            if counts[role] != groups:
                raise ModelSqueezeError(f"stream {role!r}: {counts[role]} values, the quantization layout has {groups} groups")
    for stream in meta["streams"]:
        if "size" in stream and stream["size"] != n:
            raise ModelSqueezeError(f"stream {stream['role']!r}: size {stream['size']!r} differs from the tensor's {n} elements")


def _decode_streams(meta: dict[str, Any], payload: memoryview) -> dict[str, np.ndarray]:
    arrays = {}
    for stream in meta["streams"]:
        role, count, start = stream["role"], stream["count"], stream["offset"]
        params = {key: value for key, value in stream.items() if key not in _STREAM_KEYS}
        try:
            array = get_codec(stream["codec"]).decode(payload[start : start + stream["length"]], count, params)
        except ModelSqueezeError as exc:
            raise ModelSqueezeError(f"stream {role!r} ({stream['codec']}): {exc}") from None
        if array.ndim != 1 or array.size != count:
            raise ModelSqueezeError(f"stream {role!r}: decoded {array.shape}, the descriptor says {count} values")
        if role in ("positions", "indices") and not np.issubdtype(array.dtype, np.integer):
            raise ModelSqueezeError(f"stream {role!r}: decoded {array.dtype}, expected integers")
        if role == "positions":
            # Signed, so the record's sortedness check cannot be fooled by unsigned wrap-around.
            array = array.astype(np.int64, copy=False)
        arrays[role] = array
    return arrays


# What a reader expects of a record before it is decoded: called with (name, shape, dtype), it
# raises ModelSqueezeError for a record its graph cannot take (load_pair checks the graph's shapes).
Expect = Callable[[str, tuple[int, ...], str], None]


def _check_finite(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """A codebook or a quantization scale holding a NaN or an infinity, or a codebook entry its
    tensor's dtype cannot hold, is corrupt or hostile: no command makes one (tensors holding such
    values are left alone). Raw `values` keep every bit pattern of the tensor they copy."""
    if meta["dtype"] not in FLOAT_DTYPES:
        return  # refused by the graph check with its own message
    limit = float(np.finfo(meta["dtype"]).max)
    for role in ("codebook", "scale"):
        array = arrays.get(role)
        if array is None or not array.size or not np.issubdtype(array.dtype, np.floating):
            continue
        low, high = float(array.min()), float(array.max())  # a NaN anywhere makes both NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            raise SidecarError(f"its {role} holds NaN or infinite values (file is corrupt)")
        if role != "scale" and max(-low, high) > limit:
            raise SidecarError(f"its {role} holds values beyond the range of {meta['dtype']} (file is corrupt)")


def _decode_record(meta_bytes: memoryview, payload: memoryview,
                   expect: Expect | None = None) -> tuple[CompressedTensor, dict[str, int]]:
    meta = _parse_meta(meta_bytes)
    _check_layout(meta, payload)
    _check_counts(meta)
    if expect is not None:
        expect(meta["name"], tuple(meta["shape"]), meta["dtype"])
    arrays = _decode_streams(meta, payload)
    _check_finite(meta, arrays)
    non_default = {
        stream["role"]: stream["codec"]
        for stream in meta["streams"]
        if stream["codec"] != DEFAULT_CODECS.get(stream["role"]) and stream["codec"] not in _POSITION_FORMS
    }
    quant = meta.get("quant") or {}
    scale, zero_point = arrays.get("scale"), arrays.get("zero_point")
    if quant:  # the stream counts were checked against the layout (_check_counts)
        want = Layout(tuple(meta["shape"]), quant["axis"], quant["block_size"]).param_shape
        qmin = qrange(meta["index_bits"], quant["signed"])[0]
        scale, zero_point = scale.reshape(want), zero_point.reshape(want).astype(np.int64) + qmin
    record = CompressedTensor(
        name=meta["name"],
        shape=tuple(meta["shape"]),
        dtype=meta["dtype"],
        values=arrays.get("values"),
        codebook=arrays.get("codebook"),
        indices=arrays.get("indices"),
        index_bits=meta.get("index_bits", 0),
        positions=arrays.get("positions"),
        stream_codecs=non_default,
        scale=scale,
        zero_point=zero_point,
        quant_axis=quant.get("axis"),
        block_size=quant.get("block_size", 0),
        signed=quant.get("signed", True),
    )
    return record, {stream["role"]: stream["length"] for stream in meta["streams"]}


def _check_header(data: "memoryview | _FileBytes", source: str) -> tuple[int, int, bytes]:
    """(record_count, file_size, graph_hash) from a header that passed every check."""
    if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data[: len(data)])):
        raise SidecarError(f"{source}: file is truncated ({len(data)} bytes; the header alone is {HEADER_BYTES})")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise SidecarError(f"{source}: not a modelsqueeze sidecar (bad magic {bytes(data[:8])!r})")
    if len(data) >= 12:
        (version,) = struct.unpack("<I", data[8:12])
        if version != VERSION:
            raise SidecarError(
                f"sidecar {source} is format version {version}; this modelsqueeze reads version {VERSION}"
            )
    if len(data) < HEADER_BYTES:
        raise SidecarError(f"{source}: file is truncated ({len(data)} bytes; the header alone is {HEADER_BYTES})")
    _, _, record_count, file_size, graph_hash, reserved, crc = _HEADER.unpack(data[:HEADER_BYTES])
    if zlib.crc32(data[: HEADER_BYTES - 4]) != crc:
        raise SidecarError(f"{source}: header checksum mismatch (file is corrupt)")
    if reserved != 0:
        raise SidecarError(f"{source}: reserved header field is {reserved}, expected 0 (file is corrupt)")
    if len(data) < file_size:
        index, name = _locate_cut(data)
        raise SidecarError(
            f"{_where(source, index, name)}: file is truncated ({len(data)} of {file_size} bytes; "
            f"this record and any after it are incomplete)"
        )
    if len(data) > file_size:
        raise SidecarError(f"{source}: {len(data) - file_size} unexpected bytes after the last record")
    if HEADER_BYTES + record_count * _MIN_RECORD_BYTES > file_size:
        raise SidecarError(f"{source}: header claims {record_count} records, too many for {file_size} bytes")
    return record_count, file_size, graph_hash


def decode_sidecar(data: bytes | memoryview, source: str = "<sidecar>", expect: Expect | None = None) -> Sidecar:
    """The records in sidecar `data`; every inconsistency is a SidecarError naming `source` and the
    record. `expect(name, shape, dtype)` vets each record before any of its streams is decoded."""
    return _decode(memoryview(data).cast("B"), source, expect)


def _decode(data: "memoryview | _FileBytes", source: str, expect: Expect | None) -> Sidecar:
    record_count, file_size, graph_hash = _check_header(data, source)
    records: dict[str, CompressedTensor] = {}
    record_bytes: dict[str, int] = {}
    stream_bytes: dict[str, dict[str, int]] = {}
    offset = HEADER_BYTES
    for index in range(record_count):
        where = _where(source, index, None)
        if offset + RECORD_HEADER_BYTES > file_size:
            raise SidecarError(f"{where}: starts at byte {offset}, past the end of the file (file is corrupt)")
        magic, meta_len, payload_len, crc, reserved = _RECORD.unpack(data[offset : offset + RECORD_HEADER_BYTES])
        if magic != RECORD_MAGIC or reserved != 0:
            raise SidecarError(f"{where}: bad record header at byte {offset} (file is corrupt)")
        if meta_len > MAX_META_BYTES:
            raise SidecarError(f"{where}: metadata length {meta_len} is over the 1 MiB limit (file is corrupt)")
        meta_start = offset + RECORD_HEADER_BYTES
        payload_start = meta_start + _aligned(meta_len)
        end = payload_start + payload_len
        if payload_len % ALIGN_BYTES or end > file_size:
            raise SidecarError(f"{where}: payload of {payload_len} bytes does not fit the file (file is corrupt)")
        meta_bytes = data[meta_start : meta_start + meta_len]
        name = _peek_name(meta_bytes)
        where = _where(source, index, name)
        if _crc32(data, meta_start, end) != crc:  # before the payload is read (a file: in chunks)
            raise SidecarError(f"{where}: checksum mismatch (file is corrupt)")
        if any(data[meta_start + meta_len : payload_start]):
            raise SidecarError(f"{where}: non-zero padding after the metadata (file is corrupt)")
        try:
            record, lengths = _decode_record(meta_bytes, data[payload_start:end], expect)
        except ModelSqueezeError as exc:
            detail = str(exc).removeprefix(f"tensor {name!r}: ")
            raise SidecarError(f"{where}: {detail}") from None
        if record.name in records:
            raise SidecarError(f"{where}: a second record for the same tensor")
        records[record.name] = record
        record_bytes[record.name] = end - offset
        stream_bytes[record.name] = lengths
        offset = end
    if offset != file_size:
        raise SidecarError(f"{source}: {file_size - offset} bytes after the last record belong to no record")
    return Sidecar(VERSION, bytes(graph_hash), records, record_bytes, stream_bytes)


def read_sidecar(path: str | Path, expect: Expect | None = None) -> Sidecar:
    """Read and decode the sidecar file at `path` (`expect`: see decode_sidecar). Only a regular
    file is opened, and it is read a part at a time as each part is checked: a bad header in a
    3 GB file costs its 64 bytes, a bad record the bytes up to it (checksums are computed in
    chunks before a payload is held)."""
    path = Path(path)
    try:
        handle = open_input(path, "a sidecar file")
    except ModelSqueezeError as exc:
        if not path.exists() and not path.is_symlink():
            raise SidecarError(f"sidecar {path} not found") from None
        raise SidecarError(str(exc)) from None
    with handle:
        try:
            return _decode(_FileBytes(handle), str(path), expect)
        except OSError as exc:
            raise SidecarError(f"cannot read sidecar {path}: {exc.strerror or exc}") from None
