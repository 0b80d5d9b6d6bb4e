"""Model I/O: loading refuses bad files with one clear error, external data stays in its folder,
weights are found from the graph with the right layout, saving is atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import (
    check_output,
    find_weights,
    graph_hash,
    load_model,
    save_model,
    select_weights,
)

from modelsqueeze.pack import put_array

from conftest import MLP_HIDDEN, MLP_IN, make_mlp
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes


def weights_by_name(model):
    return {w.key: w for w in find_weights(model)}


# ---------------------------------------------------------------------------------------------
# Finding weights and their layout


def test_mlp_roles_and_axes(mlp):
    w = weights_by_name(mlp)
    assert (w["fc1_w"].role, w["fc1_w"].channel_axis, w["fc1_w"].reduction_axis) == ("weight", 0, 1)  # transB
    assert (w["fc2_w"].role, w["fc2_w"].channel_axis, w["fc2_w"].reduction_axis) == ("weight", 1, 0)  # MatMul B
    assert w["fc1_b"].role == "bias"
    assert w["fc2_b"].role == "other"  # an Add operand is not known to be a bias
    assert [c.op for c in w["fc1_w"].consumers] == ["Gemm"]


@pytest.mark.parametrize(
    "node_text, shapes, expect",
    [
        ("y = Conv(x, W, B)", {"W": (6, 2, 3, 3), "B": (6,)}, {"W": ("weight", 0, 1), "B": ("bias", 0, None)}),
        ("y = Conv<group = 2>(x, W)", {"W": (6, 1, 3, 3)}, {"W": ("weight", 0, 1)}),
        ("y = ConvTranspose(x, W, B)", {"W": (2, 5, 3, 3), "B": (5,)}, {"W": ("weight", 1, 0), "B": ("bias", 0, None)}),
        ("y = Gemm(x, W, C)", {"W": (4, 7), "C": (7,)}, {"W": ("weight", 1, 0), "C": ("bias", 0, None)}),
        ("y = Gemm<transB = 1>(x, W)", {"W": (7, 4)}, {"W": ("weight", 0, 1)}),
        ("y = MatMul(x, W)", {"W": (4, 7)}, {"W": ("weight", 1, 0)}),
        ("y = MatMul(W, x)", {"W": (7, 4)}, {"W": ("weight", 0, 1)}),
        ("y = Gather(W, i)", {"W": (10, 4)}, {"W": ("embedding", 0, None)}),
        ("y = Gather<axis = 1>(W, i)", {"W": (10, 4)}, {"W": ("other", None, None)}),
        ("y, h = GRU<hidden_size = 5>(x, W, R, B)", {"W": (1, 15, 4), "R": (1, 15, 5), "B": (1, 30)},
         {"W": ("weight", 1, 2), "R": ("weight", 1, 2), "B": ("bias", 1, None)}),
        ("y, h, c = LSTM<hidden_size = 5>(x, W, R, B)", {"W": (1, 20, 4), "R": (1, 20, 5), "B": (1, 40)},
         {"W": ("weight", 1, 2), "R": ("weight", 1, 2), "B": ("bias", 1, None)}),
        ("y, h = RNN<hidden_size = 5>(x, W, R)", {"W": (1, 5, 4), "R": (1, 5, 5)},
         {"W": ("weight", 1, 2), "R": ("weight", 1, 2)}),
    ],
)
def test_layout_per_consumer_op(node_text, shapes, expect):
    inits = [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in shapes.items()]
    names = set(shapes)
    inputs = [name for name in ("x", "i") if name in node_text.split("(", 1)[1]]
    outputs = [o.strip() for o in node_text.split("=")[0].split(",")]
    node = onnx.parser.parse_node(node_text)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.INT64 if n == "i" else onnx.TensorProto.FLOAT, None)
         for n in inputs if n not in names],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    found = weights_by_name(model)
    for name, (role, channel, reduction) in expect.items():
        assert (found[name].role, found[name].channel_axis, found[name].reduction_axis) == (role, channel, reduction), name


def test_graph_hash_is_the_model_without_any_initializer():
    """graph_hash avoids copying the weights; it must equal the definition in docs/FORMAT.md: SHA-256
    of the model serialized (deterministic) with every graph's initializers removed, subgraphs too."""
    import hashlib

    from modelsqueeze.model import graph_hash, iter_graphs

    model = onnx.parser.parse_model(SUBGRAPH_TEXT)
    model.doc_string, model.producer_name = "doc", "me"
    model.metadata_props.add(key="k", value="v")
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for _, graph in iter_graphs(bare.graph):
        graph.ClearField("initializer")
        graph.ClearField("sparse_initializer")
    assert graph_hash(model) == hashlib.sha256(bare.SerializeToString(deterministic=True)).digest()
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.node[0].name = "renamed"
    assert graph_hash(changed) != graph_hash(model)


SUBGRAPH_TEXT = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, bool c) => (float[N, 3] y, float[N, 3] z) <float[4, 3] W = {1,2,3,4,5,6,7,8,9,10,11,12}> {
          z = MatMul(x, W)
          y = If(c) <then_branch = t () => (float[N, 3] o) { o = MatMul(x, W) },
                     else_branch = e () => (float[N, 3] o2) <float[4, 3] W = {0,0,0,0,0,0,0,0,0,0,0,1}> {
                       k = Constant<value = float[4, 3] {1,1,1,1,1,1,1,1,1,1,1,1}>()
                       m = MatMul(x, W)
                       n = MatMul(x, k)
                       o2 = Add(m, n) }>
        }
        """


def test_subgraphs_constants_and_shared_initializers():
    model = onnx.parser.parse_model(SUBGRAPH_TEXT)
    onnx.checker.check_model(model, full_check=True)
    found = weights_by_name(model)
    outer = found["W"]
    # The outer W is read by the main graph and, by scope, by the then-branch.
    assert [c.node for c in outer.consumers] == ["MatMul_0", "If_1/then_branch/MatMul_0"]
    inner = found["If_1/else_branch/W"]  # shadows the outer W inside the else-branch
    assert inner.source == "initializer" and inner.array()[-1, -1] == 1
    assert [c.node for c in inner.consumers] == ["If_1/else_branch/MatMul_1"]
    const = found["If_1/else_branch/k"]
    assert const.source == "constant" and const.role == "weight" and const.shape == (4, 3)


def test_integer_and_bool_tensors_are_not_weights():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[2, 2] y) <int64[2] shape = {2, 2}, float[4, 4] W = {1,0,0,0,0,1,0,0,0,0,1,0,0,0,0,1}> {
          m = MatMul(x, W)
          y = Reshape(m, shape)
        }
        """
    )
    assert list(weights_by_name(model)) == ["W"]


def test_select_weights_filters(mlp):
    weights = find_weights(mlp)
    assert [w.name for w in select_weights(weights)] == ["fc1_w", "fc2_w"]
    assert [w.name for w in select_weights(weights, layers=["fc1*"])] == ["fc1_w", "fc1_b"]
    assert [w.name for w in select_weights(weights, exclude=["fc2*"])] == ["fc1_w"]
    assert [w.name for w in select_weights(weights, min_params=193)] == ["fc1_w"]
    assert [w.name for w in select_weights(weights, layers=["Gemm_0"])] == ["fc1_w", "fc1_b"]  # by node name


def test_put_array_and_graph_hash_ignores_initializers(mlp):
    before = graph_hash(mlp)
    put_array(mlp, "fc1_w", np.zeros((MLP_HIDDEN, MLP_IN), np.float32))
    assert np.array_equal(weights_by_name(mlp)["fc1_w"].array(), np.zeros((MLP_HIDDEN, MLP_IN), np.float32))
    assert graph_hash(mlp) == before
    mlp.graph.node[1].op_type = "Sigmoid"
    assert graph_hash(mlp) != before


# ---------------------------------------------------------------------------------------------
# Loading bad files


def _error(path) -> str:
    with pytest.raises(ModelSqueezeError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_files_give_one_clear_error(tmp_path, mlp_path):
    assert "no such file" in _error(tmp_path / "missing.onnx")
    assert "is a directory" in _error(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty" in _error(empty)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    assert "not an ONNX model" in _error(text)
    png = tmp_path / "picture.onnx"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00\x90\x91h6")
    assert "not an ONNX model" in _error(png)


def test_every_truncation_of_a_model_is_refused(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    for length in range(1, len(data), max(1, len(data) // 97)):
        cut.write_bytes(data[:length])
        with pytest.raises(ModelSqueezeError):
            load_model(cut)


# ---------------------------------------------------------------------------------------------
# External data


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model_to_bytes(model))


def test_external_data_loads_relative_to_the_model_folder(tmp_path, monkeypatch):
    path = _save_external(make_mlp(), tmp_path / "m")
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    loaded = load_model(path)
    expect = {t.name: store.to_array(t) for t in make_mlp().graph.initializer}
    for w in find_weights(loaded):
        assert np.array_equal(w.array(), expect[w.name])


def test_external_data_missing(tmp_path):
    path = _save_external(make_mlp(), tmp_path / "m")
    (tmp_path / "m" / "weights.bin").unlink()
    assert "missing" in _error(path)


def test_external_data_cut_short(tmp_path):
    path = _save_external(make_mlp(), tmp_path / "m")
    data = tmp_path / "m" / "weights.bin"
    data.write_bytes(data.read_bytes()[:10])
    assert "beyond the end" in _error(path)


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd", "link/secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    path = _save_external(make_mlp(), tmp_path / "m")
    (tmp_path / "secret.bin").write_bytes((tmp_path / "m" / "weights.bin").read_bytes())
    (tmp_path / "m" / "link").symlink_to(tmp_path)  # a symlink out of the folder
    _set_location(path, location)
    assert "refused" in _error(path)


# ---------------------------------------------------------------------------------------------
# Saving


def test_check_output_refuses_existing_and_input(tmp_path, mlp_path):
    target = tmp_path / "exists.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(ModelSqueezeError, match="already exists"):
        check_output(target, force=False)
    check_output(target, force=True)
    with pytest.raises(ModelSqueezeError, match="input"):
        check_output(mlp_path, force=True, inputs=[mlp_path])
    with pytest.raises(ModelSqueezeError, match="does not exist"):
        check_output(tmp_path / "no" / "x.onnx", force=False)
    assert target.read_bytes() == b"keep me"


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, mlp):
    out = tmp_path / "out.onnx"
    save_model(mlp, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert model_to_bytes(load_model(out)) == model_to_bytes(mlp)


def test_failed_save_keeps_the_old_file(tmp_path, mlp, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")

    def broken(model, write):
        write(b"half a model")  # the disk fills up in the middle of the write
        raise OSError("disk full")

    monkeypatch.setattr("modelsqueeze.store.serialize_to", broken)
    with pytest.raises(ModelSqueezeError, match=r"out\.onnx: cannot write it: disk full \(nothing was replaced\)"):
        save_model(mlp, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_models_over_the_protobuf_limit_keep_external_data(tmp_path, mlp):
    out = tmp_path / "big.onnx"
    save_model(mlp, out, limit_bytes=100, inline_below_bytes=0)  # pretend 100 bytes is the 2 GB limit
    assert (tmp_path / "big.onnx.data").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = load_model(out)
    x = np.random.default_rng(0).standard_normal((5, MLP_IN)).astype(np.float32)
    run = lambda m: ort.InferenceSession(model_to_bytes(m)).run(None, {"x": x})[0]
    assert np.array_equal(run(loaded), run(make_mlp()))
