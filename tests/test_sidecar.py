"""The sidecar container: round trips, exact golden bytes, and a clear error for every corruption."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.sidecar import (
    HEADER_BYTES,
    MAGIC,
    SidecarError,
    decode_sidecar,
    encode_sidecar,
    read_sidecar,
    record_size,
)
from modelsqueeze.tensor import FLOAT_DTYPES, CompressedTensor

GRAPH_HASH = hashlib.sha256(b"modelsqueeze golden v1").digest()
GOLDEN = Path(__file__).parent / "data" / "golden_v1.msq"
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def random_floats(rng: np.random.Generator, count: int, dtype: str) -> np.ndarray:
    """Every bit pattern is fair game: NaN payloads, -0.0, infinities, subnormals."""
    return rng.integers(0, 256, count * np.dtype(dtype).itemsize, dtype=np.uint8).view(dtype)


def finite_floats(rng: np.random.Generator, count: int, dtype: str, within: str) -> np.ndarray:
    """Random bit patterns of `dtype` that are finite and within the range of `within` (the
    codebook of a `within` tensor: the decoder refuses NaN, infinities and entries it cannot hold)."""
    values = random_floats(rng, count, dtype).copy()
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(values) | (np.abs(values.astype(np.float64)) > np.finfo(within).max)
    values[bad] = np.asarray(rng.standard_normal(int(bad.sum())), dtype)
    return values


def as_bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.dtype.itemsize}") if array.dtype.kind == "f" else array


def assert_same_record(got: CompressedTensor, want: CompressedTensor) -> None:
    assert (got.name, got.shape, got.dtype, got.kind, got.index_bits) == (
        want.name, want.shape, want.dtype, want.kind, want.index_bits,
    )  # fmt: skip
    if want.values is not None:
        assert got.values.dtype == np.dtype(want.dtype)
        assert np.array_equal(as_bits(got.values), as_bits(want.values.astype(want.dtype)))
    if want.codebook is not None:
        assert got.codebook.dtype == want.codebook.dtype
        assert np.array_equal(as_bits(got.codebook), as_bits(want.codebook))
        assert np.array_equal(got.indices, want.indices)
    if want.positions is not None:
        assert np.array_equal(got.positions, want.positions)
    with np.errstate(over="ignore", invalid="ignore"):  # random codebook bits cast to a narrower float
        assert np.array_equal(as_bits(got.decode()), as_bits(want.decode()))
        assert got.decode().dtype == want.decode().dtype


def split(data: bytes) -> list[tuple[dict, bytes]]:
    """(meta, payload) per record, read straight from the layout in docs/FORMAT.md."""
    _, record_count = struct.unpack_from("<II", data, 8)
    records, offset = [], HEADER_BYTES
    for _ in range(record_count):
        magic, meta_len, payload_len, _, _ = struct.unpack_from("<4sIQII", data, offset)
        assert magic == b"MSQR" and offset % 8 == 0
        meta_start = offset + 24
        payload_start = meta_start + meta_len + (-meta_len % 8)
        meta = json.loads(data[meta_start : meta_start + meta_len])
        records.append((meta, data[payload_start : payload_start + payload_len]))
        offset = payload_start + payload_len
    assert offset == len(data)
    return records


def build(records: list[tuple[dict | bytes, bytes]], version: int = 1, graph_hash: bytes = GRAPH_HASH) -> bytes:
    """A sidecar with valid checksums around whatever meta and payload the test wants (an independent writer)."""
    body = b""
    for meta, payload in records:
        if not isinstance(meta, bytes):
            meta = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        meta_bytes = meta
        region = meta_bytes + bytes(-len(meta_bytes) % 8) + payload
        body += struct.pack("<4sIQII", b"MSQR", len(meta_bytes), len(payload), zlib.crc32(region), 0) + region
    header = struct.pack("<8sIIQ32sI", MAGIC, version, len(records), HEADER_BYTES + len(body), graph_hash, 0)
    return header + struct.pack("<I", zlib.crc32(header)) + body


def sample_records() -> list[CompressedTensor]:
    rng = np.random.default_rng(7)
    positions = np.flatnonzero(rng.random(400) < 0.05)
    return [
        CompressedTensor.raw("embed.weight", rng.standard_normal((3, 4)).astype(np.float32)),
        CompressedTensor(
            "fc1.weight", (20, 20), "float32", codebook=np.linspace(-1, 1, 16, dtype=np.float32),
            indices=rng.integers(0, 16, positions.size), index_bits=4, positions=positions,
        ),  # fmt: skip
        CompressedTensor(
            "fc2.weight", (6, 5), "float16", codebook=np.array([-0.5, 0.25, 1.0], dtype=np.float16),
            indices=rng.integers(0, 3, 30), index_bits=2,
        ),  # fmt: skip
    ]


def payload_ranges(data: bytes) -> list[tuple[int, int]]:
    """(payload start, payload end) of each record; a payload ends its record (it is padded already)."""
    ranges, offset = [], HEADER_BYTES
    while offset < len(data):
        _, meta_len, payload_len, _, _ = struct.unpack_from("<4sIQII", data, offset)
        payload_start = offset + 24 + meta_len + (-meta_len % 8)
        ranges.append((payload_start, payload_start + payload_len))
        offset = payload_start + payload_len
    return ranges


# ---------------------------------------------------------------- round trips


@st.composite
def records(draw, name: str = "w") -> CompressedTensor:
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 6), max_size=3).map(tuple),
            st.integers(0, 3000).map(lambda n: (n,)),
        )
    )
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_params = math.prod(shape)
    positions = None
    if draw(st.booleans()):
        density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
        positions = np.flatnonzero(rng.random(n_params) < density)
    n_stored = n_params if positions is None else positions.size
    if draw(st.booleans()):
        return CompressedTensor(name, shape, dtype, values=random_floats(rng, n_stored, dtype), positions=positions)
    index_bits = draw(st.one_of(st.integers(1, 8), st.integers(9, 16)))
    n_centroids = draw(st.integers(1, min(1 << index_bits, 300)))
    codebook = finite_floats(rng, n_centroids, draw(st.sampled_from(FLOAT_DTYPES)), dtype)
    indices = rng.integers(0, n_centroids, n_stored)
    return CompressedTensor(
        name, shape, dtype, codebook=codebook, indices=indices, index_bits=index_bits, positions=positions
    )


@st.composite
def record_lists(draw) -> list[CompressedTensor]:
    names = draw(st.lists(st.text(max_size=12), max_size=4, unique=True))
    return [draw(records(name)) for name in names]


@fast
@given(record_lists())
def test_round_trip_is_bit_exact(originals):
    data = encode_sidecar(originals, GRAPH_HASH)
    assert data == encode_sidecar(originals, GRAPH_HASH)  # deterministic
    car = decode_sidecar(data)
    assert (car.version, car.graph_hash) == (1, GRAPH_HASH)
    assert list(car.records) == [record.name for record in originals]
    for original in originals:
        assert_same_record(car.records[original.name], original)
        assert car.record_bytes[original.name] == record_size(original)
    assert len(data) == HEADER_BYTES + sum(car.record_bytes.values())
    split(data)  # the layout an independent reader expects: aligned, no holes, ends at end of file


def test_sizes_per_stream():
    data = encode_sidecar(sample_records(), GRAPH_HASH)
    car = decode_sidecar(data)
    for meta, _ in split(data):
        assert car.stream_bytes[meta["name"]] == {stream["role"]: stream["length"] for stream in meta["streams"]}
    assert car.stream_bytes["fc2.weight"] == {"codebook": 6, "indices": 8}


def test_values_are_stored_in_the_tensor_dtype():
    record = CompressedTensor("w", (3,), "float16", values=np.array([1.0, 2.5, -0.0], dtype=np.float64))
    car = decode_sidecar(encode_sidecar([record], GRAPH_HASH))
    assert car.stream_bytes["w"] == {"values": 6}
    assert_same_record(car.records["w"], record)


def test_positions_use_the_smaller_form_unless_a_codec_is_pinned():
    sparse_record = sample_records()[1]
    ((meta, _),) = split(encode_sidecar([sparse_record], GRAPH_HASH))
    assert meta["streams"][0]["codec"] == "gaps"
    pinned = CompressedTensor(**{**vars(sparse_record), "stream_codecs": {"positions": "bitmap"}})
    data = encode_sidecar([pinned], GRAPH_HASH)
    ((meta, _),) = split(data)
    expected = {"role": "positions", "codec": "bitmap", "count": 21, "offset": 0, "length": 50, "size": 400}
    assert meta["streams"][0] == expected
    assert_same_record(decode_sidecar(data).records["fc1.weight"], sparse_record)


def test_a_pinned_non_default_codec_survives_a_round_trip():
    record = CompressedTensor(
        "w", (4,), "float32", codebook=np.ones(2, np.float32), indices=np.array([0, 1, 1, 0], np.uint8),
        index_bits=1, stream_codecs={"indices": "raw"},
    )  # fmt: skip
    decoded = decode_sidecar(encode_sidecar([record], GRAPH_HASH)).records["w"]
    assert decoded.stream_codecs == {"indices": "raw"}
    assert_same_record(decoded, record)


def test_empty_sidecar():
    data = encode_sidecar([], GRAPH_HASH)
    assert len(data) == HEADER_BYTES
    assert decode_sidecar(data).records == {}


# ---------------------------------------------------------------- golden bytes


def golden_records() -> list[CompressedTensor]:
    return [
        CompressedTensor.raw("embed.weight", np.array([[0.0, -0.0, 1.5], [-2.25, np.inf, np.nan]], dtype=np.float32)),
        CompressedTensor(
            "fc1.weight", (4, 8), "float32", codebook=np.array([-0.5, 0.25, 1.0, 2.0], dtype=np.float32),
            indices=np.array([0, 1, 2, 1, 3]), index_bits=2, positions=np.array([0, 3, 4, 20, 31]),
        ),  # fmt: skip
        CompressedTensor(
            "head.weight", (5,), "float16", codebook=np.array([0.5, -1.0, 3.0], dtype=np.float16),
            indices=np.array([2, 0, 1, 1, 2]), index_bits=3,
        ),  # fmt: skip
    ]


def test_golden_bytes():
    """Pins format version 1 byte for byte. A change here is a format change: bump the version and
    document it in docs/FORMAT.md. Regenerate with MODELSQUEEZE_REGEN_GOLDEN=1 only then."""
    data = encode_sidecar(golden_records(), GRAPH_HASH)
    if os.environ.get("MODELSQUEEZE_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes()
    car = read_sidecar(GOLDEN)
    for want in golden_records():
        assert_same_record(car.records[want.name], want)
    assert [stream["codec"] for stream in split(data)[1][0]["streams"]] == ["gaps", "raw", "bitpack"]


# ---------------------------------------------------------------- writer refusals


def test_writer_refusals():
    record = sample_records()[0]
    with pytest.raises(SidecarError, match="'embed.weight' appears twice"):
        encode_sidecar([record, record], GRAPH_HASH)
    with pytest.raises(SidecarError, match="32 bytes"):
        encode_sidecar([record], b"short")
    with pytest.raises(SidecarError, match=r"roles it does not have: \['positions'\]"):
        encode_sidecar([CompressedTensor(**{**vars(record), "stream_codecs": {"positions": "gaps"}})], GRAPH_HASH)
    with pytest.raises(SidecarError, match="unknown stream codec 'zstd'"):
        encode_sidecar([CompressedTensor(**{**vars(record), "stream_codecs": {"values": "zstd"}})], GRAPH_HASH)
    with pytest.raises(SidecarError, match="not valid Unicode"):
        encode_sidecar([CompressedTensor.raw("bad\ud800name", np.zeros(1, np.float32))], GRAPH_HASH)


# ---------------------------------------------------------------- corruption


def decode_error(data: bytes) -> str:
    with pytest.raises(SidecarError) as info:
        decode_sidecar(data, source="x.msq")
    return str(info.value)


def test_every_truncation_is_an_error_naming_the_record():
    data = encode_sidecar(sample_records(), GRAPH_HASH)
    ranges = payload_ranges(data)
    for n_bytes in range(len(data)):
        message = decode_error(data[:n_bytes])
        assert message.startswith("x.msq") and "truncated" in message
        if n_bytes >= HEADER_BYTES:
            index = next(i for i, (_, end) in enumerate(ranges) if end > n_bytes)
            assert f"record {index}" in message


def test_every_flipped_byte_is_detected():
    data = encode_sidecar(sample_records(), GRAPH_HASH)
    for offset in range(len(data)):
        decode_error(data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :])


def test_a_flipped_payload_byte_names_the_record():
    data = encode_sidecar(sample_records(), GRAPH_HASH)
    for index, (payload_start, payload_end) in enumerate(payload_ranges(data)):
        name = sample_records()[index].name
        for offset in (payload_start, (payload_start + payload_end) // 2, payload_end - 1):
            corrupt = data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]
            assert decode_error(corrupt) == f"x.msq: record {index} ({name!r}): checksum mismatch (file is corrupt)"


def test_header_errors():
    data = encode_sidecar(sample_records(), GRAPH_HASH)
    assert "bad magic" in decode_error(b"PK\x03\x04" + data[4:])
    assert decode_error(b"") == "x.msq: file is truncated (0 bytes; the header alone is 64)"
    assert "bad magic" in decode_error(b"\x00")
    assert decode_error(build(split(data), version=2)) == (
        "sidecar x.msq is format version 2; this modelsqueeze reads version 1"
    )
    assert "header checksum mismatch" in decode_error(data[:30] + b"\xff" + data[31:])
    assert decode_error(data + b"junk") == "x.msq: 4 unexpected bytes after the last record"
    too_many = bytearray(build(split(data)))
    struct.pack_into("<I", too_many, 12, 10**6)
    struct.pack_into("<I", too_many, 60, zlib.crc32(too_many[:60]))
    assert "claims 1000000 records" in decode_error(bytes(too_many))


def test_huge_meta_len_is_refused_before_reading():
    data = bytearray(encode_sidecar(sample_records(), GRAPH_HASH))
    struct.pack_into("<I", data, HEADER_BYTES + 4, 2**31)
    assert decode_error(bytes(data)) == (
        "x.msq: record 0: metadata length 2147483648 is over the 1 MiB limit (file is corrupt)"
    )


def patched(meta_change, index: int = 1) -> bytes:
    """The sample sidecar with record `index`'s meta edited and every checksum valid again."""
    parts = split(encode_sidecar(sample_records(), GRAPH_HASH))
    meta, payload = parts[index]
    changed = meta_change(meta)
    parts[index] = (changed if isinstance(changed, bytes) else meta, payload)
    return build(parts)


def set_stream(role: str, **fields):
    def change(meta):
        next(stream for stream in meta["streams"] if stream["role"] == role).update(fields)

    return change


@pytest.mark.parametrize(
    "change, expected",
    [
        (set_stream("indices", codec="arithmetic"), "stream 'indices': unknown stream codec 'arithmetic'"),
        (set_stream("indices", offset=10**6), "stream 'indices': bytes 1000000..1000011 are not where"),
        (set_stream("indices", length=10**6), "outside the 104-byte payload"),
        (set_stream("indices", length=12), "stream 'indices' (bitpack): 21 values at 4 bits needs 11 bytes"),
        (set_stream("positions", size=401), "size 401 differs from the tensor's"),
        (set_stream("codebook", count=True), "parameter 'count' must be an integer"),
        (set_stream("codebook", dtype="float8"), "raw dtype 'float8' is not one of"),
        (set_stream("indices", extra=1), "stream 'indices': keys"),
        (set_stream("indices", bits=17), "parameter 'bits' is 17"),
        (lambda meta: meta.update(kind="raw"), "a raw record's metadata keys are"),
        (lambda meta: meta.update(kind="sparse+raw"), "a sparse+raw record's metadata keys are"),
        (lambda meta: meta.update(kind="codebook"), "a codebook record has streams ['codebook', 'indices']"),
        (lambda meta: meta.update(kind="dense"), "unknown record kind 'dense'"),
        (lambda meta: meta.update(dtype="int8"), "dtype 'int8' is not one of"),
        (lambda meta: meta.update(shape=[20, -20]), "not a list of non-negative integers"),
        (lambda meta: meta.update(shape=[2**40, 2**40]), "too many elements"),
        (lambda meta: meta.update(shape=[21, 20]), "size 400 differs from the tensor's"),
        (lambda meta: meta.update(index_bits=3), "16 centroids do not fit in 3-bit indices"),
        (lambda meta: meta.update(name="embed.weight"), "a second record for the same tensor"),
        (lambda meta: meta.pop("shape"), "record's metadata keys are"),
        (lambda meta: meta["streams"].reverse(), "has streams"),
        (lambda meta: b'{"name":"fc1.weight",', "not valid JSON"),
        (lambda meta: b"[1, 2]", "not a JSON object"),
        (lambda meta: b'{"name": NaN}', "not valid JSON"),
        (lambda meta: b"\xff\xfe", "not valid JSON"),
        (lambda meta: b"[" * 100_000, "not valid JSON"),
    ],
)
def test_a_well_checksummed_but_inconsistent_record_is_refused(change, expected):
    message = decode_error(patched(change))
    assert message.startswith("x.msq: record 1")
    assert expected in message


def test_nonzero_padding_is_refused():
    parts = split(encode_sidecar(sample_records(), GRAPH_HASH))
    meta, payload = parts[2]  # the codebook of 3 float16 ends at byte 6 of 8
    parts[2] = (meta, payload[:7] + b"\x01" + payload[8:])
    assert decode_error(build(parts)) == "x.msq: record 2 ('fc2.weight'): stream 'codebook': non-zero padding"


def test_unsorted_raw_positions_are_refused():
    record = CompressedTensor(
        "w", (8,), "float32", values=np.ones(2, np.float32), positions=np.array([1, 5], np.uint64),
        stream_codecs={"positions": "raw"},
    )  # fmt: skip
    ((meta, payload),) = split(encode_sidecar([record], GRAPH_HASH))
    swapped = np.array([5, 1], "<u8").tobytes() + payload[16:]
    assert "positions must be sorted" in decode_error(build([(meta, swapped)]))


hostile_values = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(0, 64), st.text(max_size=5), st.booleans(), st.none(),
    st.lists(st.integers(0, 50), max_size=3), st.floats(), st.sampled_from(["raw", "bitpack", "bitmap", "gaps"]),
)  # fmt: skip


@fast
@given(index=st.integers(0, 2), stream=st.integers(0, 2), key=st.text(max_size=3) | st.sampled_from(
    ["role", "codec", "count", "offset", "length", "dtype", "bits", "size", "symbols", "shape", "kind", "index_bits"]
), value=hostile_values)
def test_hostile_meta_is_refused_or_harmless(index, stream, key, value):
    def change(meta):
        streams = meta["streams"]
        target = streams[stream % len(streams)] if key not in ("shape", "kind", "index_bits") else meta
        target[key] = value

    try:
        decode_sidecar(patched(change, index))
    except SidecarError:
        pass


@fast
@given(index=st.integers(0, 2), seed=st.integers(0, 2**32 - 1), n_flips=st.integers(1, 8))
def test_hostile_payload_is_refused_or_harmless(index, seed, n_flips):
    rng = np.random.default_rng(seed)
    parts = split(encode_sidecar(sample_records(), GRAPH_HASH))
    meta, payload = parts[index]
    noisy = np.frombuffer(payload, np.uint8).copy()
    noisy[rng.integers(0, noisy.size, n_flips)] ^= rng.integers(1, 256, n_flips).astype(np.uint8)
    parts[index] = (meta, noisy.tobytes())
    try:
        car = decode_sidecar(build(parts))
    except SidecarError:
        return
    car.records[meta["name"]].decode()  # accepted means fully consistent


# ---------------------------------------------------------------- files


def test_read_sidecar_files(tmp_path):
    path = tmp_path / "m.msq"
    path.write_bytes(encode_sidecar(sample_records(), GRAPH_HASH))
    assert list(read_sidecar(path).records) == ["embed.weight", "fc1.weight", "fc2.weight"]
    with pytest.raises(SidecarError, match="not found"):
        read_sidecar(tmp_path / "missing.msq")
    with pytest.raises(SidecarError, match="is a directory"):
        read_sidecar(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SidecarError, match=rf"^{path}: record 2 \('fc2.weight'\): file is truncated"):
        read_sidecar(path)


def test_errors_are_modelsqueeze_errors():
    assert issubclass(SidecarError, ModelSqueezeError)


def test_record_rejects_unsorted_unsigned_positions_and_2d_codebook():
    from modelsqueeze.errors import ModelSqueezeError

    with pytest.raises(ModelSqueezeError, match="sorted"):
        CompressedTensor("w", (8,), "float32", values=np.ones(2, np.float32), positions=np.array([5, 1], np.uint64))
    with pytest.raises(ModelSqueezeError, match="1-D"):
        CompressedTensor("w", (4,), "float32", codebook=np.ones((2, 1), np.float32),
                         indices=np.zeros(4, np.uint8), index_bits=1)
