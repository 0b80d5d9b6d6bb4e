"""The command line: eval, report and unpack through Typer's runner (and once as a real process),
every bad input one clear line with exit code 2, thresholds exit 1, inputs never modified."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.pack import load_pair, skeleton, write_pair
from modelsqueeze.tensor import CompressedTensor

from conftest import MLP_HIDDEN, MLP_IN, ROOT, make_mlp
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args: str) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def run_model(path_or_model, x: np.ndarray) -> np.ndarray:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load_model(str(path_or_model))
    return ort.InferenceSession(model_to_bytes(model)).run(None, {"x": x})[0]


def perturbed_mlp(path: Path, scale: float) -> Path:
    model = make_mlp()
    rng = np.random.default_rng(7)
    for tensor in model.graph.initializer:
        array = store.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(array + scale * rng.standard_normal(array.shape).astype(np.float32), tensor.name))
    onnx.save_model(model, str(path))
    return path


def clustered_pair(folder: Path) -> tuple[Path, Path]:
    """A compressed pair written through the API: fc1_w as a sparse 2-bit codebook, fc2_w raw."""
    model = make_mlp()
    fc1 = store.to_array(model.graph.initializer[0])
    positions = np.flatnonzero(np.abs(fc1.reshape(-1)) > 0.5)
    codebook = np.array([-1.0, -0.6, 0.6, 1.0], np.float32)
    values = fc1.reshape(-1)[positions]
    indices = np.abs(values[:, None] - codebook[None, :]).argmin(1).astype(np.uint8)
    records = [
        CompressedTensor("fc1_w", fc1.shape, "float32", codebook=codebook, indices=indices, index_bits=2, positions=positions),
        CompressedTensor.raw("fc2_w", store.to_array(model.graph.initializer[2])),
    ]
    return write_pair(model, records, folder / "small.onnx")


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_accuracy(mlp_path, mlp_data):
    result = ok_json("eval", mlp_path, "--data", mlp_data)
    assert result["accuracy"] == pytest.approx(0.8)
    assert result["samples"] == 50


def test_eval_fidelity_identical_and_perturbed(tmp_path, mlp_path, mlp_data):
    same = ok_json("eval", mlp_path, "--reference", mlp_path, "--data", mlp_data)["fidelity"]
    assert same == {"top1_agreement": 1.0, "max_abs_error": 0.0, "mean_abs_error": 0.0,
                    "cosine_similarity": pytest.approx(1.0), "snr_db": None}
    other = perturbed_mlp(tmp_path / "other.onnx", 0.05)
    fid = ok_json("eval", other, "--reference", mlp_path, "--data", mlp_data)["fidelity"]
    x = np.load(mlp_data)["x"]
    out, ref = run_model(other, x).astype(np.float64), run_model(mlp_path, x).astype(np.float64)
    assert fid["max_abs_error"] == pytest.approx(np.abs(out - ref).max())
    assert fid["mean_abs_error"] == pytest.approx(np.abs(out - ref).mean())
    assert fid["snr_db"] == pytest.approx(10 * np.log10((ref**2).sum() / ((out - ref) ** 2).sum()))
    assert fid["cosine_similarity"] == pytest.approx((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert fid["top1_agreement"] == pytest.approx(np.mean(out.argmax(1) == ref.argmax(1)))


def test_eval_random_inputs_and_dynamic_dims(tmp_path):
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] tokens) => (float[batch, 3] y) <float[10, 3] E = {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30}> {
          e = Gather(E, tokens)
          y = ReduceMean<axes = [1]>(e)
        }
        """
    )
    path = tmp_path / "emb.onnx"
    onnx.save_model(model, str(path))
    result = invoke("eval", path, "--reference", path, "--random", "8")
    assert result.exit_code == 2 and "--dim seq=N" in result.stderr
    data = ok_json("eval", path, "--reference", path, "--random", "8", "--dim", "seq=5")
    assert data["samples"] == 8 and data["fidelity"]["max_abs_error"] == 0.0
    assert invoke("eval", path, "--reference", path, "--dim", "seq=x").exit_code == 2


def test_eval_needs_data_or_reference(mlp_path):
    result = invoke("eval", mlp_path)
    assert result.exit_code == 2 and "--data" in result.stderr


@pytest.mark.parametrize(
    "arrays, message",
    [({"z": np.zeros((3, MLP_IN), np.float32), "y": np.zeros(3)}, "no array for input 'x'"),
     ({"x": np.zeros((3, 5), np.float32), "y": np.zeros(3)}, "wants shape"),
     ({"x": np.zeros((3, MLP_IN), np.float32), "y": np.zeros(2)}, "labels")],
)
def test_eval_bad_data(tmp_path, mlp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    result = invoke("eval", mlp_path, "--data", path)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# report


def test_report_plain_model(mlp_path):
    data = ok_json("report", mlp_path)
    names = [t["name"] for t in data["tensors"]]
    assert names == ["fc1_w", "fc1_b", "fc2_w", "fc2_b"]
    assert data["totals"]["params"] == MLP_HIDDEN * MLP_IN + MLP_HIDDEN + MLP_HIDDEN * 3 + 3
    assert data["packed_bytes"] == mlp_path.stat().st_size
    assert data["totals"]["bits_per_weight"] == 32.0
    fc1 = data["tensors"][0]
    assert (fc1["ops"], fc1["shape"], fc1["unique_values"], fc1["sparsity"]) == ("Gemm", [MLP_HIDDEN, MLP_IN], MLP_HIDDEN * MLP_IN, 0.0)


def test_report_pair_counts_skeleton_plus_sidecar(tmp_path, mlp_path):
    out, side = clustered_pair(tmp_path)
    data = ok_json("report", out, "--baseline", mlp_path)
    fc1 = data["tensors"][0]
    assert fc1["kind"] == "msq:sparse+codebook" and fc1["unique_values"] <= 5
    # the skeleton (pack.skeleton): the logical graph without the sidecar-backed initializers
    # (issue 18 makes it a file a command writes)
    pair = load_pair(out)
    bare = skeleton(pair.model, pair.records.values())
    assert not {"fc1_w", "fc2_w"} & {t.name for t in bare.graph.initializer}
    assert data["packed_bytes"] == len(model_to_bytes(bare)) + side.stat().st_size
    assert data["ratio"] == pytest.approx(mlp_path.stat().st_size / data["packed_bytes"])
    assert data["sidecar_bytes"] == side.stat().st_size


def test_report_markdown_and_table(mlp_path):
    result = invoke("report", mlp_path, "--markdown")
    assert result.exit_code == 0
    assert "| tensor | op |" in result.stdout and "| fc1_w | Gemm |" in result.stdout
    table = invoke("report", mlp_path)
    assert table.exit_code == 0 and "fc2_w" in table.stdout and "packed" in table.stdout


def test_report_thresholds_fail_with_exit_1(tmp_path, mlp_path, mlp_data):
    size = mlp_path.stat().st_size
    assert invoke("report", mlp_path, "--max-bytes", size).exit_code == 0
    result = invoke("report", mlp_path, "--max-bytes", size - 1)
    assert result.exit_code == 1 and "exceeds --max-bytes" in result.stderr
    result = invoke("report", mlp_path, "--baseline", mlp_path, "--min-ratio", "1.5")
    assert result.exit_code == 1 and "below --min-ratio" in result.stderr
    worse = perturbed_mlp(tmp_path / "worse.onnx", 1.0)
    data = json.loads(invoke("report", worse, "--baseline", mlp_path, "--data", mlp_data, "--json").stdout)
    assert data["baseline_accuracy"] == pytest.approx(0.8) and data["accuracy"] < 0.8
    drop = data["drop_pp"]
    assert invoke("report", worse, "--baseline", mlp_path, "--data", mlp_data, "--max-drop", drop + 0.01).exit_code == 0
    result = invoke("report", worse, "--baseline", mlp_path, "--data", mlp_data, "--max-drop", drop - 0.01)
    assert result.exit_code == 1 and "--max-drop" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["--min-ratio", "2"], "--baseline"), (["--max-drop", "1"], "--data"), (["--max-bytes", "lots"], "size")],
)
def test_report_threshold_usage_errors(mlp_path, args, message):
    result = invoke("report", mlp_path, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_report_max_bytes_units(mlp_path):
    assert invoke("report", mlp_path, "--max-bytes", "0.1KB").exit_code == 1  # 100 bytes
    assert invoke("report", mlp_path, "--max-bytes", "1MiB").exit_code == 0


# ---------------------------------------------------------------------------------------------
# unpack and the pair contract


def test_unpack_from_pair_and_from_skeleton_is_bit_identical(tmp_path):
    out, side = clustered_pair(tmp_path)
    x = np.random.default_rng(3).standard_normal((20, MLP_IN)).astype(np.float32)
    expect = run_model(out, x)
    assert invoke("unpack", out, "-o", tmp_path / "dense.onnx").exit_code == 0
    assert np.array_equal(run_model(tmp_path / "dense.onnx", x), expect)
    # The skeleton: OUT.onnx with the sidecar-backed initializers deleted, made with onnx alone.
    model = onnx.load_model(str(out))
    keep = [t for t in model.graph.initializer if t.name not in ("fc1_w", "fc2_w")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save_model(model, str(tmp_path / "skel.onnx"))
    (tmp_path / "skel.msq").write_bytes(side.read_bytes())
    assert invoke("unpack", tmp_path / "skel.onnx", "-o", tmp_path / "dense2.onnx").exit_code == 0
    assert np.array_equal(run_model(tmp_path / "dense2.onnx", x), expect)
    # eval and report read the skeleton + sidecar like the full graph.
    rows = {t["name"]: t for t in ok_json("report", tmp_path / "skel.onnx")["tensors"]}
    assert rows["fc1_w"]["kind"] == "msq:sparse+codebook" and rows["fc2_w"]["kind"] == "msq:raw"


def test_sidecar_of_another_graph_is_refused(tmp_path, mlp_path):
    out, side = clustered_pair(tmp_path)
    other = tmp_path / "other.onnx"
    model = make_mlp()
    model.graph.node[1].op_type = "Sigmoid"
    onnx.save_model(model, str(other))
    (tmp_path / "other.msq").write_bytes(side.read_bytes())
    result = invoke("report", other)
    assert result.exit_code == 2 and "different graph" in result.stderr


def test_unpack_needs_a_sidecar(mlp_path, tmp_path):
    result = invoke("unpack", mlp_path, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "no sidecar" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line on stderr, exit 2, nothing written, inputs untouched


def _bad_inputs(tmp_path: Path, mlp_path: Path) -> dict[str, Path]:
    cases = {"missing": tmp_path / "nope.onnx", "directory": tmp_path / "adir"}
    cases["directory"].mkdir()
    cases["empty"] = tmp_path / "empty.onnx"
    cases["empty"].write_bytes(b"")
    cases["truncated"] = tmp_path / "truncated.onnx"
    cases["truncated"].write_bytes(mlp_path.read_bytes()[: mlp_path.stat().st_size // 2])
    cases["text"] = tmp_path / "readme.onnx"
    cases["text"].write_text("# not a model\nhello\n")
    cases["png"] = tmp_path / "image.onnx"
    cases["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(make_mlp(), str(ext / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (ext / "w.bin").unlink()
    cases["external data missing"] = ext / "m.onnx"
    esc = tmp_path / "esc"
    esc.mkdir()
    onnx.save_model(make_mlp(), str(esc / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "w.bin").write_bytes((esc / "w.bin").read_bytes())
    model = onnx.load_model(str(esc / "m.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    (esc / "m.onnx").write_bytes(model_to_bytes(model))
    cases["external data escaping"] = esc / "m.onnx"
    return cases


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["report", "eval", "unpack", "prune"])
def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, mlp_path, mlp_data, command):
    cases = _bad_inputs(tmp_path, mlp_path)
    before = _digest_tree(tmp_path)
    for label, path in cases.items():
        extra = {"report": [], "eval": ["--data", mlp_data], "unpack": ["-o", tmp_path / "out.onnx"],
                 "prune": ["-o", tmp_path / "out.onnx", "--sparsity", "0.5"]}[command]
        result = invoke(command, path, *extra)
        assert result.exit_code == 2, (label, result.output, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, result.stderr)
        assert "Traceback" not in result.output
        assert "sidecar" not in lines[0], (label, lines[0])  # the model's own problem comes first
    assert _digest_tree(tmp_path) == before


def test_existing_output_is_refused_without_force(tmp_path):
    out, _ = clustered_pair(tmp_path)
    target = tmp_path / "dense.onnx"
    target.write_bytes(b"precious")
    result = invoke("unpack", out, "-o", target)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert target.read_bytes() == b"precious"
    assert invoke("unpack", out, "-o", target, "--force").exit_code == 0
    assert onnx.load_model(str(target)).graph.node


def test_write_pair_refuses_existing_sidecar_and_writes_nothing(tmp_path):
    (tmp_path / "small.msq").write_bytes(b"old sidecar")
    from modelsqueeze.errors import ModelSqueezeError

    with pytest.raises(ModelSqueezeError, match="--force"):
        clustered_pair(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.msq"]
    assert (tmp_path / "small.msq").read_bytes() == b"old sidecar"


def test_inputs_are_byte_identical_after_every_command(tmp_path, mlp_path, mlp_data):
    out, side = clustered_pair(tmp_path)
    before = _digest_tree(tmp_path)
    for args in (
        ["eval", out, "--data", mlp_data, "--reference", mlp_path],
        ["eval", out, "--reference", mlp_path, "--random", "4"],
        ["report", out, "--baseline", mlp_path, "--data", mlp_data, "--json"],
        ["report", out, "--markdown"],
        ["unpack", out, "-o", tmp_path / "dense.onnx"],
    ):
        assert invoke(*args).exit_code == 0, args
    after = _digest_tree(tmp_path)
    after.pop("dense.onnx")
    assert after == before


# ---------------------------------------------------------------------------------------------
# Help and the real process


@pytest.mark.parametrize("command", ["eval", "report", "unpack", "prune", "cluster", "quantize", "svd", "huffman"])
def test_help_shows_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "modelsqueeze " + command + " " in result.stdout


def test_runs_as_a_real_process(mlp_path, mlp_data):
    proc = subprocess.run(
        [sys.executable, "-m", "modelsqueeze", "eval", str(mlp_path), "--data", str(mlp_data), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(0.8)
    bad = subprocess.run([sys.executable, "-m", "modelsqueeze", "report", "/nonexistent.onnx"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no such file" in bad.stderr


def test_svd_through_the_cli(tmp_path):
    out = tmp_path / "low.onnx"
    result = invoke("svd", ROOT / "sample_models" / "lenet300.onnx", "-o", out, "--energy", "0.9", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["packed_bytes_after"] < 0.5 * data["packed_bytes_before"]
    assert any("rank" in note for note in data["notes"])
    onnx.checker.check_model(onnx.load_model(str(out)), full_check=True)
    bad = invoke("svd", ROOT / "sample_models" / "lenet300.onnx", "-o", tmp_path / "x.onnx", "--energy", "0.9", "--rank", "4")
    assert bad.exit_code == 2 and "exactly one of" in bad.stderr


def test_svd_factors_cluster_and_huffman_afterwards(tmp_path):
    src = ROOT / "sample_models" / "lenet300.onnx"
    for command, inp, out, args in (("svd", src, "s.onnx", ["--energy", "0.9"]), ("cluster", "s.onnx", "c.onnx", ["--bits", "5"]),
                                    ("huffman", "c.onnx", "h.onnx", [])):
        inp = inp if isinstance(inp, Path) else tmp_path / inp
        result = invoke(command, inp, "-o", tmp_path / out, *args, "--json")
        assert result.exit_code == 0, (command, result.stderr)
        names = {row["name"] for row in json.loads(result.stdout)["tensors"]}
        if command != "svd":
            assert {"fc1.weight.svd_in", "fc1.weight.svd_out"} <= names, command
    onnx.checker.check_model(onnx.load_model(str(tmp_path / "h.onnx")), full_check=True)
