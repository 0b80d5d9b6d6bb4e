"""Edge cases found in review: the sidecar is the truth, hostile names and files, non-finite
options and outputs, unusual output layouts, --dim rules, output permissions."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.pack import write_pair
from modelsqueeze.sidecar import encode_sidecar
from modelsqueeze.tensor import CompressedTensor

from conftest import MLP_HIDDEN, MLP_IN, make_mlp
from modelsqueeze import store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # exactly one line: no blank lines around it either
    return lines[0]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def test_the_sidecar_wins_over_stale_weights_in_the_graph(tmp_path, mlp_path, mlp_data):
    """A sidecar copied beside a graph with the same nodes but other weights: every command uses
    the sidecar's weights, so report, eval and unpack agree."""
    model = make_mlp()
    zeros = CompressedTensor.raw("fc1_w", np.zeros((MLP_HIDDEN, MLP_IN), np.float32))
    out, side = write_pair(model, [zeros], tmp_path / "pair.onnx")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(mlp_path.read_bytes())  # original weights, same graph
    (stale / "m.msq").write_bytes(side.read_bytes())
    data = json.loads(invoke("eval", stale / "m.onnx", "--data", mlp_data, "--reference", out, "--json").stdout)
    assert data["fidelity"]["max_abs_error"] == 0.0
    assert invoke("unpack", stale / "m.onnx", "-o", tmp_path / "d.onnx").exit_code == 0
    dense = onnx.load_model(str(tmp_path / "d.onnx"))
    fc1 = next(t for t in dense.graph.initializer if t.name == "fc1_w")
    assert not store.to_array(fc1).any()


def test_markup_in_paths_and_names_is_printed_verbatim(tmp_path, mlp_path):
    folder = tmp_path / "runs" / "[exp1]"
    folder.mkdir(parents=True)
    line = one_error_line(invoke("report", folder / "m.onnx"))
    assert "[exp1]" in line
    line = one_error_line(invoke("report", tmp_path / "[/bold]x.onnx"))
    assert "[/bold]x.onnx" in line
    odd = folder / "m.onnx"
    odd.write_bytes(mlp_path.read_bytes())
    result = invoke("report", odd)
    assert result.exit_code == 0 and "[exp1]" in result.stdout


def test_model_with_a_non_utf8_name(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(b"fc1_w", b"fc1\xff\xfe", 1))
    line = one_error_line(invoke("report", bad))
    assert line.startswith("error: ")


def test_bad_data_files(tmp_path, mlp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((3, 4), np.float32))
    assert ".npy" in one_error_line(invoke("eval", mlp_path, "--data", npy))
    scalars = tmp_path / "scalar.npz"
    np.savez(scalars, x=np.float32(1.0), y=np.int64(0))  # a 0-d array is fed whole: here to a 2-D input
    assert "input 'x' has 2 dimensions" in one_error_line(invoke("eval", mlp_path, "--data", scalars))
    np.savez(scalars, x=np.zeros((3, MLP_IN), np.float32), y=np.int64(0))
    assert "labels 'y' are a single value" in one_error_line(invoke("eval", mlp_path, "--data", scalars))
    odd_zip = tmp_path / "odd.npz"
    with zipfile.ZipFile(odd_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    one_error_line(invoke("eval", mlp_path, "--data", odd_zip))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object), y=np.zeros(1))
    one_error_line(invoke("eval", mlp_path, "--data", pickled))
    strings = tmp_path / "strings.npz"
    np.savez(strings, x=np.zeros((2, MLP_IN), np.float32), y=np.array(["a", "b"]))
    assert "class indices" in one_error_line(invoke("eval", mlp_path, "--data", strings))
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=np.zeros((2, MLP_IN), np.float32))
    assert "no `y` labels" in one_error_line(invoke("eval", mlp_path, "--data", unlabelled))


@pytest.mark.parametrize("args", [["--max-bytes", "nan"], ["--max-bytes", "inf"], ["--max-bytes", "-5"],
                                  ["--min-ratio", "nan", "--baseline", "BASE"], ["--max-drop", "nan", "--baseline", "BASE", "--data", "DATA"]])
def test_non_finite_thresholds_are_refused(mlp_path, mlp_data, args):
    args = [str(mlp_path) if a == "BASE" else str(mlp_data) if a == "DATA" else a for a in args]
    one_error_line(invoke("report", mlp_path, *args))


def test_prune_max_drop_nan_is_refused(tmp_path, mlp_path, mlp_data):
    one_error_line(invoke("prune", mlp_path, "-o", tmp_path / "o.onnx", "--sparsity", "0.5",
                          "--validate", mlp_data, "--max-drop", "nan"))
    assert not (tmp_path / "o.onnx").exists()


def _graph_model(text: str, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in inits.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_json_has_no_nan_or_infinity(tmp_path):
    zero = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) <float[3] z = {0, 0, 0}> { y = Mul(x, z) }""", {}), tmp_path / "zero.onnx")
    noisy = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) <float[3] z = {1, 1, 1}> { y = Add(x, z) }""", {}), tmp_path / "noisy.onnx")
    result = invoke("eval", noisy, "--reference", zero, "--random", "5", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fidelity"]["snr_db"] is None  # an all-zero reference has no SNR
    nan = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) <float[3] z = {0, 0, 0}> { m = Mul(x, z)  y = Div(m, m) }""", {}), tmp_path / "nan.onnx")
    result = invoke("eval", nan, "--reference", noisy, "--random", "5", "--json")
    assert result.exit_code == 0 and "NaN" not in result.stdout
    assert json.loads(result.stdout)["fidelity"]["max_abs_error"] is None


def test_outputs_without_a_sample_axis_and_many_samples(tmp_path):
    model = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float y, float[N, 3] z) { y = ReduceSum<keepdims = 0>(x)  z = Relu(x) }""", {}), tmp_path / "s.onnx")
    result = invoke("eval", model, "--reference", model, "--random", "300", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["fidelity"]["max_abs_error"] == 0.0


def test_outputs_with_singleton_axes_and_multi_output_fidelity(tmp_path):
    model = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 1, 4] y, float[N, 4] z) <int64[3] s = {0, 1, 4}> { y = Reshape(x, s)  z = Neg(x) }""", {}),
        tmp_path / "o.onnx")
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=x.argmax(1))
    result = json.loads(invoke("eval", model, "--data", data, "--reference", model, "--json").stdout)
    assert result["accuracy"] == 1.0
    assert set(result["fidelity_per_output"]) == {"y", "z"}


def test_dim_rules(tmp_path):
    model = save(_graph_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[batch, seq, 2] x, float[batch, ?] w) => (float[batch, 2] y, float[batch] v) <int64[1] a = {1}> {
          y = ReduceSum<keepdims = 0>(x, a)
          v = ReduceSum<keepdims = 0>(w, a) }""", {}), tmp_path / "d.onnx")
    base = ["eval", model, "--reference", model, "--random", "3"]
    assert "--dim seq=N" in one_error_line(invoke(*base))
    assert "--dim w:1=N" in one_error_line(invoke(*base, "--dim", "seq=4"))
    assert invoke(*base, "--dim", "seq=4", "--dim", "w:1=7").exit_code == 0
    assert "sample count" in one_error_line(invoke(*base, "--dim", "seq=4", "--dim", "w:1=7", "--dim", "batch=5"))
    assert "no dynamic input dimension" in one_error_line(invoke(*base, "--dim", "seq=4", "--dim", "w:1=7", "--dim", "time=2"))


def test_a_sidecar_claiming_a_huge_tensor_is_refused_before_allocating(tmp_path, mlp_path):
    from modelsqueeze.model import graph_hash

    model = onnx.load_model(str(mlp_path))
    skeleton = tmp_path / "s.onnx"
    kept = [t for t in model.graph.initializer if t.name != "fc1_w"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save_model(model, str(skeleton))
    huge = CompressedTensor("fc1_w", (2**31, 2**30), "float32", values=np.zeros(0, np.float32),
                            positions=np.zeros(0, np.int64))
    (tmp_path / "s.msq").write_bytes(encode_sidecar([huge], graph_hash(model)))
    assert "refused" in one_error_line(invoke("report", skeleton))
    wrong = CompressedTensor.raw("fc2_w", np.zeros((3, 3), np.float32))  # the graph holds 8 x 3
    full = tmp_path / "f.onnx"
    full.write_bytes(mlp_path.read_bytes())
    (tmp_path / "f.msq").write_bytes(encode_sidecar([wrong], graph_hash(onnx.load_model(str(mlp_path)))))
    assert "shape" in one_error_line(invoke("report", full))


def test_outputs_get_ordinary_permissions(tmp_path, mlp_path):
    old = os.umask(0o022)
    try:
        assert invoke("prune", mlp_path, "-o", tmp_path / "p.onnx", "--sparsity", "0.5").exit_code == 0
        assert invoke("unpack", tmp_path / "p.onnx", "-o", tmp_path / "d.onnx").exit_code == 0
    finally:
        os.umask(old)
    for name in ("p.onnx", "p.msq", "d.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_unpack_reports_the_model_problem_first(tmp_path):
    assert "no such file" in one_error_line(invoke("unpack", tmp_path / "nope.onnx", "-o", tmp_path / "x.onnx"))
    empty = tmp_path / "e.onnx"
    empty.write_bytes(b"")
    assert "empty" in one_error_line(invoke("unpack", empty, "-o", tmp_path / "x.onnx"))
