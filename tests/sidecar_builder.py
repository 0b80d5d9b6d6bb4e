"""Crafted sidecars with valid checksums, so that hostile metadata and streams reach the decoder
instead of stopping at a CRC: split a real sidecar into records, change their metadata or build a
record from stream bytes, and put the file back together."""

from __future__ import annotations

import json
import struct
import zlib

from modelsqueeze.sidecar import HEADER_BYTES, MAGIC


def split_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """(meta bytes, payload bytes) per record of a valid sidecar (an independent reader of the layout)."""
    (count,) = struct.unpack_from("<I", data, 12)
    parts, offset = [], HEADER_BYTES
    for _ in range(count):
        _, meta_len, payload_len, _, _ = struct.unpack_from("<4sIQII", data, offset)
        meta_start = offset + 24
        payload_start = meta_start + meta_len + (-meta_len % 8)
        parts.append((data[meta_start : meta_start + meta_len], data[payload_start : payload_start + payload_len]))
        offset = payload_start + payload_len
    return parts


def build(parts: list[tuple[bytes, bytes]], graph: bytes, count: int | None = None, file_size: int | None = None) -> bytes:
    """A sidecar with valid checksums around whatever meta and payload bytes are given."""
    body = b""
    for meta, payload in parts:
        region = meta + bytes(-len(meta) % 8) + payload
        body += struct.pack("<4sIQII", b"MSQR", len(meta), len(payload), zlib.crc32(region), 0) + region
    size = HEADER_BYTES + len(body) if file_size is None else file_size
    header = struct.pack("<8sIIQ32sI", MAGIC, 1, len(parts) if count is None else count, size, graph, 0)
    return header + struct.pack("<I", zlib.crc32(header)) + body


def graph_of(sidecar: bytes) -> bytes:
    """The graph hash a sidecar's header carries."""
    return sidecar[24:56]


def meta_of(part: tuple[bytes, bytes]) -> dict:
    return json.loads(part[0])


def with_meta(part: tuple[bytes, bytes], meta: dict) -> tuple[bytes, bytes]:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(), part[1]


def record(meta: dict, streams: list[tuple[dict, bytes]]) -> tuple[bytes, bytes]:
    """A record from its metadata (without 'streams') and (descriptor, bytes) per stream: offsets,
    lengths and padding are filled in as the format lays them out."""
    payload, descriptors = b"", []
    for descriptor, data in streams:
        descriptors.append({**descriptor, "offset": len(payload), "length": len(data)})
        payload += data + bytes(-len(data) % 8)
    return with_meta((b"", payload), {**meta, "streams": descriptors})


def constant_huffman(symbol: int = 0) -> bytes:
    """A Huffman stream of one distinct symbol: its table and no bits, whatever the symbol count."""
    lengths = bytes(symbol) + b"\x01"
    return struct.pack("<I", len(lengths)) + lengths + struct.pack("<II", 0, 0)
