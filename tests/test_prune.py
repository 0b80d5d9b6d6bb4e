"""The prune command on real graphs: exact sparsity per layer and globally, thresholds, N:M
patterns, structured shrink equal to the masked model, compact storage, checker + onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair

from conftest import SAMPLES
from modelsqueeze.model import model_to_bytes

runner = CliRunner()


def prune_cli(src: Path, out: Path, *args) -> dict:
    result = runner.invoke(app, ["prune", str(src), "-o", str(out), *map(str, args), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def weights(path: Path) -> dict[str, np.ndarray]:
    return {w.key: w.array() for w in find_weights(load_pair(path).model)}


def run(path_or_model, feeds: dict) -> list[np.ndarray]:
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load_model(str(path_or_model))
    return ort.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"]).run(None, feeds)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


def with_weights(text: str, shapes: dict[str, tuple], seed: int = 0, positive: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A model from ONNX text plus random float initializers (`positive` ones are made > 0)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        array = rng.standard_normal(shape).astype(np.float32)
        if name in positive:
            array = np.abs(array) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    return model


LENET300 = SAMPLES / "lenet300.onnx"
MNIST = SAMPLES / "lenet300.npz"


# ---------------------------------------------------------------------------------------------
# Unstructured


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_exact_sparsity_per_layer(tmp_path, sparsity):
    out = tmp_path / "p.onnx"
    prune_cli(LENET300, out, "--sparsity", sparsity)
    original = weights(LENET300)
    for name, w in weights(out).items():
        if name.endswith("weight"):
            assert int((w == 0).sum()) == int(round(sparsity * w.size)), name
            kept = w != 0
            assert np.array_equal(w[kept], original[name][kept])  # survivors unchanged
            assert np.abs(original[name][~kept]).max() <= np.abs(original[name][kept]).min()
        else:
            assert np.array_equal(w, original[name])  # biases untouched by default


def test_exact_sparsity_global(tmp_path):
    out = tmp_path / "g.onnx"
    prune_cli(LENET300, out, "--sparsity", "0.9", "--scope", "global")
    pruned = {k: v for k, v in weights(out).items() if k.endswith("weight")}
    total = sum(w.size for w in pruned.values())
    assert sum(int((w == 0).sum()) for w in pruned.values()) == int(round(0.9 * total))
    original = weights(LENET300)
    dropped = np.concatenate([np.abs(original[k][w == 0]) for k, w in pruned.items()])
    kept = np.concatenate([np.abs(original[k][w != 0]) for k, w in pruned.items()])
    assert dropped.max() <= kept.min()
    # One threshold, different per-layer sparsities: the big first layer is pruned hardest.
    rates = {k: float(np.mean(w == 0)) for k, w in pruned.items()}
    assert len(set(round(r, 3) for r in rates.values())) > 1


def test_per_layer_overrides(tmp_path):
    out = tmp_path / "o.onnx"
    prune_cli(LENET300, out, "--sparsity", "fc1*=0.95,fc3*=0.2,0.5")
    w = weights(out)
    assert int((w["fc1.weight"] == 0).sum()) == round(0.95 * 235200)
    assert int((w["fc2.weight"] == 0).sum()) == round(0.5 * 30000)
    assert int((w["fc3.weight"] == 0).sum()) == round(0.2 * 1000)
    only = tmp_path / "only.onnx"
    prune_cli(LENET300, only, "--sparsity", "fc2=0.8")  # no default: other layers untouched
    w = weights(only)
    assert (w["fc1.weight"] == 0).sum() == 0 and (w["fc2.weight"] == 0).sum() == 24000


def test_threshold_and_std_scale(tmp_path):
    original = weights(LENET300)
    prune_cli(LENET300, tmp_path / "t.onnx", "--threshold", "0.05")
    for name, w in weights(tmp_path / "t.onnx").items():
        if name.endswith("weight"):
            assert np.array_equal(w == 0, np.abs(original[name]) < 0.05)
    prune_cli(LENET300, tmp_path / "q.onnx", "--std-scale", "0.5")
    for name, w in weights(tmp_path / "q.onnx").items():
        if name.endswith("weight"):
            limit = 0.5 * original[name].astype(np.float64).std()
            assert np.array_equal(w == 0, np.abs(original[name]) < limit)


def test_layers_exclude_min_params(tmp_path):
    prune_cli(LENET300, tmp_path / "a.onnx", "--sparsity", "0.5", "--layers", "fc2*")
    w = weights(tmp_path / "a.onnx")
    assert (w["fc1.weight"] == 0).sum() == 0 and (w["fc2.weight"] == 0).sum() == 15000
    prune_cli(LENET300, tmp_path / "b.onnx", "--sparsity", "0.5", "--exclude", "fc1*", "--min-params", "5000")
    w = weights(tmp_path / "b.onnx")
    assert (w["fc1.weight"] == 0).sum() == 0 and (w["fc3.weight"] == 0).sum() == 0
    assert (w["fc2.weight"] == 0).sum() == 15000


def test_pruned_model_is_valid_runs_and_is_compact(tmp_path):
    out = tmp_path / "p.onnx"
    summary = prune_cli(LENET300, out, "--sparsity", "0.9", "--validate", MNIST)
    model = onnx.load_model(str(out))
    onnx.checker.check_model(model, full_check=True)
    # 90% zeros: the graph carries the weights as ScatterElements of the non-zeros.
    assert any(n.op_type == "ScatterElements" for n in model.graph.node)
    assert out.stat().st_size < 0.3 * LENET300.stat().st_size
    assert summary["packed_bytes_after"] < 0.13 * summary["packed_bytes_before"]
    x = np.load(MNIST)["x"][:64]
    dense = onnx.load_model(str(LENET300))
    for tensor in dense.graph.initializer:
        w = weights(out)[tensor.name]
        tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    assert np.array_equal(run(out, {"x": x})[0], run(dense, {"x": x})[0])
    accuracy = np.mean(run(out, {"x": np.load(MNIST)["x"]})[0].argmax(1) == np.load(MNIST)["y"])
    assert summary["accuracy_after"] == pytest.approx(accuracy)
    # The stored bits per weight follow from the sparse record: far below 32.
    fc1 = next(r for r in summary["tensors"] if r["name"] == "fc1.weight")
    assert fc1["bits_per_weight"] < 4.0


def test_unpack_of_a_pruned_model_is_bit_identical(tmp_path):
    out = tmp_path / "p.onnx"
    prune_cli(LENET300, out, "--sparsity", "0.8")
    assert runner.invoke(app, ["unpack", str(out), "-o", str(tmp_path / "d.onnx")]).exit_code == 0
    x = np.load(MNIST)["x"][:100]
    assert np.array_equal(run(out, {"x": x})[0], run(tmp_path / "d.onnx", {"x": x})[0])
    assert not any(n.op_type == "ScatterElements" for n in onnx.load_model(str(tmp_path / "d.onnx")).graph.node)


def test_same_input_same_bytes(tmp_path):
    prune_cli(LENET300, tmp_path / "a.onnx", "--sparsity", "0.7", "--scope", "global")
    prune_cli(LENET300, tmp_path / "b.onnx", "--sparsity", "0.7", "--scope", "global")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.msq").read_bytes() == (tmp_path / "b.msq").read_bytes()


def test_pruning_a_pruned_model_keeps_its_zeros(tmp_path):
    prune_cli(LENET300, tmp_path / "a.onnx", "--sparsity", "0.6")
    prune_cli(tmp_path / "a.onnx", tmp_path / "b.onnx", "--sparsity", "0.8")
    first, second = weights(tmp_path / "a.onnx"), weights(tmp_path / "b.onnx")
    for name in ("fc1.weight", "fc2.weight"):
        assert np.all(second[name][first[name] == 0] == 0)
        assert int((second[name] == 0).sum()) == round(0.8 * second[name].size)


# ---------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize("model_name", ["lenet300", "lenet5"])
def test_nm_pattern_along_the_input_axis(tmp_path, model_name):
    src = SAMPLES / f"{model_name}.onnx"
    out = tmp_path / "nm.onnx"
    prune_cli(src, out, "--nm", "2:4")
    infos = {w.key: w for w in find_weights(load_pair(out).model)}
    checked = 0
    for name, info in infos.items():
        if info.role != "weight":
            continue
        w = np.moveaxis(info.array(), info.reduction_axis, -1)
        length = w.shape[-1] - w.shape[-1] % 4
        groups = (w[..., :length] != 0).reshape(*w.shape[:-1], -1, 4).sum(-1)
        assert np.all(groups <= 2), name
        checked += 1
    assert checked >= 3
    onnx.checker.check_model(onnx.load_model(str(out)), full_check=True)


# ---------------------------------------------------------------------------------------------
# Structured and --shrink


MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[batch, 12] x) => (float[batch, 5] y) {
  h1 = Gemm<transB = 1>(x, w1, b1)
  a1 = Sigmoid(h1)
  m2 = MatMul(a1, w2)
  h2 = Add(m2, b2)
  a2 = Relu(h2)
  y = Gemm(a2, w3, b3)
}
"""
MLP_SHAPES = {"w1": (10, 12), "b1": (10,), "w2": (10, 8), "b2": (8,), "w3": (8, 5), "b3": (5,)}

CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[batch, 3, 12, 12] x) => (float[batch, 4] y) {
  c1 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(x, k1, kb1)
  n1 = BatchNormalization(c1, bn_s, bn_b, bn_m, bn_v)
  r1 = Relu(n1)
  p1 = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(r1)
  c2 = Conv<kernel_shape = [3, 3]>(p1, k2, kb2)
  r2 = Tanh(c2)
  f = Flatten(r2)
  y = Gemm<transB = 1>(f, w3, b3)
}
"""
CNN_SHAPES = {"k1": (6, 3, 3, 3), "kb1": (6,), "bn_s": (6,), "bn_b": (6,), "bn_m": (6,), "bn_v": (6,),
              "k2": (5, 6, 3, 3), "kb2": (5,), "w3": (4, 5 * 4 * 4), "b3": (4,)}


@pytest.mark.parametrize(
    "text, shapes, feed_shape, structured, expect_shrunk",
    [(MLP, MLP_SHAPES, (7, 12), "rows", {"w1", "w2"}),
     (CNN, CNN_SHAPES, (3, 3, 12, 12), "channels", {"k1", "k2"})],
)
def test_shrink_equals_masked_model_and_removes_parameters(tmp_path, text, shapes, feed_shape, structured, expect_shrunk):
    src = save(with_weights(text, shapes, positive=("bn_v",)), tmp_path / "src.onnx")
    masked, shrunk = tmp_path / "masked.onnx", tmp_path / "shrunk.onnx"
    prune_cli(src, masked, "--structured", structured, "--sparsity", "0.5")
    summary = prune_cli(src, shrunk, "--structured", structured, "--sparsity", "0.5", "--shrink")
    x = np.random.default_rng(1).standard_normal(feed_shape).astype(np.float32)
    expect = run(masked, {"x": x})[0]
    got = run(shrunk, {"x": x})[0]
    assert np.allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(src, {"x": x})[0], expect)  # pruning did change something
    onnx.checker.check_model(onnx.load_model(str(shrunk)), full_check=True)
    before = {k: v.size for k, v in weights(src).items()}
    after = {k: v.size for k, v in weights(shrunk).items()}
    assert sum(after.values()) < sum(before.values())
    for name in expect_shrunk:
        assert after[name] < before[name], name
    assert sum(summary["notes"][i].startswith(tuple(expect_shrunk)) for i in range(len(summary["notes"]))) >= len(expect_shrunk)


def test_structured_removes_lowest_norm_rows(tmp_path):
    out = tmp_path / "s.onnx"
    prune_cli(LENET300, out, "--structured", "rows", "--sparsity", "0.3", "--norm", "l1", "--layers", "fc1*")
    original, w = weights(LENET300)["fc1.weight"], weights(out)["fc1.weight"]  # Gemm transB: rows are outputs
    zero_rows = np.all(w == 0, axis=1)
    assert zero_rows.sum() == 90
    norms = np.abs(original).sum(1)
    assert norms[zero_rows].max() <= norms[~zero_rows].min()
    assert np.array_equal(w[~zero_rows], original[~zero_rows])


def test_shrink_on_lenet300_keeps_masked_accuracy(tmp_path):
    masked, shrunk = tmp_path / "m.onnx", tmp_path / "s.onnx"
    a = prune_cli(LENET300, masked, "--structured", "rows", "--sparsity", "0.3", "--validate", MNIST, "--exclude", "fc3*")
    b = prune_cli(LENET300, shrunk, "--structured", "rows", "--sparsity", "0.3", "--validate", MNIST, "--exclude", "fc3*", "--shrink")
    assert a["accuracy_after"] == b["accuracy_after"]
    shapes = {k: v.shape for k, v in weights(shrunk).items()}
    assert shapes["fc1.weight"] == (210, 784) and shapes["fc2.weight"] == (70, 210) and shapes["fc3.weight"] == (10, 70)


def test_shrink_that_cannot_be_exact_leaves_the_layer_masked(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 2, 8, 8] x) => (float[batch, 3, 8, 8] y) {
      c1 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(x, k1, kb1)
      r1 = Sigmoid(c1)
      y = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(r1, k2, kb2)
    }
    """
    src = save(with_weights(text, {"k1": (4, 2, 3, 3), "kb1": (4,), "k2": (3, 4, 3, 3), "kb2": (3,)}), tmp_path / "s.onnx")
    summary = prune_cli(src, tmp_path / "o.onnx", "--structured", "channels", "--sparsity", "0.5", "--shrink", "--layers", "k1")
    assert any("masked only" in n and "pads" in n for n in summary["notes"])
    assert weights(tmp_path / "o.onnx")["k1"].shape == (4, 2, 3, 3)


# ---------------------------------------------------------------------------------------------
# Bad options: one line, exit 2, nothing written


@pytest.mark.parametrize(
    "args, message",
    [([], "exactly one of"),
     (["--sparsity", "0.5", "--threshold", "0.1"], "exactly one of"),
     (["--sparsity", "1.5"], "[0, 1]"),
     (["--sparsity", "abc"], "not a number"),
     (["--sparsity", "fc1=0.5,0.3,0.2"], "more than one default"),
     (["--threshold", "-1"], "0 or more"),
     (["--nm", "4:2"], "0 < N <= M"),
     (["--nm", "two:four"], "N:M"),
     (["--sparsity", "0.5", "--scope", "planet"], "--scope"),
     (["--structured", "diagonal", "--sparsity", "0.5"], "--structured"),
     (["--structured", "rows", "--threshold", "0.1"], "needs --sparsity"),
     (["--sparsity", "0.5", "--shrink"], "--shrink needs"),
     (["--sparsity", "0.5", "--norm", "l7"], "--norm"),
     (["--sparsity", "0.5", "--layers", "nothing*"], "no weight tensors"),
     (["--sparsity", "0.5", "--max-drop", "1"], "--validate"),
     (["--sparsity", "0.5", "--min-params", "-3"], "--min-params")],
)
def test_bad_options(tmp_path, args, message):
    out = tmp_path / "o.onnx"
    result = runner.invoke(app, ["prune", str(LENET300), "-o", str(out), *args])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_max_drop_fails_with_exit_1_and_writes_nothing(tmp_path):
    out = tmp_path / "o.onnx"
    result = runner.invoke(app, ["prune", str(LENET300), "-o", str(out), "--sparsity", "0.95",
                                 "--validate", str(MNIST), "--max-drop", "1"])
    assert result.exit_code == 1 and "--max-drop" in result.stderr and "nothing written" in result.stderr
    assert list(tmp_path.iterdir()) == []
    ok = runner.invoke(app, ["prune", str(LENET300), "-o", str(out), "--sparsity", "0.1",
                             "--validate", str(MNIST), "--max-drop", "1"])
    assert ok.exit_code == 0 and out.exists() and out.with_suffix(".msq").exists()


def test_existing_output_refused_and_input_untouched(tmp_path):
    out = tmp_path / "o.onnx"
    out.write_bytes(b"mine")
    before = LENET300.read_bytes()
    result = runner.invoke(app, ["prune", str(LENET300), "-o", str(out), "--sparsity", "0.5"])
    assert result.exit_code == 2 and "--force" in result.stderr and out.read_bytes() == b"mine"
    assert not out.with_suffix(".msq").exists()
    assert runner.invoke(app, ["prune", str(LENET300), "-o", str(out), "--sparsity", "0.5", "--force"]).exit_code == 0
    assert LENET300.read_bytes() == before
    result = runner.invoke(app, ["prune", str(out), "-o", str(out), "--sparsity", "0.6", "--force"])
    assert result.exit_code == 2 and "input" in result.stderr
