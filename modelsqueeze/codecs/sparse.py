"""Positions of the stored entries of a sparse tensor: a bitmap, or bit-packed gaps with fillers.

The writer stores whichever form is smaller; `positions_n_bytes` and friends size both without encoding.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from modelsqueeze.codecs import StreamCodec, check_n_bytes, int_param
from modelsqueeze.codecs.bitpack import MAX_BITS, pack_bits, packed_n_bytes, unpack_bits
from modelsqueeze.errors import ModelSqueezeError

GAP_BITS = range(1, MAX_BITS + 1)  # the widths the writer tries for the gaps form
_HISTOGRAM_BINS = 1 << MAX_BITS  # past every filler value, so the histogram covers all short gaps exactly
_NO_LIMIT = np.iinfo(np.int64).max  # sizing needs no tensor size: only the order of the positions matters


def check_positions(positions: np.ndarray, size: int) -> np.ndarray:
    """`positions` as int64 if they are sorted, unique flat indices into `size` elements."""
    positions = np.asarray(positions)
    if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
        raise ModelSqueezeError(f"positions must be a 1-D integer array, got {positions.dtype} {positions.shape}")
    positions = positions.astype(np.int64, copy=False)
    if positions.size and (positions[0] < 0 or positions[-1] >= size or np.any(np.diff(positions) <= 0)):
        raise ModelSqueezeError(f"positions must be sorted, unique and in 0..{size - 1}")
    return positions


def _gaps(positions: np.ndarray) -> np.ndarray:
    """d_i = pos_i - pos_{i-1} - 1, with pos_{-1} = -1: the skipped elements before each stored one."""
    gaps = np.empty_like(positions)
    if positions.size:
        gaps[0] = positions[0] + 1  # the gap before the first position counts from pos_{-1} = -1
        np.subtract(positions[1:], positions[:-1], out=gaps[1:])
    gaps -= 1
    return gaps


def _symbol_counts(gaps: np.ndarray) -> np.ndarray:
    # One histogram of the gaps serves all widths; the few gaps past its end are summed exactly.
    histogram = np.bincount(np.minimum(gaps, _HISTOGRAM_BINS), minlength=_HISTOGRAM_BINS + 1)[:_HISTOGRAM_BINS]
    long_gaps = gaps[gaps >= _HISTOGRAM_BINS]
    gap_values = np.arange(_HISTOGRAM_BINS, dtype=np.int64)
    counts = np.empty(len(GAP_BITS), dtype=np.int64)
    for i, bits in enumerate(GAP_BITS):
        filler = (1 << bits) - 1
        n_fillers = int(histogram @ (gap_values // filler)) + int((long_gaps // filler).sum())
        counts[i] = gaps.size + n_fillers
    return counts


def _best_width(gaps: np.ndarray) -> tuple[int, int]:
    """(bits, n_bytes) of the gap width with the fewest bytes, the narrowest on a tie."""
    n_bytes = [packed_n_bytes(int(n), bits) for n, bits in zip(_symbol_counts(gaps), GAP_BITS)]
    best = int(np.argmin(n_bytes))
    return GAP_BITS[best], n_bytes[best]


def gap_symbol_counts(positions: np.ndarray) -> np.ndarray:
    """Symbols the gaps form needs at each width in GAP_BITS: one per position plus d // (2**bits - 1) fillers."""
    return _symbol_counts(_gaps(check_positions(positions, _NO_LIMIT)))


def best_gap_bits(positions: np.ndarray) -> int:
    return _best_width(_gaps(check_positions(positions, _NO_LIMIT)))[0]


def gaps_n_bytes(positions: np.ndarray) -> int:
    return _best_width(_gaps(check_positions(positions, _NO_LIMIT)))[1]


def bitmap_n_bytes(size: int) -> int:
    return (size + 7) // 8


def smaller_form(positions: np.ndarray, size: int) -> str:
    """'gaps' when it is strictly smaller than the bitmap, else 'bitmap' (simpler to decode)."""
    return "gaps" if gaps_n_bytes(positions) < bitmap_n_bytes(size) else "bitmap"


def positions_n_bytes(positions: np.ndarray, size: int) -> int:
    """Bytes the positions take in the smaller form: for bits per stored weight in reports."""
    return min(gaps_n_bytes(positions), bitmap_n_bytes(size))


def encode_bitmap(positions: np.ndarray, size: int) -> bytes:
    keep_mask = np.zeros(size, dtype=np.uint8)
    keep_mask[check_positions(positions, size)] = 1
    return np.packbits(keep_mask, bitorder="little").tobytes()


def decode_bitmap(data: bytes | memoryview, count: int, size: int) -> np.ndarray:
    check_n_bytes(data, bitmap_n_bytes(size), f"a bitmap of {size} elements")
    stream = np.frombuffer(data, dtype=np.uint8)
    if size % 8 and stream[-1] >> (size % 8):
        raise ModelSqueezeError("bitmap has bits set past the end of the tensor")
    positions = np.flatnonzero(np.unpackbits(stream, count=size, bitorder="little")).astype(np.int64)
    if positions.size != count:
        raise ModelSqueezeError(f"bitmap marks {positions.size} stored entries, the descriptor says {count}")
    return positions


def _gap_symbols(gaps: np.ndarray, bits: int) -> np.ndarray:
    filler = (1 << bits) - 1
    n_fillers = gaps // filler
    closing = np.cumsum(n_fillers + 1) - 1  # index of the symbol that ends each gap
    symbols = np.full(int(closing[-1]) + 1 if closing.size else 0, filler, dtype=np.uint16)
    symbols[closing] = gaps - n_fillers * filler
    return symbols


def gap_symbols(positions: np.ndarray, bits: int) -> np.ndarray:
    """The gap symbols (fillers included) of sorted positions at `bits` bits per symbol."""
    return _gap_symbols(_gaps(check_positions(positions, _NO_LIMIT)), bits)


def _encode_gaps(gaps: np.ndarray, bits: int) -> tuple[bytes, int]:
    symbols = _gap_symbols(gaps, bits)
    return pack_bits(symbols, bits), symbols.size


def encode_gaps(positions: np.ndarray, bits: int) -> tuple[bytes, int]:
    """The gaps form at `bits` bits per symbol: (bytes, number of symbols)."""
    return _encode_gaps(_gaps(check_positions(positions, _NO_LIMIT)), bits)


def check_gap_symbols(n_symbols: int, count: int, size: int, bits: int) -> None:
    """Before decoding: `count` positions in `size` elements take at most `size // filler` fillers
    (each advances `filler` elements without marking one), so no more symbols than that."""
    most = count + size // ((1 << bits) - 1) if count else 0
    if n_symbols > most:
        raise ModelSqueezeError(f"gaps stream claims {n_symbols} symbols, {count} positions in {size} elements need at most {most}")


def decode_gaps(data: bytes | memoryview, count: int, size: int, bits: int, n_symbols: int) -> np.ndarray:
    check_gap_symbols(n_symbols, count, size, bits)
    return symbols_to_positions(unpack_bits(data, n_symbols, bits), bits, count, size)


def symbols_to_positions(symbols: np.ndarray, bits: int, count: int, size: int) -> np.ndarray:
    """Positions back from gap symbols; inconsistent symbols are a ModelSqueezeError."""
    filler = (1 << bits) - 1
    n_symbols = symbols.size
    symbols = symbols.astype(np.int64)
    if n_symbols and int(symbols.max()) > filler:
        raise ModelSqueezeError(f"a gap symbol does not fit in {bits} bits")
    is_position = symbols < filler
    n_positions = int(np.count_nonzero(is_position))
    if n_positions != count:
        raise ModelSqueezeError(f"gaps stream holds {n_positions} positions, the descriptor says {count}")
    if n_symbols and not is_position[-1]:
        raise ModelSqueezeError("gaps stream ends in a filler symbol")
    # A filler advances by `filler`, a closing symbol s by s + 1 and marks the element it lands on.
    positions = np.cumsum(symbols + is_position)[is_position] - 1
    if positions.size and positions[-1] >= size:
        raise ModelSqueezeError(f"gaps stream points at element {int(positions[-1])} of a {size}-element tensor")
    return positions


class BitmapCodec(StreamCodec, key="bitmap"):
    param_names = ("size",)

    @classmethod
    def encode(cls, array: np.ndarray, *, size: int | None = None, **_hints: Any) -> tuple[bytes, dict[str, Any]]:
        if size is None:
            raise ModelSqueezeError("the bitmap codec needs the tensor size")
        return encode_bitmap(array, size), {"size": size}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        return decode_bitmap(data, count, int_param(params, "size", 0))


class GapsCodec(StreamCodec, key="gaps"):
    param_names = ("bits", "size", "symbols")

    @classmethod
    def encode(cls, array: np.ndarray, *, size: int | None = None, **_hints: Any) -> tuple[bytes, dict[str, Any]]:
        if size is None:
            raise ModelSqueezeError("the gaps codec needs the tensor size")
        gaps = _gaps(check_positions(array, size))
        bits, _ = _best_width(gaps)
        data, n_symbols = _encode_gaps(gaps, bits)
        return data, {"bits": bits, "size": size, "symbols": n_symbols}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        return decode_gaps(
            data,
            count,
            size=int_param(params, "size", 0),
            bits=int_param(params, "bits", 1, MAX_BITS),
            n_symbols=int_param(params, "symbols", 0),
        )
