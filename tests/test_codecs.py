"""Stream codecs: exact byte layouts, round trips over random inputs, and clear errors on bad streams."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsqueeze.codecs import StreamCodec, codec_keys, get_codec, int_param
from modelsqueeze.codecs import sparse
from modelsqueeze.codecs.bitpack import pack_bits, packed_n_bytes, unpack_bits
from modelsqueeze.codecs.raw import RAW_DTYPES, decode_raw, encode_raw
from modelsqueeze.errors import ModelSqueezeError

fast = settings(max_examples=60, deadline=None)


def reference_pack(values: np.ndarray, bits: int) -> bytes:
    """The documented layout spelled out bit by bit: value i at stream bits [i*bits, (i+1)*bits), LSB first."""
    value_bits = (values.astype(np.int64)[:, None] >> np.arange(bits)) & 1
    return np.packbits(value_bits.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def reference_symbol_count(positions: np.ndarray, bits: int) -> int:
    filler, previous, n_symbols = (1 << bits) - 1, -1, 0
    for position in positions.tolist():
        n_symbols += (position - previous - 1) // filler + 1
        previous = position
    return n_symbols


# ---------------------------------------------------------------- registry


def test_registry_knows_the_builtin_codecs():
    assert {"raw", "bitpack", "bitmap", "gaps"} <= set(codec_keys())
    assert get_codec("bitpack").key == "bitpack"


@pytest.mark.parametrize("key", ["huffman-v9", "", None, ["raw"]])
def test_unknown_codec_is_a_clear_error(key):
    with pytest.raises(ModelSqueezeError, match="unknown stream codec"):
        get_codec(key)


def test_a_key_registers_once():
    with pytest.raises(TypeError, match="twice"):

        class _Again(StreamCodec, key="raw"):
            pass


@pytest.mark.parametrize("value", [True, 1.0, "3", None, -1, 17])
def test_int_param_rejects_non_integers_and_out_of_range(value):
    with pytest.raises(ModelSqueezeError, match="'bits'"):
        int_param({"bits": value}, "bits", 0, 16)


# ---------------------------------------------------------------- bitpack


def test_bitpack_known_bytes():
    # 1 -> bits 0-1, 2 -> bits 2-3, 3 -> bits 4-5: 0b00111001
    assert pack_bits(np.array([1, 2, 3]), 2) == b"\x39"
    assert pack_bits(np.array([0x1FF, 0]), 9) == b"\xff\x01\x00"
    assert pack_bits(np.array([0xABCD]), 16) == b"\xcd\xab"


@fast
@given(
    bits=st.integers(1, 16),
    count=st.integers(0, 5000),
    seed=st.integers(0, 2**32 - 1),
    fill=st.sampled_from(["random", "max", "zero"]),
)
def test_bitpack_round_trip_matches_the_documented_layout(bits, count, seed, fill):
    top = (1 << bits) - 1
    if fill == "random":
        values = np.random.default_rng(seed).integers(0, top, count, endpoint=True)
    else:
        values = np.full(count, top if fill == "max" else 0, dtype=np.int64)
    data = pack_bits(values, bits)
    assert len(data) == packed_n_bytes(count, bits)
    assert data == reference_pack(values, bits)
    decoded = unpack_bits(data, count, bits)
    assert decoded.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert np.array_equal(decoded, values)


@pytest.mark.parametrize("values, bits", [([4], 2), ([-1], 8), ([65536], 16)])
def test_bitpack_refuses_values_that_do_not_fit(values, bits):
    with pytest.raises(ModelSqueezeError, match="does not fit"):
        pack_bits(np.array(values), bits)


@pytest.mark.parametrize("bits", [0, 17, True, 2.0])
def test_bitpack_refuses_bad_widths(bits):
    with pytest.raises(ModelSqueezeError, match="bit width"):
        pack_bits(np.array([0]), bits)


def test_bitpack_refuses_floats():
    with pytest.raises(ModelSqueezeError, match="integer"):
        pack_bits(np.array([1.0]), 4)


def test_unpack_checks_length_and_trailing_bits():
    with pytest.raises(ModelSqueezeError, match="needs 2 bytes"):
        unpack_bits(b"\x00", 3, 5)
    with pytest.raises(ModelSqueezeError, match="non-zero bits after"):
        unpack_bits(b"\x39\x80", 3, 3)  # 9 bits used, bit 15 set


# ---------------------------------------------------------------- sparse positions


def test_bitmap_known_bytes():
    assert sparse.encode_bitmap(np.array([0, 9]), 10) == b"\x01\x02"


def test_gaps_known_bytes():
    # gaps 0, 2, 0, 15 at 2 bits (filler 3): symbols 0 2 0 3 3 3 3 3 0
    data, n_symbols = sparse.encode_gaps(np.array([0, 3, 4, 20]), 2)
    assert (data, n_symbols) == (b"\xc8\xff\x00", 9)
    assert sparse.decode_gaps(data, 4, size=21, bits=2, n_symbols=9).tolist() == [0, 3, 4, 20]


def position_cases():
    random_case = st.builds(
        lambda size, density, seed: (np.flatnonzero(np.random.default_rng(seed).random(size) < density), size),
        st.integers(0, 4000),
        st.sampled_from([0.0, 0.001, 0.02, 0.3, 0.9, 1.0]),
        st.integers(0, 2**32 - 1),
    )
    edge_case = st.integers(1, 300_000).flatmap(
        lambda size: st.sampled_from(
            [
                (np.array([], dtype=np.int64), size),
                (np.array([0]), size),
                (np.array([size - 1]), size),
                (np.array(sorted({0, size // 2, size - 1})), size),  # long gaps need fillers
                (np.arange(size if size < 5000 else 0), size),
            ]
        )
    )
    return st.one_of(random_case, edge_case)


@fast
@given(position_cases())
def test_both_forms_round_trip_and_the_smaller_is_chosen(case):
    positions, size = case
    sizes = {}
    for key in ("bitmap", "gaps"):
        codec = get_codec(key)
        data, params = codec.encode(positions, size=size)
        assert codec.decode(data, positions.size, params).tolist() == positions.tolist()
        sizes[key] = len(data)
    assert sizes["bitmap"] == sparse.bitmap_n_bytes(size)
    assert sizes["gaps"] == sparse.gaps_n_bytes(positions)
    chosen = sizes[sparse.smaller_form(positions, size)]
    assert chosen == min(sizes.values()) == sparse.positions_n_bytes(positions, size)


@fast
@given(position_cases(), st.integers(1, 16))
def test_gaps_round_trip_at_every_width(case, bits):
    positions, size = case
    data, n_symbols = sparse.encode_gaps(positions, bits)
    assert n_symbols == reference_symbol_count(positions, bits) == sparse.gap_symbol_counts(positions)[bits - 1]
    assert len(data) == packed_n_bytes(n_symbols, bits)
    assert sparse.decode_gaps(data, positions.size, size, bits, n_symbols).tolist() == positions.tolist()


def test_gaps_width_minimises_bytes():
    positions = np.array([0, 3, 4, 20, 31])
    n_bytes = [packed_n_bytes(reference_symbol_count(positions, bits), bits) for bits in range(1, 17)]
    assert sparse.gaps_n_bytes(positions) == min(n_bytes)
    assert sparse.best_gap_bits(positions) == 1 + n_bytes.index(min(n_bytes))


@pytest.mark.parametrize("positions", [[3, 3], [5, 2], [-1], [10], [0.5]])
def test_bad_positions_are_refused(positions):
    with pytest.raises(ModelSqueezeError, match="positions"):
        get_codec("gaps").encode(np.array(positions), size=10)


def test_bitmap_decode_errors():
    with pytest.raises(ModelSqueezeError, match="needs 2 bytes"):
        sparse.decode_bitmap(b"\x01", 1, 10)
    with pytest.raises(ModelSqueezeError, match="past the end"):
        sparse.decode_bitmap(b"\x01\x04", 2, 10)
    with pytest.raises(ModelSqueezeError, match="marks 1 stored"):
        sparse.decode_bitmap(b"\x01\x00", 2, 10)


def test_gaps_decode_errors():
    data, n_symbols = sparse.encode_gaps(np.array([0, 3, 4, 20]), 2)
    with pytest.raises(ModelSqueezeError, match="holds 4 positions"):
        sparse.decode_gaps(data, 5, 21, 2, n_symbols)
    with pytest.raises(ModelSqueezeError, match="element 20 of a 20-element"):
        sparse.decode_gaps(data, 4, 20, 2, n_symbols)
    with pytest.raises(ModelSqueezeError, match="ends in a filler"):
        sparse.decode_gaps(b"\x0c", 1, 100, 2, 2)  # symbols 0, 3
    with pytest.raises(ModelSqueezeError, match="'symbols'"):
        get_codec("gaps").decode(data, 4, {"bits": 2, "size": 21, "symbols": "9"})


# ---------------------------------------------------------------- raw


def test_raw_is_little_endian():
    assert encode_raw(np.array([1.0, -2.0], dtype=np.float32), "float32") == struct.pack("<2f", 1.0, -2.0)
    assert encode_raw(np.array([258], dtype=np.int64), "uint16") == b"\x02\x01"


@fast
@given(st.sampled_from(RAW_DTYPES), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_raw_round_trip_is_bit_exact(dtype, count, seed):
    itemsize = np.dtype(dtype).itemsize
    values = np.random.default_rng(seed).integers(0, 256, count * itemsize, dtype=np.uint8).view(dtype)
    data, params = get_codec("raw").encode(values)
    decoded = get_codec("raw").decode(data, count, params)
    assert decoded.dtype == np.dtype(dtype)
    assert not np.shares_memory(decoded, np.frombuffer(data, np.uint8))  # a copy: the stream's bytes can go
    assert decoded.tobytes() == values.tobytes()


def test_raw_errors():
    with pytest.raises(ModelSqueezeError, match="not one of"):
        encode_raw(np.zeros(2), "complex64")
    with pytest.raises(ModelSqueezeError, match="cannot store float64 values as raw int8"):
        encode_raw(np.zeros(2), "int8")
    with pytest.raises(ModelSqueezeError, match="outside raw int8"):
        encode_raw(np.array([128]), "int8")
    with pytest.raises(ModelSqueezeError, match="cannot store complex128"):
        encode_raw(np.zeros(2, dtype=complex), "float32")
    with pytest.raises(ModelSqueezeError, match="needs 8 bytes"):
        decode_raw(b"\x00" * 7, 2, "float32")
    with pytest.raises(ModelSqueezeError, match="'dtype'"):
        get_codec("raw").decode(b"", 0, {"dtype": 3})
