"""Huffman coding: exact round trips over the hard cases, code lengths limited, size near the
Shannon limit, corrupt streams refused, and the huffman command on real pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.codecs.huffman import code_lengths, decode_symbols, encode_symbols
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair
from modelsqueeze.sidecar import decode_sidecar, encode_sidecar, read_sidecar
from modelsqueeze.tensor import CompressedTensor

from conftest import SAMPLES
from modelsqueeze import store

runner = CliRunner()


def round_trip(symbols: np.ndarray) -> bytes:
    data, chunk = encode_symbols(symbols)
    back = decode_symbols(data, symbols.size, chunk)
    assert np.array_equal(back, symbols)
    return data


def entropy_bytes(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


@pytest.mark.parametrize("symbols", [
    np.zeros(0, np.int64), np.array([0]), np.array([255]), np.full(1000, 3), np.arange(256),
    np.random.default_rng(0).integers(0, 256, 5000), np.random.default_rng(1).integers(0, 2, 70001),
    np.minimum(np.random.default_rng(2).geometric(0.5, 100000) - 1, 255),
    np.random.default_rng(3).integers(0, 65536, 3000),
], ids=["empty", "one", "one-255", "constant", "256-distinct", "uniform", "binary", "skewed", "16-bit"])
def test_round_trips(symbols):
    round_trip(symbols)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.int64, st.integers(0, 3000), elements=st.integers(0, 300)))
def test_round_trip_property(symbols):
    round_trip(symbols)


def test_millions_of_symbols_round_trip_near_the_entropy():
    rng = np.random.default_rng(4)
    symbols = np.clip(np.round(rng.laplace(16, 4, 3_000_000)), 0, 31).astype(np.int64)
    data = round_trip(symbols)
    table = 12 + 32
    assert (len(data) - table) <= 1.01 * entropy_bytes(symbols)


# Huffman spends at least one bit per symbol, so a stream dominated by one symbol (p > ~0.3) can sit
# a few percent above the limit; these draws have p_max 0.30 and 0.03 (cluster indices look so).
@pytest.mark.parametrize("seed, k", [(0, 32), (1, 256)])
def test_within_one_percent_of_the_shannon_limit_on_100k_symbols(seed, k):
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(k) * 0.7)
    symbols = rng.choice(k, size=100_000, p=probabilities)
    data = round_trip(symbols)
    table = 12 + k
    assert (len(data) - table) <= 1.01 * entropy_bytes(symbols)


def test_code_lengths_are_limited_to_16_bits_and_prefix_free():
    counts = np.array([2**i for i in range(30)])  # a Fibonacci-like skew wants ~30-bit codes
    lengths = code_lengths(counts, 16)
    assert lengths.max() == 16
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1.0
    round_trip(np.repeat(np.arange(30), np.minimum(counts, 5000)))


def test_corrupt_streams_are_refused():
    symbols = np.random.default_rng(5).integers(0, 40, 20000)
    data, chunk = encode_symbols(symbols)
    for cut in (3, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ModelSqueezeError):
            decode_symbols(data[:cut], symbols.size, chunk)
    broken = bytearray(data)
    broken[4 + 5] = 30  # a code length above 16
    with pytest.raises(ModelSqueezeError):
        decode_symbols(bytes(broken), symbols.size, chunk)
    with pytest.raises(ModelSqueezeError):
        decode_symbols(data, symbols.size + 1, chunk)


def test_huffman_streams_in_a_sidecar_round_trip():
    rng = np.random.default_rng(6)
    positions = np.sort(rng.choice(50000, 5000, replace=False))
    indices = np.minimum(rng.geometric(0.2, 5000) - 1, 31).astype(np.uint8)
    record = CompressedTensor("w", (100, 500), "float32", codebook=np.linspace(-1, 1, 32).astype(np.float32),
                              indices=indices, index_bits=5, positions=positions,
                              stream_codecs={"indices": "huffman", "positions": "huffman-gaps"})
    back = decode_sidecar(encode_sidecar([record], bytes(32))).records["w"]
    assert np.array_equal(back.decode(), record.decode())
    assert dict(back.stream_codecs) == {"indices": "huffman", "positions": "huffman-gaps"}


# ---------------------------------------------------------------------------------------------
# The command


def cli(command: str, src: Path, out: Path, *args) -> dict:
    result = runner.invoke(app, [command, str(src), "-o", str(out), *map(str, args), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def weights(path: Path) -> dict[str, np.ndarray]:
    return {w.key: w.array() for w in find_weights(load_pair(path).model)}


def test_prune_cluster_huffman_chain(tmp_path):
    p, c, h = tmp_path / "p.onnx", tmp_path / "c.onnx", tmp_path / "h.onnx"
    cli("prune", SAMPLES / "lenet5.onnx", p, "--sparsity", 0.9, "--scope", "global")
    cli("cluster", p, c, "--bits", 5)
    summary = cli("huffman", c, h, "--validate", SAMPLES / "lenet5.npz")
    assert summary["packed_bytes_after"] < 0.95 * summary["packed_bytes_before"]  # entropy coding pays
    assert summary["drop_pp"] == 0.0
    before, after = weights(c), weights(h)
    assert all(np.array_equal(before[k].view(np.uint32), after[k].view(np.uint32)) for k in before)  # lossless
    side = read_sidecar(h.with_suffix(".msq"))
    assert side.records["fc1.weight"].stream_codecs == {"indices": "huffman", "positions": "huffman-gaps"}
    onnx.checker.check_model(onnx.load_model(str(h)), full_check=True)
    report = json.loads(runner.invoke(app, ["report", str(h), "--json"]).stdout)
    fc1 = next(t for t in report["tensors"] if t["name"] == "fc1.weight")
    assert fc1["index_entropy_bits"] <= fc1["index_bits_stored"] <= 1.02 * fc1["index_entropy_bits"]
    assert runner.invoke(app, ["unpack", str(h), "-o", str(tmp_path / "d.onnx")]).exit_code == 0
    # A later step reads Huffman-coded records back and keeps every zero.
    q = tmp_path / "q.onnx"
    cli("prune", h, q, "--sparsity", 0.95, "--scope", "global")
    assert all(np.all(weights(q)[k][after[k] == 0] == 0) for k in ("conv2.weight", "fc1.weight"))


def test_quantized_codes_are_coded_too(tmp_path):
    q, h = tmp_path / "q.onnx", tmp_path / "h.onnx"
    cli("quantize", SAMPLES / "lenet300.onnx", q, "--bits", 8)
    summary = cli("huffman", q, h)
    assert summary["packed_bytes_after"] < summary["packed_bytes_before"]
    assert read_sidecar(h.with_suffix(".msq")).records["fc1.weight"].stream_codecs.get("indices") == "huffman"


def test_plain_low_cardinality_weights_become_exact_codebooks(tmp_path):
    model = onnx.load_model(str(SAMPLES / "lenet300.onnx"))
    for tensor in model.graph.initializer:
        if tensor.name == "fc2.weight":
            array = store.to_array(tensor)
            levels = np.round(array * 20) / 20  # a model quantized elsewhere
            tensor.CopyFrom(onnx.numpy_helper.from_array(levels.astype(np.float32), tensor.name))
    src = tmp_path / "levels.onnx"
    onnx.save_model(model, str(src))
    summary = cli("huffman", src, tmp_path / "h.onnx")
    assert [r["name"] for r in summary["tensors"]] == ["fc2.weight"]
    assert any("distinct values" in n for n in summary["notes"])  # fc1/fc3 are left alone
    assert np.array_equal(weights(tmp_path / "h.onnx")["fc2.weight"], weights(src)["fc2.weight"])
