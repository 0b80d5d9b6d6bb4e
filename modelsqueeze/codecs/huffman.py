"""Canonical Huffman coding of small unsigned integers (codebook indices, quantized codes, gap
symbols), code lengths limited to 16 bits, decoded with numpy: the stream is cut into chunks whose
bit offsets are stored, and all chunks are decoded in lock-step through a 2^L-entry lookup table.

Stream bytes: u32 alphabet size A, A u8 code lengths (0 = unused symbol), u32 chunk count C,
u32 number of coded bits, C u32 chunk start bits, then the bits (each code most significant bit
first) zero-padded to a whole byte. A constant stream has C = 0 and no bits.
"""

from __future__ import annotations

import heapq
import struct
from typing import Any, Mapping

import numpy as np

from modelsqueeze.codecs import StreamCodec, int_param
from modelsqueeze.codecs.sparse import check_gap_symbols, gap_symbols, symbols_to_positions
from modelsqueeze.errors import ModelSqueezeError

MAX_CODE_BITS = 16
MAX_ALPHABET = 1 << 16
# Chunk offsets cost 32 bits each: keep them under ~0.2% of the coded bits, and chunks >= 64 symbols.
_OFFSET_SHARE = 0.002
_MIN_CHUNK = 64
_ENCODE_BATCH = 1 << 16  # symbols expanded to bits at a time (bounds memory: ~100 bytes per symbol)


def code_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code lengths for symbol `counts` (0 for absent symbols), limited to `max_bits`.
    One present symbol gets length 1. The loop is over the alphabet, never the stream."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if present.size == 1:
        lengths[present] = 1
        return lengths
    if present.size == 0:
        return lengths
    # Standard Huffman on the present symbols; ties broken by symbol for determinism.
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    depth = {int(s): 0 for s in present}
    while len(heap) > 1:
        c1, k1, s1 = heapq.heappop(heap)
        c2, k2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, min(k1, k2), s1 + s2))
    for s, d in depth.items():
        lengths[s] = d
    if lengths.max() > max_bits:
        lengths = _limit(lengths, counts, max_bits)
    return lengths


def _limit(lengths: np.ndarray, counts: np.ndarray, max_bits: int) -> np.ndarray:
    """Clamp to max_bits, then restore the Kraft inequality by lengthening the cheapest codes
    (the least frequent ones that are still shorter than max_bits)."""
    lengths = np.minimum(lengths, max_bits)
    present = np.flatnonzero(lengths)
    kraft = int(np.sum(1 << (max_bits - lengths[present])))
    budget = 1 << max_bits
    order = sorted(present, key=lambda s: (counts[s], -lengths[s], s))
    while kraft > budget:
        for s in order:
            if lengths[s] < max_bits:
                kraft -= 1 << (max_bits - lengths[s] - 1)
                lengths[s] += 1
                if kraft <= budget:
                    break
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol: by increasing length, then symbol."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    code, prev = 0, 0
    for s in order:
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def _chunking(n: int, coded_bits: int) -> int:
    """Symbols per chunk."""
    n_chunks = max(1, min(int(_OFFSET_SHARE * coded_bits / 32), n // _MIN_CHUNK))
    return max(1, -(-n // n_chunks))


def encode_symbols(symbols: np.ndarray, alphabet: int | None = None) -> tuple[bytes, int]:
    """(stream bytes, symbols per chunk) for 1-D non-negative integers below 2^16."""
    symbols = np.asarray(symbols)
    if symbols.ndim != 1 or (symbols.size and not np.issubdtype(symbols.dtype, np.integer)):
        raise ModelSqueezeError("Huffman coding needs a 1-D integer array")
    n = symbols.size
    if n and (int(symbols.min()) < 0 or int(symbols.max()) >= MAX_ALPHABET):
        raise ModelSqueezeError(f"Huffman symbols must lie in 0..{MAX_ALPHABET - 1}")
    size = max(int(symbols.max()) + 1 if n else 0, alphabet or 0)
    counts = np.bincount(symbols, minlength=size) if n else np.zeros(size, np.int64)
    lengths = code_lengths(counts)
    if np.count_nonzero(counts) == 1:  # one distinct symbol: the table says it all, no bits, no chunks
        return struct.pack("<I", size) + lengths.astype(np.uint8).tobytes() + struct.pack("<II", 0, 0), n
    codes = canonical_codes(lengths)
    coded_bits = int(np.dot(counts.astype(np.int64), lengths))
    if coded_bits >= 1 << 32:
        raise ModelSqueezeError("a Huffman stream over 2^32 bits (512 MiB) is not supported")
    chunk = _chunking(n, coded_bits) if n else 1
    # A batch of symbols at a time is expanded to bits (one byte each) and packed; the bits that
    # do not fill a byte carry over to the next batch. Memory stays bounded by the batch.
    offsets, packed = [], []
    carry = np.zeros(0, np.uint8)
    base = 0  # bit position where the batch starts
    for lo in range(0, n, _ENCODE_BATCH):
        s = symbols[lo:lo + _ENCODE_BATCH].astype(np.intp)
        ln = lengths[s]
        ends = np.cumsum(ln)
        starts = ends - ln
        offsets.append(base + starts[(-lo) % chunk::chunk])  # the chunks that start in this batch
        owner = np.repeat(np.arange(s.size), ln)
        k = np.arange(owner.size) - np.repeat(starts, ln)
        bits = np.concatenate([carry, ((codes[s][owner] >> (ln[owner] - 1 - k)) & 1).astype(np.uint8)])
        whole = bits.size - bits.size % 8
        packed.append(np.packbits(bits[:whole]).tobytes())
        carry = bits[whole:]
        base += int(ends[-1])
    if carry.size:
        packed.append(np.packbits(carry).tobytes())  # zero-padded to a whole byte
    offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    header = struct.pack("<I", size) + lengths.astype(np.uint8).tobytes() + struct.pack("<II", offsets.size, coded_bits)
    return header + offsets.astype("<u4").tobytes() + b"".join(packed), chunk


def decode_symbols(data: bytes | memoryview, count: int, chunk: int) -> np.ndarray:
    """The `count` symbols of a stream made by encode_symbols; corrupt input is a ModelSqueezeError."""
    data = memoryview(data)
    if len(data) < 4:
        raise ModelSqueezeError("Huffman stream is shorter than its header")
    (size,) = struct.unpack_from("<I", data, 0)
    if size > MAX_ALPHABET or len(data) < 8 + size:
        raise ModelSqueezeError(f"Huffman alphabet of {size} symbols does not fit the stream")
    lengths = np.frombuffer(data, np.uint8, size, 4).astype(np.int64)
    if len(data) < 12 + size:
        raise ModelSqueezeError("Huffman stream is shorter than its header")
    n_chunks, coded_bits = struct.unpack_from("<II", data, 4 + size)
    table_end = 12 + size + 4 * n_chunks
    if count and n_chunks == 0:  # a constant stream: exactly one symbol has a code
        present = np.flatnonzero(lengths)
        if present.size != 1 or len(data) != table_end or coded_bits:
            raise ModelSqueezeError("Huffman stream without chunks must hold exactly one symbol and no bits")
        return np.full(count, present[0], np.uint16)
    expect_chunks = -(-count // chunk) if count else 0
    if n_chunks != expect_chunks or len(data) < table_end:
        raise ModelSqueezeError(f"Huffman stream has {n_chunks} chunks, {expect_chunks} expected")
    if count == 0:
        return np.zeros(0, np.uint16)
    # One chunk holds everything once chunk >= count; a larger declared chunk must not size the work.
    chunk = min(chunk, count)
    if lengths.max(initial=0) > MAX_CODE_BITS or not lengths.any():
        raise ModelSqueezeError("Huffman code lengths are out of range")
    present = np.flatnonzero(lengths)
    if int(np.sum(1 << (MAX_CODE_BITS - lengths[present]))) > 1 << MAX_CODE_BITS:
        raise ModelSqueezeError("Huffman code lengths do not form a prefix code")
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    # Lookup table on the next `width` bits: symbol and code length (0 marks no code).
    span = 1 << (width - lengths[present])
    first = codes[present] << (width - lengths[present])
    table_sym = np.zeros(1 << width, np.uint16)
    table_len = np.zeros(1 << width, np.int64)
    where = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    table_sym[where] = np.repeat(present, span)
    table_len[where] = np.repeat(lengths[present], span)
    offsets = np.frombuffer(data, "<u4", n_chunks, 12 + size).astype(np.int64)
    stream = np.frombuffer(data, np.uint8, len(data) - table_end, table_end)
    total_bits = coded_bits
    if stream.size != -(-coded_bits // 8):
        raise ModelSqueezeError(f"Huffman stream holds {stream.size} bytes for {coded_bits} coded bits")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > total_bits:
        raise ModelSqueezeError("Huffman chunk offsets are not increasing inside the stream")
    # Every byte's big-endian 32-bit window, so each step reads its bits with one gather; one
    # table entry holds symbol << 5 | length.
    padded = np.concatenate([stream, np.zeros(4, np.uint8)]).astype(np.uint32)
    windows = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    del padded
    table = (table_sym.astype(np.int32) << 5) | table_len.astype(np.int32)
    sizes = np.full(n_chunks, chunk)
    sizes[-1] = count - chunk * (n_chunks - 1)
    out = np.zeros((chunk, n_chunks), np.int32)  # symbol << 5 | length: 21 bits
    pos = offsets.astype(np.int64)
    drop = 32 - width
    full = sizes[-1] == chunk
    for step in range(chunk):
        if not full and step == sizes[-1]:  # the last, shorter chunk is done
            pos_last, pos = pos[-1], pos[:-1]
        entry = table[((windows[pos >> 3].astype(np.int64) << (pos & 7)) & 0xFFFFFFFF) >> drop]
        out[step, : pos.size] = entry
        pos = pos + (entry & 31)
    if not full:  # a shorter last chunk implies at least two chunks
        pos = np.append(pos, pos_last)
    lengths_seen = out & 31
    if not np.all(lengths_seen[:, : n_chunks - (not full)]) or not np.all(lengths_seen[: sizes[-1], -1]):
        raise ModelSqueezeError("Huffman stream holds a bit pattern that is no code")
    out >>= 5
    ends = np.append(offsets[1:], -1)
    if np.any(pos[:-1] != ends[:-1]) or pos[-1] != total_bits:
        raise ModelSqueezeError("Huffman chunks do not end where the next begins (corrupt stream)")
    return np.ascontiguousarray(out.T).reshape(-1)[:count].astype(np.uint16)


class HuffmanCodec(StreamCodec, key="huffman"):
    """Symbols (codebook indices, quantized codes) Huffman coded; `bits` is the width they fit."""

    param_names = ("bits", "chunk")

    @classmethod
    def encode(cls, array: np.ndarray, **hints: Any) -> tuple[bytes, dict[str, Any]]:
        bits = int(hints.get("bits", 16))
        data, chunk = encode_symbols(np.asarray(array), 1 << bits if bits <= 16 else None)
        return data, {"bits": bits, "chunk": chunk}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        bits = int_param(params, "bits", 1, 16)
        chunk = int_param(params, "chunk", 1)
        symbols = decode_symbols(data, count, chunk)
        if symbols.size and int(symbols.max()) >= 1 << bits:
            raise ModelSqueezeError(f"a Huffman symbol does not fit in {bits} bits")
        return symbols.astype(np.uint8 if bits <= 8 else np.uint16)


class HuffmanGapsCodec(StreamCodec, key="huffman-gaps"):
    """Sparse positions as Deep Compression's relative gaps (fillers included), Huffman coded."""

    param_names = ("bits", "size", "symbols", "chunk")

    @classmethod
    def encode(cls, array: np.ndarray, **hints: Any) -> tuple[bytes, dict[str, Any]]:
        size = int(hints["size"])
        bits, symbols = _best_gap_symbols(np.asarray(array, np.int64))
        data, chunk = encode_symbols(symbols, 1 << bits)
        return data, {"bits": bits, "size": size, "symbols": int(symbols.size), "chunk": chunk}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        bits = int_param(params, "bits", 1, 16)
        size = int_param(params, "size", 0)
        n_symbols = int_param(params, "symbols", 0)
        chunk = int_param(params, "chunk", 1)
        check_gap_symbols(n_symbols, count, size, bits)
        symbols = decode_symbols(data, n_symbols, chunk)
        return symbols_to_positions(symbols, bits, count, size)


def _best_gap_symbols(positions: np.ndarray) -> tuple[int, np.ndarray]:
    """The gap width whose symbols have the smallest entropy-coded size (estimated as n * H plus
    a byte of code length per symbol of the alphabet). Each width's symbol counts come from the
    gaps (a gap g is g // filler fillers and then g % filler), so only the chosen width's symbols
    are ever built (narrow widths of a very sparse tensor would make millions)."""
    gaps = np.diff(positions, prepend=-1) - 1 if positions.size else np.zeros(0, np.int64)
    best = None
    for bits in range(1, MAX_CODE_BITS + 1):
        filler = (1 << bits) - 1
        counts = np.bincount(gaps % filler, minlength=1 << bits).astype(np.float64)
        counts[filler] += float((gaps // filler).sum())
        n_symbols = int(counts.sum())
        p = counts[counts > 0] / max(n_symbols, 1)
        cost = float(-(counts[counts > 0] * np.log2(p)).sum()) / 8 + (1 << bits)
        if best is None or cost < best[0]:
            best = (cost, bits)
        if (1 << bits) > 4 * max(n_symbols, 1):
            break  # wider alphabets only add table bytes from here on
    return best[1], gap_symbols(positions, best[1])
