"""Calibration capture: the layer view's matrix round trip, input rows that reproduce onnxruntime's
MatMul / Gemm / Conv outputs, Gram matrices H (and the paired cross term C) against direct
computation on the sample models, batching, the bounded row sample, refusals and bad data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from modelsqueeze.calibrate import LayerView, capture, capture_pair, layer_view, load_calibration, rows
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import find_weights

from conftest import MLP_HIDDEN, MLP_IN, SAMPLES
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def build(text: str, arrays: dict[str, np.ndarray], dtype=np.float32) -> onnx.ModelProto:
    model = onnx.parser.parse_model(HEADER + text)
    for name, array in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array, dtype), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """onnxruntime outputs; `outputs` names intermediate tensors to expose instead of the graph's."""
    if outputs is not None:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        del copy.graph.output[:]
        copy.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs)
        model = copy
    session = ort.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def view_of(model: onnx.ModelProto, key: str) -> LayerView:
    view = layer_view(model, next(w for w in find_weights(model) if w.key == key))
    assert isinstance(view, LayerView), view
    return view


def weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(store.to_array(t) for t in model.graph.initializer if t.name == name)


def gram(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    x = x.astype(np.float64)
    return x.T @ (x if y is None else y.astype(np.float64))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def lenet5():
    return onnx.load(str(SAMPLES / "lenet5.onnx")), load_calibration(SAMPLES / "lenet5_calib.npz")


@pytest.fixture(scope="module")
def lenet300():
    return onnx.load(str(SAMPLES / "lenet300.onnx")), load_calibration(SAMPLES / "lenet300_calib.npz")


# ----------------------------------------------------------------------------------------------
# The matrix view


@settings(max_examples=60, deadline=None)
@given(layer=st.sampled_from([("MatMul", False), ("Gemm", False), ("Gemm", True), ("Conv", False)]),
       dims=st.lists(st.integers(1, 5), min_size=3, max_size=5), seed=st.integers(0, 2**16))
def test_to_from_matrix_round_trip_is_bit_exact(layer, dims, seed):
    op, trans_b = layer
    shape = tuple(dims) if op == "Conv" else tuple(dims[:2])
    spatial = len(shape) - 2
    conv = dict(kernel_shape=shape[2:], strides=(1,) * spatial, pads=(0,) * 2 * spatial,
                dilations=(1,) * spatial) if op == "Conv" else {}
    view = LayerView(key="w", op=op, node_name="n", activation="x", weight_shape=shape, trans_b=trans_b, **conv)
    array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    matrix = view.to_matrix(array)
    assert matrix.shape == view.matrix_shape and matrix.flags.c_contiguous
    back = view.from_matrix(matrix)
    assert back.dtype == array.dtype and back.tobytes() == array.tobytes()
    assert not np.shares_memory(matrix, array) and not np.shares_memory(back, matrix)


def test_matrix_orientation():
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert np.array_equal(LayerView("w", "MatMul", "n", "x", (4, 6)).to_matrix(w), w)
    assert np.array_equal(LayerView("w", "Gemm", "n", "x", (4, 6), trans_b=True).to_matrix(w), w.T)
    conv = LayerView("w", "Conv", "n", "x", (2, 3, 2, 2), kernel_shape=(2, 2), strides=(1, 1),
                     pads=(0,) * 4, dilations=(1, 1))
    k = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    assert conv.matrix_shape == (12, 2)
    assert np.array_equal(conv.to_matrix(k)[:, 1], k[1].ravel())  # column m is filter m in (c, i, j) order
    with pytest.raises(ValueError):
        conv.from_matrix(np.zeros((2, 12)))


# ----------------------------------------------------------------------------------------------
# Rows times W reproduces onnxruntime


@pytest.mark.parametrize("x_shape", [(7, 6), (2, 5, 6), (6,)])
def test_rows_matmul(x_shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    dims = ", ".join(f"d{i}" for i in range(len(x_shape)))
    out = ", ".join(f"e{i}" for i in range(len(x_shape)))
    model = build(f"g (float[{dims}] x) => (float[{out}] y) {{ y = MatMul(x, w) }}", {"w": w})
    x = rng.standard_normal(x_shape).astype(np.float32)
    (y,) = run(model, {"x": x})
    view = view_of(model, "w")
    assert (view.op, view.activation, view.matrix_shape) == ("MatMul", "x", (6, 4))
    assert relative(rows(view, x) @ view.to_matrix(w), y.reshape(-1, 4)) < 1e-4


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_rows_gemm(trans_a, trans_b):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    a = rng.standard_normal((6, 9) if trans_a else (9, 6)).astype(np.float32)
    model = build(f"g (float[p, q] a) => (float[m, n] y) {{ y = Gemm<transA = {trans_a}, transB = {trans_b}, "
                  f"alpha = 2.5>(a, w) }}", {"w": w})
    (y,) = run(model, {"a": a})
    view = view_of(model, "w")
    assert (view.trans_a, view.trans_b, view.alpha, view.matrix_shape) == (bool(trans_a), bool(trans_b), 2.5, (6, 5))
    assert relative(view.alpha * rows(view, a) @ view.to_matrix(w), y) < 1e-4


CONVS = [  # weight shape, attributes, input shape
    ((4, 3, 3, 3), "", (2, 3, 9, 8)),
    ((4, 3, 3, 2), "strides = [2, 1], pads = [1, 0, 2, 1], dilations = [2, 1]", (2, 3, 11, 10)),
    ((5, 2, 2, 3), "strides = [2, 2], pads = [1, 1, 1, 1], dilations = [2, 2], kernel_shape = [2, 3]", (3, 2, 12, 9)),
    ((4, 3, 3, 3), 'strides = [2, 3], auto_pad = "VALID"', (1, 3, 10, 11)),
    ((4, 3, 3), "strides = [2], pads = [1, 2], dilations = [2]", (2, 3, 15)),
    ((2, 2, 2, 3, 2), "strides = [1, 2, 1], pads = [0, 1, 0, 1, 1, 0]", (2, 2, 4, 6, 5)),
]


@pytest.mark.parametrize("w_shape,attrs,x_shape", CONVS)
def test_rows_conv(w_shape, attrs, x_shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    rank = len(x_shape)
    dims = ", ".join(f"d{i}" for i in range(rank))
    out = ", ".join(f"e{i}" for i in range(rank))
    op = f"Conv<{attrs}>" if attrs else "Conv"
    model = build(f"g (float[{dims}] x) => (float[{out}] y) {{ y = {op}(x, w) }}", {"w": w})
    (y,) = run(model, {"x": x})
    view = view_of(model, "w")
    expected = np.moveaxis(y, 1, -1).reshape(-1, w_shape[0])  # one row per sample and output position
    got = rows(view, x) @ view.to_matrix(w)
    assert got.shape == expected.shape
    assert relative(got, expected) < 1e-4


def test_rows_refuses_a_wrong_shape():
    view = LayerView("w", "MatMul", "n", "x", (6, 4))
    with pytest.raises(ModelSqueezeError, match="expected 6 features"):
        rows(view, np.zeros((3, 5), np.float32))


# ----------------------------------------------------------------------------------------------
# Layers that cannot be calibrated


@pytest.mark.parametrize("text,arrays,key,reason", [
    ("g (float[N, 4, 6, 6] x) => (float[N, 4, 4, 4] y) { y = Conv<group = 2>(x, w) }",
     {"w": np.ones((4, 2, 3, 3))}, "w", "grouped Conv"),
    ("g (float[N, 4] x) => (float[N, 4] y) { a = MatMul(x, w)\n b = MatMul(x, w)\n y = Add(a, b) }",
     {"w": np.ones((4, 4))}, "w", "read by 2 nodes (shared weight)"),
    ("g (float[4, N] x) => (float[3, N] y) { y = MatMul(w, x) }", {"w": np.ones((3, 4))}, "w", "left operand"),
    ("g (float[4, N] x) => (float[3, N] y) { y = Gemm(w, x) }", {"w": np.ones((3, 4))}, "w", "left operand"),
    ("g (float[N, 4] x) => (float[N, 3] y) { y = Gemm(x, w, b) }", {"w": np.ones((4, 3)), "b": np.ones(3)}, "b",
     "input 2 of its Gemm"),
    ("g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) { y = Conv<auto_pad = \"SAME_UPPER\">(x, w) }",
     {"w": np.ones((4, 3, 3, 3))}, "w", "auto_pad=SAME_UPPER"),
    ("g (float[2, 3, 4] x) => (float[2, 3, 5] y) { y = MatMul(x, w) }", {"w": np.ones((2, 4, 5))}, "w", "3-D MatMul"),
    ("g (float[N, 4] x) => (float[N, 4] y) { y = Mul(x, w) }", {"w": np.ones(4)}, "w", "is a Mul input"),
    ("g (float[3, 4] x) => (float[4, 5] y) { y = MatMul(c, w) }", {"c": np.ones((4, 4)), "w": np.ones((4, 5))}, "w",
     "multiplies a constant"),
])
def test_unsupported_layers_say_why(text, arrays, key, reason):
    model = build(text, arrays)
    found = layer_view(model, next(w for w in find_weights(model) if w.key == key))
    assert isinstance(found, str) and reason in found


def test_float64_weight_is_refused():
    model = build("g (double[N, 4] x) => (double[N, 3] y) { y = MatMul(x, w) }", {"w": np.ones((4, 3))}, np.float64)
    found = layer_view(model, find_weights(model)[0])
    assert isinstance(found, str) and "float64, not float32" in found


# ----------------------------------------------------------------------------------------------
# Capture on the sample models


def test_capture_lenet5_equals_direct_gram(lenet5):
    model, data = lenet5
    x = data["x"][:400]
    views = [view_of(model, k) for k in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight")]
    stats = capture(model, {"x": x}, views, max_rows=1000)
    pool1, flatten, relu3 = run(model, {"x": x}, ["pool1", "flatten", "relu3"])
    for view, activation in zip(views, (x, pool1, flatten, relu3)):
        direct = rows(view, activation)
        got = stats[view.key]
        assert got.rows == direct.shape[0] and got.H.dtype == np.float64 and got.C is None
        assert np.allclose(got.H, gram(direct), rtol=1e-6, atol=1e-6 * np.abs(got.H).max())
        assert got.sample.dtype == np.float32 and got.sample.shape == (min(1000, direct.shape[0]), direct.shape[1])
    assert stats["conv2.weight"].rows == 400 * 8 * 8 and stats["conv2.weight"].H.shape == (500, 500)
    assert stats["fc1.weight"].H.shape == (800, 800)


def test_capture_lenet300_fc1_reads_the_graph_input(lenet300):
    model, data = lenet300
    view = view_of(model, "fc1.weight")
    stats = capture(model, data, [view], max_rows=0)
    direct = data["x"].astype(np.float64)
    assert stats["fc1.weight"].rows == 2000 and stats["fc1.weight"].sample is None
    assert np.allclose(stats["fc1.weight"].H, direct.T @ direct, rtol=1e-6, atol=1e-9)


def test_batching_changes_nothing_but_rounding(lenet5):
    model, data = lenet5
    x = {"x": data["x"][:120]}
    views = [view_of(model, k) for k in ("conv2.weight", "fc1.weight")]
    done = []
    small = capture(model, x, views, max_rows=300, batch_size=7, progress=done.append)
    large = capture(model, x, views, max_rows=300, batch_size=256)
    assert sum(done) == 120 and len(done) == 18
    for key in small:
        assert small[key].rows == large[key].rows
        assert np.allclose(small[key].H, large[key].H, rtol=1e-9, atol=1e-9 * np.abs(large[key].H).max())
        # Keys are drawn in row order from one stream, so the sample does not depend on the batches.
        assert np.array_equal(small[key].sample, large[key].sample)


# ----------------------------------------------------------------------------------------------
# The row sample

INDEXED = "g (float[N, 2] x) => (float[N, 3] y) { y = MatMul(x, w) }"


def indexed_capture(n: int, max_rows: int, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """The sample of a MatMul whose input row i starts with i (so a sampled row names itself)."""
    model = build(INDEXED, {"w": np.ones((2, 3))})
    x = np.stack([np.arange(n), np.ones(n)], axis=1).astype(np.float32)
    stats = capture(model, {"x": x}, [view_of(model, "w")], max_rows=max_rows, seed=seed, batch_size=batch_size)
    return stats["w"].sample[:, 0].astype(np.int64)


def test_sample_is_uniform_bounded_and_deterministic():
    picked = indexed_capture(5000, 500)
    assert picked.shape == (500,) and np.all(np.diff(picked) > 0)  # distinct rows, in stream order
    assert abs(picked.mean() - 2499.5) < 250  # ~4 standard deviations of a uniform draw
    assert abs(np.mean(picked < 2500) - 0.5) < 0.1
    assert np.array_equal(picked, indexed_capture(5000, 500))
    assert np.array_equal(picked, indexed_capture(5000, 500, batch_size=999))
    assert not np.array_equal(picked, indexed_capture(5000, 500, seed=1))


def test_sample_keeps_every_row_when_there_are_few():
    assert np.array_equal(indexed_capture(30, 100), np.arange(30))


def test_sample_rows_are_real_rows(lenet300):
    model, data = lenet300
    x = data["x"][:300]
    view = view_of(model, "fc2.weight")
    sample = capture(model, {"x": x}, [view], max_rows=50, seed=3)["fc2.weight"].sample
    (relu1,) = run(model, {"x": x}, ["relu1"])
    seen = {row.tobytes() for row in relu1}
    assert sample.shape == (50, 300) and all(row.tobytes() in seen for row in sample)


def test_layers_sharing_an_input_get_their_own_arrays():
    rng = np.random.default_rng(4)
    text = ("g (float[N, 4] x) => (float[N, 3] y) { a = MatMul(x, wq)\n b = Gemm<transB = 1>(x, wk)\n"
            " y = Add(a, b) }")
    model = build(text, {"wq": rng.standard_normal((4, 3)), "wk": rng.standard_normal((3, 4))})
    x = rng.standard_normal((20, 4)).astype(np.float32)
    stats = capture(model, {"x": x}, [view_of(model, "wq"), view_of(model, "wk")], max_rows=5)
    assert np.array_equal(stats["wq"].H, stats["wk"].H) and np.allclose(stats["wq"].H, gram(x), rtol=1e-6)
    assert not np.shares_memory(stats["wq"].H, stats["wk"].H)
    assert not np.shares_memory(stats["wq"].sample, stats["wk"].sample)


def test_fixed_batch_of_one_is_fed_sample_by_sample():
    rng = np.random.default_rng(5)
    model = build("g (float[1, 4] x) => (float[1, 3] y) { h = Relu(x)\n y = MatMul(h, w) }",
                  {"w": rng.standard_normal((4, 3))})
    x = rng.standard_normal((9, 4)).astype(np.float32)
    stats = capture(model, {"x": x}, [view_of(model, "w")], batch_size=4)
    assert stats["w"].rows == 9 and np.allclose(stats["w"].H, gram(np.maximum(x, 0)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Paired capture (sequential calibration)


def test_capture_pair_of_identical_models_gives_c_equal_h(lenet5):
    model, data = lenet5
    x = {"x": data["x"][:100]}
    views = [view_of(model, k) for k in ("conv2.weight", "fc2.weight")]
    pair = capture_pair(model, model, x, views, batch_size=32)
    single = capture(model, x, views)
    for key, got in pair.items():
        assert got.sample is None and got.rows == single[key].rows
        assert np.allclose(got.C, got.H, rtol=1e-9, atol=1e-9 * np.abs(got.H).max())
        assert np.allclose(got.H, single[key].H, rtol=1e-9, atol=1e-9 * np.abs(got.H).max())


def test_capture_pair_needs_the_activation_in_both_models(mlp):
    current = onnx.ModelProto()
    current.CopyFrom(mlp)
    for node in current.graph.node:
        node.input[:] = ["r2" if name == "r" else name for name in node.input]
        node.output[:] = ["r2" if name == "r" else name for name in node.output]
    x = {"x": np.zeros((2, 4), np.float32)}
    with pytest.raises(ModelSqueezeError, match="current model.*no node of the main graph produces 'r'"):
        capture_pair(mlp, current, x, [view_of(mlp, "fc2_w")])


def test_capture_pair_cross_term_and_refit(lenet300):
    reference, data = lenet300
    x = data["x"][:500]
    current = onnx.ModelProto()
    current.CopyFrom(reference)
    w1 = next(t for t in current.graph.initializer if t.name == "fc1.weight")
    noisy = store.to_array(w1) + np.random.default_rng(6).normal(0, 0.02, tuple(w1.dims)).astype(np.float32)
    w1.CopyFrom(numpy_helper.from_array(noisy, "fc1.weight"))
    view = view_of(reference, "fc2.weight")
    got = capture_pair(reference, current, {"x": x}, [view])["fc2.weight"]
    (xr,) = run(reference, {"x": x}, ["relu1"])
    (xq,) = run(current, {"x": x}, ["relu1"])
    scale = np.abs(gram(xq)).max()
    assert np.allclose(got.H, gram(xq), rtol=1e-6, atol=1e-6 * scale)
    assert np.allclose(got.C, gram(xq, xr), rtol=1e-6, atol=1e-6 * scale)
    assert not np.allclose(got.C, got.H, rtol=1e-3)
    # The re-fit W' = H⁻¹ C W brings the current layer's outputs closer to the reference's.
    w = view.to_matrix(weight(reference, "fc2.weight")).astype(np.float64)
    refit = np.linalg.solve(got.H + 1e-6 * np.eye(len(got.H)) * np.trace(got.H) / len(got.H), got.C @ w)
    target = xr @ w
    assert np.linalg.norm(xq @ refit - target) < 0.9 * np.linalg.norm(xq @ w - target)


# ----------------------------------------------------------------------------------------------
# Data


def test_load_calibration_drops_labels_and_names_the_path(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.zeros((3, 4), np.float32), y=np.arange(3))
    assert set(load_calibration(path)) == {"x"}
    with pytest.raises(ModelSqueezeError, match="missing.npz: no such file"):
        load_calibration(tmp_path / "missing.npz")
    only = tmp_path / "only.npz"
    np.savez(only, y=np.arange(3))
    with pytest.raises(ModelSqueezeError, match="only.npz: no input arrays"):
        load_calibration(only)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelSqueezeError, match="bad.npz: not a readable"):
        load_calibration(bad)


@pytest.mark.parametrize("arrays,message", [
    ({"z": np.zeros((3, 4), np.float32)}, r"calib.npz: no array for input 'x' \(arrays: z\)"),
    ({"x": np.zeros((3, 5), np.float32)}, r"input 'x' wants shape \[batch, 16\]"),
    ({"x": np.zeros((3, 4), np.complex64)}, "wants float32, data is complex64"),
    ({"x": np.zeros((0, MLP_IN), np.float32)}, "calib.npz: no samples"),
])
def test_data_that_does_not_fit_the_model(mlp, arrays, message):
    views = [view_of(mlp, "fc1_w")]
    with pytest.raises(ModelSqueezeError, match=message):
        capture(mlp, arrays, views, source="calib.npz")


def test_labels_in_the_arrays_are_ignored(mlp):
    x = np.random.default_rng(7).standard_normal((10, MLP_IN)).astype(np.float32)
    stats = capture(mlp, {"x": x, "y": np.arange(10)}, [view_of(mlp, "fc1_w"), view_of(mlp, "fc2_w")])
    assert np.allclose(stats["fc1_w"].H, gram(x), rtol=1e-6)
    assert stats["fc2_w"].H.shape == (MLP_HIDDEN, MLP_HIDDEN) and stats["fc2_w"].rows == 10
