"""The cluster command: codebooks per tensor or shared, exact bit widths, zeros kept through
prune -> cluster, native Gather form in the graph, sidecar round trip, checker + onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair
from modelsqueeze.sidecar import read_sidecar

from conftest import SAMPLES

runner = CliRunner()
LENET300 = SAMPLES / "lenet300.onnx"
LENET5 = SAMPLES / "lenet5.onnx"
MNIST = SAMPLES / "lenet300.npz"


def cli(command: str, src: Path, out: Path, *args) -> dict:
    result = runner.invoke(app, [command, str(src), "-o", str(out), *map(str, args), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def weights(path: Path) -> dict[str, np.ndarray]:
    return {w.key: w.array() for w in find_weights(load_pair(path).model)}


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_each_tensor_takes_at_most_2_to_the_bits_values(tmp_path, bits):
    out = tmp_path / "c.onnx"
    cli("cluster", LENET300, out, "--bits", bits)
    side = read_sidecar(out.with_suffix(".msq"))
    original = weights(LENET300)
    for name, w in weights(out).items():
        if not name.endswith("weight"):
            assert np.array_equal(w, original[name])
            continue
        record = side.records[name]
        assert np.unique(w).size <= 2**bits and record.index_bits == bits
        assert record.positions is None  # no zeros: no positions to store
        assert np.array_equal(record.decode(), w)  # sidecar and graph agree exactly
        # Every weight went to its nearest centroid.
        centroids = np.sort(record.codebook.astype(np.float64))
        nearest = centroids[np.abs(original[name].reshape(-1, 1).astype(np.float64) - centroids).argmin(1)]
        assert np.allclose(w.reshape(-1), nearest, atol=1e-6)
    model = onnx.load_model(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "Gather" for n in model.graph.node) == 3  # the native shared-weight form


def test_clusters_gives_ceil_log2_bits(tmp_path):
    out = tmp_path / "c.onnx"
    cli("cluster", LENET300, out, "--clusters", 7)
    side = read_sidecar(out.with_suffix(".msq"))
    assert {r.index_bits for r in side.records.values()} == {3}
    assert {r.codebook.size for r in side.records.values()} == {7}


def test_prune_then_cluster_keeps_every_zero(tmp_path):
    pruned, shared = tmp_path / "p.onnx", tmp_path / "c.onnx"
    cli("prune", LENET300, pruned, "--sparsity", 0.9)
    summary = cli("cluster", pruned, shared, "--bits", 4, "--validate", MNIST)
    before, after = weights(pruned), weights(shared)
    side = read_sidecar(shared.with_suffix(".msq"))
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.array_equal(before[name] == 0, after[name] == 0), name
        record = side.records[name]
        assert record.positions is not None  # at 90% zeros, positions + 4-bit codes is smaller
        assert np.unique(after[name][after[name] != 0]).size <= 16
    # Positions + 4-bit indices: far below the pruned-only size.
    assert summary["packed_bytes_after"] < 0.5 * summary["packed_bytes_before"]
    x = np.load(MNIST)["x"]
    accuracy = np.mean(run(shared, x).argmax(1) == np.load(MNIST)["y"])
    assert summary["accuracy_after"] == pytest.approx(accuracy)
    onnx.checker.check_model(onnx.load_model(str(shared)), full_check=True)


def test_cluster_then_prune_keeps_the_codebook(tmp_path):
    shared, pruned = tmp_path / "c.onnx", tmp_path / "p.onnx"
    cli("cluster", LENET300, shared, "--bits", 5)
    cli("prune", shared, pruned, "--sparsity", 0.8)
    side = read_sidecar(pruned.with_suffix(".msq"))
    before, after = weights(shared), weights(pruned)
    for name in ("fc1.weight", "fc2.weight"):
        record = side.records[name]
        assert record.codebook is not None and record.positions is not None
        kept = after[name] != 0
        assert np.array_equal(after[name][kept], before[name][kept])
        assert int((~kept).sum()) == round(0.8 * kept.size)


def test_shared_codebook(tmp_path):
    out = tmp_path / "s.onnx"
    cli("cluster", LENET5, out, "--bits", 4, "--scope", "shared")
    w = weights(out)
    values = [set(np.unique(w[k])) for k in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")]
    union = set().union(*values)
    assert len(union) <= 16 + 1  # one codebook (plus zero, where a tensor has zeros)


def test_per_layer_bits(tmp_path):
    out = tmp_path / "o.onnx"
    cli("cluster", LENET300, out, "--bits", "fc3*=6,3")
    side = read_sidecar(out.with_suffix(".msq"))
    assert side.records["fc3.weight"].index_bits == 6
    assert side.records["fc1.weight"].index_bits == 3


def test_unpack_and_determinism(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    cli("cluster", LENET5, a, "--bits", 3, "--init", "kmeans++", "--seed", 3)
    cli("cluster", LENET5, b, "--bits", 3, "--init", "kmeans++", "--seed", 3)
    assert a.read_bytes() == b.read_bytes() and a.with_suffix(".msq").read_bytes() == b.with_suffix(".msq").read_bytes()
    assert runner.invoke(app, ["unpack", str(a), "-o", str(tmp_path / "d.onnx")]).exit_code == 0
    x = np.load(SAMPLES / "lenet5.npz")["x"][:50]
    assert np.array_equal(run(a, x), run(tmp_path / "d.onnx", x))


def test_recurrent_and_embedding_models(tmp_path):
    for name in ("lstm_digits", "tiny_transformer"):
        out = tmp_path / f"{name}.onnx"
        summary = cli("cluster", SAMPLES / f"{name}.onnx", out, "--bits", 6, "--validate", SAMPLES / f"{name}.npz")
        assert summary["drop_pp"] < 5, (name, summary["drop_pp"])
        onnx.checker.check_model(onnx.load_model(str(out)), full_check=True)
        changed = {r["name"] for r in summary["tensors"]}
        assert changed, name
    assert {"lstm.W", "lstm.R"} <= {r["name"] for r in cli("cluster", SAMPLES / "lstm_digits.onnx", tmp_path / "l2.onnx", "--bits", 4)["tensors"]}


@pytest.mark.parametrize(
    "args, message",
    [([], "exactly one of"), (["--bits", "4", "--clusters", "8"], "exactly one of"), (["--bits", "0"], "1 to 16"),
     (["--bits", "2.5"], "whole numbers"), (["--clusters", "70000"], "1 to 65536"), (["--bits", "4", "--init", "random"], "--init"),
     (["--bits", "4", "--method", "magic"], "--method"), (["--bits", "4", "--scope", "galaxy"], "--scope"),
     (["--bits", "fc1*=3,4", "--scope", "shared"], "one --bits"), (["--bits", "4", "--layers", "zzz"], "no weight tensors")],
)
def test_bad_options(tmp_path, args, message):
    result = runner.invoke(app, ["cluster", str(LENET300), "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
