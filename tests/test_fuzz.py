"""Fuzzing every reader: byte flips, truncations, splices and zero-fills of real sidecars and ONNX
files (made once per session with the CLI) give either the original weights or one clear error.

Default profile: bounded and derandomized (part of `make test`). `MSQ_FUZZ_EXAMPLES=N` (`make fuzz`)
runs N examples per property with random seeds. Every failure the fuzzing found is a named
regression test at the end of this file.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from contextlib import contextmanager
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from typer.testing import CliRunner

from modelsqueeze import store
from modelsqueeze.model import model_to_bytes
from modelsqueeze.cli import app
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import graph_hash, load_model
from modelsqueeze.pack import load_pair
from modelsqueeze.sidecar import HEADER_BYTES, MAGIC, SidecarError, decode_sidecar, encode_sidecar
from modelsqueeze.tensor import CompressedTensor

from sidecar_builder import build, meta_of, split_records, with_meta

ROOT = Path(__file__).resolve().parent.parent
LENET300 = ROOT / "sample_models" / "lenet300.onnx"
LONG_EXAMPLES = int(os.environ.get("MSQ_FUZZ_EXAMPLES", "0"))
MAX_PEAK_BYTES = 200 << 20  # no single decode of a mutated or hostile file may allocate more
# Anything that decodes bigger than this came from a hostile shape; its dense form is not built here.
MAX_DENSE_BYTES = 64 << 20
runner = CliRunner()


def profile(default_examples: int, deadline_ms: int = 2000):
    """Bounded and reproducible by default; `MSQ_FUZZ_EXAMPLES` makes it long and random."""
    return settings(
        max_examples=LONG_EXAMPLES or default_examples,
        deadline=deadline_ms,
        derandomize=not LONG_EXAMPLES,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------- the corpus, made with the CLI

# name -> (command, input (a sample or an earlier output), options)
RECIPES = {
    "pruned": ("prune", LENET300, ["--sparsity", "0.9"]),  # sparse+raw, bitmap/gaps positions
    "shared": ("cluster", "pruned", ["--bits", "3"]),  # sparse+codebook
    "coded": ("huffman", "shared", []),  # huffman, huffman-gaps
    "q4block": ("quantize", LENET300, ["--bits", "4", "--granularity", "block", "--block-size", "32"]),  # quant
    "q4coded": ("huffman", "q4block", []),  # huffman zero points and codes
    "sparse_q8": ("quantize", "pruned", ["--bits", "8"]),  # sparse+quant
    "dense_shared": ("cluster", LENET300, ["--bits", "4", "--layers", "fc3*"]),  # codebook
}


class Corpus:
    """The valid files every property mutates (a plain class: hypothesis prints it by its repr)."""

    def __init__(self, folder: Path, sidecars: dict, models: dict, decoded: dict, unpacked: dict,
                 outputs: list) -> None:
        self.folder = folder
        self.outputs: list[np.ndarray] = outputs  # lenet300's outputs on 2 samples (their shapes are checked)
        self.sidecars: dict[str, bytes] = sidecars  # name -> the valid OUT.msq bytes
        self.models: dict[str, bytes] = models  # name -> valid ONNX bytes (the sample, a compressed OUT.onnx)
        self.decoded: dict[str, dict[str, np.ndarray]] = decoded  # sidecar -> record name -> dense array
        self.unpacked: dict[str, dict[str, np.ndarray]] = unpacked  # pair -> initializers of the logical model

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Corpus({self.folder})"


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    folder = Path(tempfile.mkdtemp(prefix="msq-fuzz-"))
    try:
        for name, (command, source, options) in RECIPES.items():
            src = source if isinstance(source, Path) else folder / f"{source}.onnx"
            result = invoke(command, src, "-o", folder / f"{name}.onnx", "--quiet", *options)
            assert result.exit_code == 0, (name, result.output)
        sidecars = {name: (folder / f"{name}.msq").read_bytes() for name in RECIPES}
        decoded = {name: dense_records(decode_sidecar(data)) for name, data in sidecars.items()}
        models = {"lenet300": LENET300.read_bytes(), "coded": (folder / "coded.onnx").read_bytes()}
        unpacked = {name: initializers(load_pair(folder / f"{name}.onnx").model) for name in ("coded", "q4coded")}
        unpacked["lenet300"] = initializers(load_model(LENET300))
        import onnxruntime as ort
        session = ort.InferenceSession(str(LENET300), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 784), np.float32)})
        yield Corpus(folder, sidecars, models, decoded, unpacked, outputs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def dense_records(car) -> dict[str, np.ndarray]:
    return {name: record.decode() for name, record in car.records.items()}


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: store.to_array(t) for t in model.graph.initializer}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bits (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind != "f":
        return np.array_equal(a, b)
    bits = f"u{a.dtype.itemsize}"
    return np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits))


# ---------------------------------------------------------------- mutations


@st.composite
def mutations(draw, length: int, donors: tuple[bytes, ...]):
    """(label, function bytes -> bytes): flips, a truncation, a splice from a donor file, a zero-fill.
    Offsets favour the first bytes (headers, record headers, metadata) half the time."""
    def offset(limit: int = length) -> int:
        hot = min(limit, 512)
        return draw(st.integers(0, hot - 1) | st.integers(0, max(limit - 1, 0)))

    kind = draw(st.sampled_from(["flip", "truncate", "splice", "zero", "flip+truncate"]))
    if kind == "flip":
        n = draw(st.integers(1, 4))
        flips = [(offset(), draw(st.integers(1, 255))) for _ in range(n)]

        def apply(data: bytes) -> bytes:
            out = bytearray(data)
            for at, xor in flips:
                out[at] ^= xor
            return bytes(out)

        return f"flip {flips}", apply
    if kind == "truncate":
        cut = offset()
        return f"truncate to {cut}", lambda data: data[:cut]
    if kind == "flip+truncate":
        cut, at = offset(), offset()
        return f"flip {at}, truncate to {cut}", lambda data: (data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])[:cut]
    if kind == "splice":
        donor = draw(st.sampled_from(donors))
        start = draw(st.integers(0, len(donor) - 1))
        n_bytes = draw(st.integers(1, 4096))
        at = offset()
        replace = draw(st.booleans())
        piece = donor[start : start + n_bytes]
        label = f"splice donor[{start}:{start + n_bytes}] at {at} ({'replace' if replace else 'insert'})"
        return label, lambda data: data[:at] + piece + data[at + (len(piece) if replace else 0) :]
    at = offset()
    n_bytes = draw(st.integers(1, 4096))
    return f"zero {at}..{at + n_bytes}", lambda data: data[:at] + bytes(len(data[at : at + n_bytes])) + data[at + n_bytes :]


SIDECAR_NAMES = sorted(RECIPES)


@contextmanager
def address_space_cap(extra_bytes: int = MAX_PEAK_BYTES):
    """Any allocation of more than `extra_bytes` beyond what the process maps now fails with
    MemoryError (cheap enough for every example, unlike tracemalloc)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = mapped + extra_bytes if hard == resource.RLIM_INFINITY else min(mapped + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def decode_bounded(data: bytes):
    """(sidecar, dense arrays, None) or (None, None, the error): decode_sidecar and every record's
    dense form, under the address-space cap."""
    with address_space_cap():
        try:
            car = decode_sidecar(data, source="m.msq")
            dense = {}
            for name, record in car.records.items():
                if record.n_params * np.dtype(record.dtype).itemsize <= MAX_DENSE_BYTES:
                    dense[name] = record.decode()
            return car, dense, None
        except ModelSqueezeError as exc:
            return None, None, exc


def assert_one_line(exc: Exception) -> None:
    message = str(exc)
    assert message and "\n" not in message, message


# ---------------------------------------------------------------- (a) sidecars, through decode_sidecar


@profile(150)
@given(data=st.data(), name=st.sampled_from(SIDECAR_NAMES))
def test_a_mutated_sidecar_decodes_to_the_original_weights_or_is_refused(corpus, data, name):
    original = corpus.sidecars[name]
    donors = tuple(corpus.sidecars[n] for n in SIDECAR_NAMES if n != name) + (corpus.models["coded"],)
    label, mutate = data.draw(mutations(len(original), donors), label="mutation")
    mutated = mutate(original)
    car, dense, error = decode_bounded(mutated)
    if error is not None:
        assert isinstance(error, SidecarError) and "m.msq" in str(error), label
        assert_one_line(error)
        return
    # Accepted: every record holds exactly what the original holds (the CRCs caught anything else).
    assert car.graph_hash == original[24:56], label
    assert dense.keys() == corpus.decoded[name].keys(), label
    for key, array in dense.items():
        assert same_bits(array, corpus.decoded[name][key]), (label, key)


# ---------------------------------------------------------------- (b) structure fuzz: checksums made valid again


def assert_refused_or_consistent(mutated: bytes, label: str) -> None:
    """A file whose checksums are right but whose content may be anything: a clear error, or
    records that decode to arrays of their declared shape and dtype."""
    car, dense, error = decode_bounded(mutated)
    if error is not None:
        # SidecarError from reading the file; a record's own check (its decode: scales whose
        # products overflow) is a ModelSqueezeError naming the tensor.
        assert isinstance(error, SidecarError) or "tensor " in str(error), label
        assert_one_line(error)
        return
    for name, array in dense.items():
        record = car.records[name]
        assert array.shape == record.shape and array.dtype == np.dtype(record.dtype), (label, name)


@profile(150)
@given(data=st.data(), name=st.sampled_from([n for n in SIDECAR_NAMES if n != "lowrank"]), in_meta=st.booleans())
def test_a_mutated_record_with_a_valid_checksum_is_refused_or_consistent(corpus, data, name, in_meta):
    parts = split_records(corpus.sidecars[name])
    index = data.draw(st.integers(0, len(parts) - 1), label="record")
    meta, payload = parts[index]
    target = meta if in_meta or not payload else payload
    label, mutate = data.draw(mutations(len(target), (corpus.sidecars[name],)), label="mutation")
    changed = mutate(target)
    if not payload and not in_meta:
        in_meta = True
    if in_meta:
        if len(changed) > 1 << 20:
            changed = changed[: 1 << 20]
        parts[index] = (changed, payload)
    else:
        parts[index] = (meta, changed + bytes(-len(changed) % 8))  # keep the framing aligned
    assert_refused_or_consistent(build(parts, corpus.sidecars[name][24:56]), f"record {index}: {label}")


hostile = st.one_of(
    st.integers(-(2**64), 2**64), st.sampled_from([0, 1, 7, 8, 15, 16, 17, 2**31, 2**32 - 1, 2**40, 2**62, 2**63]),
    st.booleans(), st.none(), st.floats(), st.text(max_size=4),
    st.lists(st.integers(-3, 2**41), max_size=4),
    st.sampled_from(["raw", "bitpack", "bitmap", "gaps", "huffman", "huffman-gaps", "float16", "int64", "uint8"]),
)


def set_hostile_meta(data, parts: list) -> tuple[int, object, str, object]:
    """One key of one record's metadata (its own, its quantization's or a stream's) set to a hostile
    value in `parts`, in place: (record index, where, key, value)."""
    index = data.draw(st.integers(0, len(parts) - 1), label="record")
    meta = meta_of(parts[index])
    places = [("meta", key) for key in meta] + [("quant", key) for key in meta.get("quant", {})]
    places += [(i, key) for i, stream in enumerate(meta["streams"]) for key in stream]
    where, key = data.draw(st.sampled_from(places), label="place")
    value = data.draw(hostile, label="value")
    container = meta if where == "meta" else meta["quant"] if where == "quant" else meta["streams"][where]
    container[key] = value
    parts[index] = with_meta(parts[index], meta)
    return index, where, key, value


@profile(150)
@given(data=st.data(), name=st.sampled_from(["coded", "q4coded", "q4block", "sparse_q8", "dense_shared"]))
def test_hostile_meta_values_in_real_records_are_refused_or_consistent(corpus, data, name):
    """Every key of a real record's metadata (Huffman chunk and alphabet parameters, quantization
    axis and block size included) set to a hostile value, with the checksums made valid."""
    parts = split_records(corpus.sidecars[name])
    index, where, key, value = set_hostile_meta(data, parts)
    assert_refused_or_consistent(build(parts, corpus.sidecars[name][24:56]), f"{where}.{key} = {value!r}")


@profile(100, deadline_ms=8000)
@given(data=st.data(), name=st.sampled_from(SIDECAR_NAMES))
def test_a_structurally_mutated_pair_gives_a_model_onnxruntime_runs_or_one_error(corpus, data, name):
    """Structure-aware, end to end: one key of one record's metadata (its name, shape, dtype, count,
    a stream's codec and its parameters, the quantization axis or block size) set to a hostile
    value, checksums recomputed, the sidecar put beside its own model. `load_pair` either refuses
    it in one line (under the address-space cap), or gives a model that onnx's full checker passes
    and onnxruntime loads and runs to outputs of the original's shapes."""
    import onnxruntime as ort

    parts = split_records(corpus.sidecars[name])
    index, where, key, value = set_hostile_meta(data, parts)
    path = folder_with(corpus, name, sidecar=build(parts, corpus.sidecars[name][24:56]))
    label = f"{name} record {index}: {where}.{key} = {value!r}"
    with address_space_cap():
        try:
            model = model_to_bytes(load_pair(path).runnable())
        except ModelSqueezeError as exc:
            assert_one_line(exc)
            return
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 784)).astype(np.float32)
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    assert [o.shape for o in outputs] == [o.shape for o in corpus.outputs], label


# ---------------------------------------------------------------- (c) load_pair on a folder


def folder_with(corpus: Corpus, pair: str, *, model: bytes | None = None, sidecar: bytes | None = None) -> Path:
    folder = corpus.folder / "case"
    folder.mkdir(exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    if pair == "lenet300":
        (folder / "m.onnx").write_bytes(corpus.models["lenet300"] if model is None else model)
    else:
        (folder / "m.onnx").write_bytes((corpus.folder / f"{pair}.onnx").read_bytes() if model is None else model)
        (folder / "m.msq").write_bytes(corpus.sidecars[pair] if sidecar is None else sidecar)
    return folder / "m.onnx"


@profile(80, deadline_ms=4000)
@given(data=st.data(), pair=st.sampled_from(["coded", "q4coded"]))
def test_load_pair_with_a_mutated_sidecar_gives_the_original_weights_or_one_error(corpus, data, pair):
    original = corpus.sidecars[pair]
    label, mutate = data.draw(mutations(len(original), (corpus.sidecars["shared"],)), label="mutation")
    path = folder_with(corpus, pair, sidecar=mutate(original))
    try:
        loaded = load_pair(path)
    except ModelSqueezeError as exc:
        assert_one_line(exc)
        return
    got = initializers(loaded.model)
    want = corpus.unpacked[pair]
    assert got.keys() == want.keys(), label
    assert all(same_bits(got[k], want[k]) for k in want), label


@profile(80, deadline_ms=4000)
@given(data=st.data(), which=st.sampled_from(["lenet300", "coded"]))
def test_load_pair_with_a_mutated_model_loads_or_gives_one_error(corpus, data, which):
    """ONNX has no checksum: a flipped weight byte in the graph itself cannot be detected, so the
    property is a clean load (of whatever the bytes say) or one clear error, never another exception."""
    original = corpus.models[which]
    label, mutate = data.draw(mutations(len(original), (corpus.models["lenet300"][:4096], corpus.sidecars["coded"])),
                              label="mutation")
    path = folder_with(corpus, which, model=mutate(original))
    try:
        loaded = load_pair(path)
    except ModelSqueezeError as exc:
        assert_one_line(exc)
        return
    if which == "coded":  # the sidecar's records still win over whatever the graph now says
        got = initializers(loaded.model)
        for name, array in corpus.decoded["coded"].items():
            assert same_bits(got[name], array), (label, name)


# ---------------------------------------------------------------- (d) the CLI


def assert_clean_exit(result, label: str) -> None:
    assert "Traceback" not in result.output, (label, result.output)
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (label, result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), (label, result.stderr)


@profile(30, deadline_ms=15000)
@given(data=st.data(), command=st.sampled_from(["report", "eval", "unpack"]), target=st.sampled_from(["sidecar", "model"]))
def test_the_cli_on_mutated_files_succeeds_or_prints_one_error_line(corpus, data, command, target):
    pair = "coded"
    original = corpus.sidecars[pair] if target == "sidecar" else corpus.models[pair]
    label, mutate = data.draw(mutations(len(original), (corpus.sidecars["q4coded"],)), label="mutation")
    mutated = mutate(original)
    path = folder_with(corpus, pair, **{target: mutated})
    unpacked = path.parent / "dense.onnx"
    args = {
        "report": ["report", path, "--quiet"],
        "eval": ["eval", path, "--random", "4", "--reference", LENET300, "--quiet"],
        "unpack": ["unpack", path, "-o", unpacked, "--quiet"],
    }[command]
    result = invoke(*args)
    assert_clean_exit(result, label)
    if command == "unpack" and result.exit_code == 0 and target == "sidecar":
        got = initializers(onnx.load_model(str(unpacked)))
        want = corpus.unpacked[pair]
        assert all(same_bits(got[k], want[k]) for k in want), label


# ---------------------------------------------------------------- hostile headers: refused before allocation


def hostile_sidecars(coded: bytes) -> dict[str, bytes]:
    """Valid checksums around claims of absurd sizes and counts, built from the coded sidecar."""
    parts = split_records(coded)
    graph = coded[24:56]

    def edit(index: int, change) -> bytes:
        """Record `index` changed and moved first, so no valid record is decoded before it."""
        meta = meta_of(parts[index])
        change(meta)
        return build([with_meta(parts[index], meta)] + parts[:index] + parts[index + 1 :], graph)

    def stream(role: str, **fields):
        return lambda meta: next(s for s in meta["streams"] if s["role"] == role).update(fields)

    def replace_stream(index: int, **fields):
        return lambda meta: meta["streams"].__setitem__(index, fields)

    def raw_header(offset: int, fmt: str, value: int) -> bytes:
        data = bytearray(coded)
        struct.pack_into(fmt, data, offset, value)
        struct.pack_into("<I", data, 60, zlib.crc32(data[:60]))
        return bytes(data)

    return {
        "record_count 2^32-1": build(parts, graph, count=2**32 - 1),
        "file_size 2^64-1": raw_header(16, "<Q", 2**64 - 1),
        "meta_len 2^32-1": coded[:HEADER_BYTES + 4] + struct.pack("<I", 2**32 - 1) + coded[HEADER_BYTES + 8 :],
        "payload_len 2^64-8": coded[:HEADER_BYTES + 8] + struct.pack("<Q", 2**64 - 8) + coded[HEADER_BYTES + 16 :],
        "shape product 2^80": edit(2, lambda m: m.update(shape=[2**40, 2**40])),
        "shape product overflows int64": edit(2, lambda m: m.update(shape=[2**61, 2**61, 2**61])),
        "negative dimension": edit(2, lambda m: m.update(shape=[-10, -100])),
        "dimension 2^63": edit(2, lambda m: m.update(shape=[2**63])),
        "stream count 2^62": edit(2, stream("indices", count=2**62)),
        "stream count negative": edit(2, stream("indices", count=-1)),
        "stream length 2^40": edit(2, stream("codebook", length=2**40)),
        "bitmap of 2^62 flags": edit(2, replace_stream(0, role="positions", codec="bitmap", count=100, offset=0,
                                                       length=62, size=2**62)),
        "gaps claiming 2^62 symbols": edit(2, stream("positions", symbols=2**62)),
        "huffman-gaps symbols 2^62": edit(0, stream("positions", symbols=2**62)),
        "huffman chunk 1 (3000 chunks, the table holds 1)": edit(1, stream("indices", chunk=1)),
    }


def hostile_huffman_alphabet(coded: bytes) -> bytes:
    """The coded sidecar with its first Huffman stream's alphabet size set to 2^32-1."""
    parts = split_records(coded)
    meta, payload = parts[1]
    start = next(s for s in meta_of(parts[1])["streams"] if s["role"] == "indices")["offset"]
    payload = payload[:start] + struct.pack("<I", 2**32 - 1) + payload[start + 4 :]
    return build([(meta, payload), parts[0], parts[2]], coded[24:56])  # first: nothing decoded before it


def test_hostile_headers_are_refused_within_200_mb(corpus):
    """Each claim of a huge size or count is a SidecarError, and the decode peaks under 200 MB
    (tracemalloc sees every numpy allocation)."""
    cases = hostile_sidecars(corpus.sidecars["coded"])
    cases["huffman alphabet 2^32-1"] = hostile_huffman_alphabet(corpus.sidecars["coded"])
    for label, data in cases.items():
        tracemalloc.start()
        try:
            with pytest.raises(SidecarError) as info:
                decode_sidecar(data, source="m.msq")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < MAX_PEAK_BYTES, (label, peak)
        assert_one_line(info.value)


HOSTILE_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
import json
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.sidecar import decode_sidecar
results = {}
for path in sys.argv[3:]:
    try:
        decode_sidecar(open(path, "rb").read())
        results[path] = "accepted"
    except ModelSqueezeError:
        results[path] = "refused"
    except BaseException as exc:
        results[path] = type(exc).__name__
open(sys.argv[1], "w").write(json.dumps(results))
"""


def test_hostile_headers_are_refused_in_a_process_capped_at_1_gb(corpus, tmp_path):
    """The same files in a process whose address space is capped: nothing tries a huge allocation."""
    cases = hostile_sidecars(corpus.sidecars["coded"])
    paths = []
    for i, data in enumerate(cases.values()):
        paths.append(tmp_path / f"{i}.msq")
        paths[-1].write_bytes(data)
    report = tmp_path / "report.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT, report, str(1 << 30), *map(str, paths)],
                   check=True, timeout=120, env=env)
    results = json.loads(report.read_text())
    assert {label: results[str(path)] for label, path in zip(cases, paths)} == {label: "refused" for label in cases}


# ---------------------------------------------------------------- regression tests for what the fuzzing found


def test_huffman_chunk_larger_than_the_stream_is_one_chunk_not_a_huge_allocation(corpus):
    """Found by fuzzing: a single-chunk Huffman stream whose descriptor claims chunk = 2^40 made the
    decoder allocate a (chunk, 1) table (MemoryError: 8 TiB) or loop 2^20 times (9 s). A chunk at
    least as long as the stream is one chunk: decoded exactly, at once."""
    parts = split_records(corpus.sidecars["coded"])
    meta = meta_of(parts[1])  # fc2.weight: its Huffman indices are one chunk
    indices = next(s for s in meta["streams"] if s["role"] == "indices")
    assert indices["codec"] == "huffman" and indices["chunk"] >= indices["count"]
    for chunk in (indices["count"] + 1, 2**20, 2**40):
        indices["chunk"] = chunk
        parts[1] = with_meta(parts[1], meta)
        car, dense, error = decode_bounded(build(parts, corpus.sidecars["coded"][24:56]))
        assert error is None
        assert same_bits(dense["fc2.weight"], corpus.decoded["coded"]["fc2.weight"])


def test_a_model_string_that_is_not_utf8_is_one_error_when_a_sidecar_is_beside_it(corpus):
    """Found by fuzzing: byte 4 of OUT.onnx flipped (producer_name no longer UTF-8) made load_pair
    raise UnicodeDecodeError from graph_hash; now one ModelSqueezeError, and one line in the CLI."""
    data = bytearray(corpus.models["coded"])
    data[4] ^= 0x80
    path = folder_with(corpus, "coded", model=bytes(data))
    with pytest.raises(ModelSqueezeError, match="not valid UTF-8"):
        load_pair(path)
    for args in (["report", path], ["unpack", path, "-o", path.parent / "d.onnx"]):
        assert_clean_exit(invoke(*args), "producer_name not UTF-8")
        assert invoke(*args).exit_code == 2


# ---------------------------------------------------------------- hostile ONNX models


def lenet300_with(change) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ParseFromString(LENET300.read_bytes())
    change(model)
    return model


def set_dims(name: str, dims: list[int], raw_data: bytes | None = None):
    def change(model: onnx.ModelProto) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == name)
        del tensor.dims[:]
        tensor.dims.extend(dims)
        if raw_data is not None:
            tensor.raw_data = raw_data

    return change


def float_data(count: int):
    def change(model: onnx.ModelProto) -> None:
        tensor = model.graph.initializer[4]  # fc3.weight, 10 x 100
        tensor.ClearField("raw_data")
        tensor.float_data.extend([0.5] * count)

    return change


@pytest.mark.parametrize("label, change, expected", [
    ("dims product larger than raw_data", set_dims("fc3.weight", [10, 101]), "raw_data size"),
    # Found by this test: raw_data longer than the dims passed onnx.checker, then report, prune and
    # quantize crashed with "ValueError: cannot reshape array of size 1000 into shape (10,99)".
    ("dims product smaller than raw_data", set_dims("fc3.weight", [10, 99]), "declare 3960"),
    ("absurd dims, product overflows", set_dims("fc3.weight", [2**40, 2**40]), "overflow"),
    ("absurd dims, product 2^62", set_dims("fc3.weight", [2**31, 2**31]), "shape too large"),
    ("negative dim", set_dims("fc3.weight", [-10, -100]), "Negative dimension"),
    ("float_data, too few values", float_data(7), "float_data size"),
    ("float_data, too many values", float_data(1001), "declare 1000"),
])
def test_a_tensor_whose_dims_disagree_with_its_data_is_one_error(tmp_path, label, change, expected):
    """Refused (by onnx.checker or check_tensor_sizes) before any weight is read, in every command
    and in load_pair."""
    path = tmp_path / "m.onnx"
    path.write_bytes(model_to_bytes(lenet300_with(change)))
    with pytest.raises(ModelSqueezeError, match=expected):
        load_pair(path)
    for args in (["report", path], ["prune", path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5"],
                 ["eval", path, "--random", "4", "--reference", LENET300]):
        result = invoke(*args)
        assert_clean_exit(result, label)
        assert result.exit_code == 2 and expected in result.stderr, (label, args[0], result.stderr)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def nested_if_model(depth: int) -> bytes:
    """ONNX bytes of `depth` If nodes, each in the then-branch of the one before: written as raw
    protobuf, since the protobuf library itself refuses to build such a message."""
    def value_info(name: str, elem_type: int = 1) -> bytes:  # float[1] (bool[1] for the condition)
        shape = _field(2, _field(1, _int_field(1, 1)))
        return _field(1, name.encode()) + _field(2, _field(1, _int_field(1, elem_type) + shape))

    def graph(nodes: list[bytes], name: str, outputs: list[str], inputs: tuple = ()) -> bytes:
        return (b"".join(_field(1, n) for n in nodes) + _field(2, name.encode())
                + b"".join(_field(11, value_info(*i)) for i in inputs)
                + b"".join(_field(12, value_info(o)) for o in outputs))

    def node(op: str, inputs: list[str], outputs: list[str], attributes: tuple = ()) -> bytes:
        return (b"".join(_field(1, i.encode()) for i in inputs) + b"".join(_field(2, o.encode()) for o in outputs)
                + _field(4, op.encode()) + b"".join(_field(5, a) for a in attributes))

    def graph_attribute(name: str, body: bytes) -> bytes:
        return _field(1, name.encode()) + _field(6, body) + _int_field(20, 5)  # type GRAPH

    body = graph([node("Identity", ["x"], ["y0"])], "g0", ["y0"])
    for level in range(1, depth):
        other = graph([node("Identity", ["x"], [f"e{level}"])], f"e{level}", [f"e{level}"])
        inputs = (("c", 9), ("x", 1)) if level == depth - 1 else ()
        body = graph([node("If", ["c"], [f"y{level}"], (graph_attribute("then_branch", body),
                                                        graph_attribute("else_branch", other)))],
                     f"g{level}", [f"y{level}"], inputs)
    opset = _field(8, _field(1, b"") + _int_field(2, 17))
    return _int_field(1, 8) + opset + _field(7, body)


@pytest.mark.parametrize("depth", [500, 5000])
def test_a_recursion_bomb_of_nested_subgraphs_is_one_error(tmp_path, depth):
    """Protobuf's parser stops at 100 nested messages; the message says so, not 'truncated'."""
    path = tmp_path / "deep.onnx"
    path.write_bytes(nested_if_model(depth))
    with pytest.raises(ModelSqueezeError, match="nested too deeply"):
        load_model(path)
    for args in (["report", path], ["prune", path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5"],
                 ["unpack", path, "-o", tmp_path / "u.onnx"]):
        result = invoke(*args)
        assert_clean_exit(result, f"depth {depth}")
        assert result.exit_code == 2 and "nested too deeply" in result.stderr


def test_the_deepest_parseable_nesting_loads_and_walks(tmp_path):
    """32 levels (about as deep as protobuf parses) load, walk and report without recursion trouble."""
    path = tmp_path / "deep.onnx"
    path.write_bytes(nested_if_model(32))
    load_model(path)
    assert invoke("report", path, "--quiet").exit_code == 0


# ---------------------------------------------------------------- decompression bombs (pack.py: not fixed here)


BOMB_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from typer.testing import CliRunner
from modelsqueeze.cli import app
result = CliRunner().invoke(app, sys.argv[2:])
sys.stdout.write(f"{result.exit_code}\\n{'Traceback' in result.output or result.exit_code not in (0, 2)}\\n{result.stderr}")
"""


def test_a_tiny_sidecar_claiming_a_32_gib_sparse_tensor_is_refused_not_a_memory_error(tmp_path):
    """A 376-byte sidecar beside a skeleton claims fc3.weight is 2^16 x 2^17 float32, all zeros
    (an empty gaps stream): under the 64 GiB MAX_TENSOR_BYTES of pack._check_shapes, and with no
    initializer left to compare the shape with. Every command then builds the 32 GiB dense
    tensor: MemoryError traceback (exit 1) when memory is capped, else the OOM killer."""
    model = onnx.load_model(str(LENET300))
    kept = [t for t in model.graph.initializer if t.name != "fc3.weight"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save_model(model, str(tmp_path / "s.onnx"))
    bomb = CompressedTensor("fc3.weight", (2**16, 2**17), "float32", values=np.zeros(0, np.float32),
                            positions=np.zeros(0, np.int64), stream_codecs={"positions": "gaps"})
    (tmp_path / "s.msq").write_bytes(encode_sidecar([bomb], graph_hash(model)))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for args in (["report", tmp_path / "s.onnx"], ["unpack", tmp_path / "s.onnx", "-o", tmp_path / "u.onnx"]):
        run = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(3 << 30), *map(str, args)],
                             capture_output=True, text=True, timeout=120, env=env)
        code, crashed, stderr = run.stdout.split("\n", 2)
        assert crashed == "False" and code == "2" and len(stderr.splitlines()) == 1, (args[0], run.stdout, run.stderr)


# ---------------------------------------------------------------- NaN / Inf weights (passes/*: not fixed here)


@pytest.fixture(scope="module")
def non_finite_models(corpus) -> dict[str, Path]:
    """lenet300 with NaN (or ±Inf) at four places of fc3.weight."""
    paths = {}
    for kind, value in (("nan", np.nan), ("inf", np.inf)):
        model = onnx.load_model(str(LENET300))
        w = store.to_array(model.graph.initializer[4]).copy()
        w[0, :3] = value
        w[1, 5] = -value
        model.graph.initializer[4].CopyFrom(numpy_helper.from_array(w, "fc3.weight"))
        paths[kind] = corpus.folder / f"{kind}.onnx"
        onnx.save_model(model, str(paths[kind]))
    return paths


NON_FINITE_COMMANDS = {
    "prune": ["--sparsity", "0.5"],
    "cluster": ["--bits", "3"],
    "quantize-channel": ["--bits", "8"],
    "quantize-tensor-affine": ["--granularity", "tensor", "--affine"],
    "quantize-int4-block": ["--bits", "4", "--granularity", "block", "--block-size", "32"],
    "svd": ["--rank", "4"],
}


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("command", sorted(NON_FINITE_COMMANDS))
def test_non_finite_weights_are_left_untouched_with_a_note(non_finite_models, tmp_path, kind, command):
    """Issue 11: a tensor holding NaN/Inf is left exactly as it is, with a note naming it; the other
    tensors are compressed; never a NaN codebook, never a traceback. Today: prune compresses it
    silently, cluster refuses the whole command, quantize silently replaces NaN/Inf by finite codes
    (per-tensor affine zeroes 99.6% of the tensor) with numpy RuntimeWarnings on stderr, svd
    crashes with LinAlgError."""
    source = non_finite_models[kind]
    out = tmp_path / "o.onnx"
    result = invoke(command.split("-")[0], source, "-o", out, *NON_FINITE_COMMANDS[command])
    assert "Traceback" not in result.output and "RuntimeWarning" not in result.output, result.output
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    assert "fc3.weight" in result.stderr, result.stderr  # the note
    pair = load_pair(out)
    for record in pair.records.values():
        assert record.codebook is None or np.all(np.isfinite(record.codebook))
    got = initializers(pair.model)
    want = initializers(load_model(source))
    assert same_bits(got["fc3.weight"], want["fc3.weight"])
    # the finite tensors were compressed (svd replaces a factored weight by its two factors)
    assert "fc1.weight" not in got if command == "svd" else not same_bits(got["fc1.weight"], want["fc1.weight"])
