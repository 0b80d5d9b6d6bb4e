"""Hardening (issue 22): an output never leaves stale companions of an older output beside it,
crafted sidecars never allocate what the graph does not need, and the sidecar beside a model is
read only when it is a regular file of the size its header declares."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import modelsqueeze.model
from modelsqueeze import store
from modelsqueeze.model import graph_hash, load_model
from modelsqueeze.pack import load_pair
from modelsqueeze.sidecar import read_sidecar

from cli_helpers import invoke, ok, refused


def _plain_weights(path) -> dict[str, np.ndarray]:
    """The initializers of a model file as onnxruntime would see them (no sidecar involved)."""
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# --- 1. a stale sidecar never serves old weights -------------------------------------------------

def test_unpack_over_a_pair_removes_its_sidecar(tmp_path, mlp_path):
    """The reproduction: Y is a pruned pair whose graph hash equals the plain graph's (the dense form
    keeps the graph); unpacking another pair over Y used to leave Y.msq beside the new plain model,
    and every command then read the old pruned weights from it."""
    y, x = tmp_path / "Y.onnx", tmp_path / "X.onnx"
    ok("prune", mlp_path, "-o", y, "--sparsity", "0.5")
    ok("cluster", mlp_path, "-o", x, "--bits", "2")
    assert read_sidecar(tmp_path / "Y.msq").graph_hash == graph_hash(load_model(mlp_path))  # the dangerous case
    invoke_ok = invoke("unpack", x, "-o", y, "--force", "--quiet")
    assert invoke_ok.exit_code == 0, invoke_ok.output
    assert not (tmp_path / "Y.msq").exists()
    pair = load_pair(y)
    assert pair.sidecar is None
    logical = {t.name: store.to_array(t) for t in pair.model.graph.initializer}
    on_disk = _plain_weights(y)
    assert logical.keys() == on_disk.keys()
    for name, value in on_disk.items():
        np.testing.assert_array_equal(logical[name], value)
    report = ok("report", y)
    assert report["sidecar"] is None
    assert all(t["sparsity"] == 0.0 for t in report["tensors"])  # the pruned sidecar said 50%


def test_unpack_without_force_refuses_an_existing_sidecar_and_keeps_it(tmp_path, mlp_path):
    y, x = tmp_path / "Y.onnx", tmp_path / "X.onnx"
    ok("cluster", mlp_path, "-o", x, "--bits", "2")
    (tmp_path / "Y.msq").write_bytes(b"somebody's file")
    line = refused("unpack", x, "-o", y)
    assert "Y.msq" in line and "--force" in line
    assert (tmp_path / "Y.msq").read_bytes() == b"somebody's file"
    assert not y.exists()


def test_a_small_output_over_a_huge_one_removes_its_external_data(tmp_path, mlp_path, monkeypatch):
    """An output written with external data (protobuf limit lowered), then overwritten by one that
    fits in one file: the old OUT.onnx.data goes too, for unpack and for a transforming command."""
    x, u = tmp_path / "X.onnx", tmp_path / "U.onnx"
    ok("cluster", mlp_path, "-o", x, "--bits", "2")
    for command in (["unpack", x], ["prune", mlp_path, "--sparsity", "0.5"]):
        with monkeypatch.context() as mp:
            mp.setattr(modelsqueeze.model.save_model, "__defaults__", (100, 16))
            result = invoke("unpack", x, "-o", u, "--force", "--quiet")
            assert result.exit_code == 0, result.output
        assert (tmp_path / "U.onnx.data").exists()
        result = invoke(*command, "-o", u, "--force", "--quiet")
        assert result.exit_code == 0, result.output
        assert not (tmp_path / "U.onnx.data").exists(), command
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(u)).graph.initializer)
        load_pair(u)  # loads and checks


def test_an_existing_data_file_is_refused_without_force(tmp_path, mlp_path):
    """OUT.onnx.data belongs to the output OUT.onnx: writing the output replaces or removes it, so it
    is refused like OUT.onnx and OUT.msq when it exists and --force is not given."""
    data = tmp_path / "U.onnx.data"
    data.write_bytes(b"keep me")
    for args in (["prune", mlp_path, "--sparsity", "0.5"], ["pipeline", mlp_path, "--bits", "2"]):
        line = refused(*args, "-o", tmp_path / "U.onnx")
        assert "U.onnx.data" in line and "--force" in line
    assert data.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["U.onnx.data", "mlp.onnx"]
