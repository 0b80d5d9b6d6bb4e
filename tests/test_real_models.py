"""Issue 16: what third-party exporters do that our samples never showed, each on a small model
written for it (ONNX text): weights behind shape-only ops, names with '::', metadata, IR versions,
layouts that cannot pay, tiny tensors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelsqueeze import store
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair

from cli_helpers import invoke, ok, refused

HIDDEN, FEATURES = 16, 8

# PyTorch's LSTM export: the [4H, I] weight's gate blocks are reordered (IFGO -> IOFG) by
# Slice x3 -> Concat, then Unsqueeze adds the direction axis; the LSTM reads the result.
REORDERED_LSTM = f"""
<ir_version: 7, opset_import: ["" : 13]>
lstm (float[seq, batch, {FEATURES}] x) => (float[seq, 1, batch, {HIDDEN}] y) {{
  w_a = Slice(W, s0, e1, ax)
  w_b = Slice(W, s1, e3, ax)
  w_c = Slice(W, s3, e4, ax)
  w_cat = Concat<axis = 0>(w_a, w_c, w_b)
  w = Unsqueeze(w_cat, ax)
  r_a = Slice(R, s0, e1, ax)
  r_b = Slice(R, s1, e3, ax)
  r_c = Slice(R, s3, e4, ax)
  r_cat = Concat<axis = 0>(r_a, r_c, r_b)
  r = Unsqueeze(r_cat, ax)
  y0, h, c = LSTM<hidden_size = {HIDDEN}>(x, w, r)
  g = Identity(G)
  y = Mul(y0, g)
}}
"""


def reordered_lstm(seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(REORDERED_LSTM)
    rng = np.random.default_rng(seed)
    h = HIDDEN
    arrays = {"W": rng.standard_normal((4 * h, FEATURES)).astype(np.float32) * 0.3,
              "R": rng.standard_normal((4 * h, h)).astype(np.float32) * 0.3,
              "G": rng.standard_normal(h).astype(np.float32),
              "s0": np.array([0]), "s1": np.array([h]), "s3": np.array([3 * h]),
              "e1": np.array([h]), "e3": np.array([3 * h]), "e4": np.array([4 * h]), "ax": np.array([0])}
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in arrays.items())
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weights_behind_slice_concat_unsqueeze_transpose_are_found_with_their_axes():
    infos = {i.name: i for i in find_weights(reordered_lstm())}
    for name in ("W", "R"):
        info = infos[name]
        assert info.role == "weight", name
        assert {(c.op, c.input_index, c.via) for c in info.consumers} == {("LSTM", 1 if name == "W" else 2, "Slice>Concat>Unsqueeze")}
        assert (info.channel_axis, info.reduction_axis) == (0, 1), name  # LSTM's gate rows are axis 0 of [4H, I]
    # G is read by a Mul (through Identity): not a weight of any layer
    assert infos["G"].role == "other" and [(c.op, c.via) for c in infos["G"].consumers] == [("Mul", "Identity")]


@pytest.mark.parametrize("command", [["quantize"], ["cluster", "--bits", "6"], ["prune", "--sparsity", "0.5"]])
def test_a_reordered_lstm_weight_is_compressed_and_the_output_computes_with_it(tmp_path, command):
    source = tmp_path / "lstm.onnx"
    onnx.save_model(reordered_lstm(), str(source))
    out = tmp_path / "out.onnx"
    result = ok(command[0], source, "-o", out, *command[1:])
    assert {t["name"] for t in result["tensors"]} >= {"W", "R"}, result["tensors"]
    pair = load_pair(out)
    assert set(pair.records) >= {"W", "R"}
    x = np.random.default_rng(1).standard_normal((5, 3, FEATURES)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dense = onnx.load(str(source))
    weights = {t.name: store.to_array(t) for t in pair.model.graph.initializer}
    for tensor in dense.graph.initializer:
        if tensor.name in ("W", "R"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(weights[tensor.name], tensor.name))
    want = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


# tf2onnx's Keras LSTM: a while-loop whose weights enter as loop-carried values that the body
# passes on unchanged (W directly, U through Identity); the body's MatMuls read them. S is carried
# too but the body changes it (a state), so it is not a weight.
LOOP_UNITS = 40


def carried_loop(seed: int = 0) -> onnx.ModelProto:
    from onnx import TensorProto, helper
    n = LOOP_UNITS
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
         helper.make_node("MatMul", ["hw", "u_in"], ["hu"]),
         helper.make_node("Add", ["hu", "s_in"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_out"]),
         helper.make_node("Mul", ["s_in", "half"], ["s_out"]),
         helper.make_node("Identity", ["u_in"], ["u_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", n]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("u_in", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", n]),
         helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("u_out", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [n])],
        [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    rng = np.random.default_rng(seed)
    inits = [onnx.numpy_helper.from_array(a, k) for k, a in {
        "W": (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32),
        "U": (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32),
        "S": rng.standard_normal(n).astype(np.float32) * 0.1, "M": np.array(3, np.int64)}.items()]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x", "W", "U", "S"], ["h", "w_last", "u_last", "s_last"], body=body)],
        "carried", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_weights_a_loop_carries_unchanged_are_read_by_the_body_nodes():
    infos = {i.name: i for i in find_weights(carried_loop())}
    for name, index in (("W", 1), ("U", 1)):
        info = infos[name]
        assert info.role == "weight", (name, info.consumers)
        assert [(c.op, c.input_index, c.via) for c in info.consumers] == [("MatMul", index, "Loop")]
        assert info.consumers[0].node.startswith("Loop")  # the body's node, qualified by the Loop
        assert (info.channel_axis, info.reduction_axis) == (1, 0), name
    # a loop-carried state the body changes is the Loop's input, not a weight
    assert infos["S"].role == "other" and [c.op for c in infos["S"].consumers] == ["Loop"]


@pytest.mark.parametrize("command", [["quantize"], ["cluster", "--bits", "6"], ["prune", "--sparsity", "0.5"]])
def test_loop_carried_weights_are_compressed_and_the_output_computes_with_them(tmp_path, command):
    source, out = tmp_path / "loop.onnx", tmp_path / "out.onnx"
    onnx.save_model(carried_loop(), str(source))
    result = ok(command[0], source, "-o", out, *command[1:])
    assert {t["name"] for t in result["tensors"]} == {"W", "U"}, result["tensors"]
    pair = load_pair(out)
    assert set(pair.records) == {"W", "U"}
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(1).standard_normal((6, LOOP_UNITS)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    dense = onnx.load(str(source))
    weights = {t.name: store.to_array(t) for t in pair.model.graph.initializer}
    assert not np.array_equal(weights["W"], store.to_array(dense.graph.initializer[0]))
    for tensor in dense.graph.initializer:
        if tensor.name in ("W", "U"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(weights[tensor.name], tensor.name))
    want = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_report_says_which_tensors_are_left_out_and_their_share_of_the_bytes(tmp_path):
    source = tmp_path / "lstm.onnx"
    onnx.save_model(reordered_lstm(), str(source))
    report = ok("report", source)
    left = {row["name"]: row for row in report["left_out"]}
    assert set(left) == {"G"}, left
    assert "Mul" in left["G"]["reason"]
    total = sum(t["original_bytes"] for t in report["tensors"])
    assert left["G"]["share"] == pytest.approx(left["G"]["bytes"] / total)
    table = invoke("report", source)
    assert table.exit_code == 0 and "left out" in table.stdout and "G" in table.stdout


# PyTorch's default names, `onnx::MatMul_7`; and a real tensor whose name starts with a weight's
# name and the tool's own separator, which the old name-prefix rule took for part of the form.
COLONS = """
<ir_version: 7, opset_import: ["" : 13]>
colons (float[batch, 32] x) => (float[batch, 64] y) {
  h = MatMul(x, W7)
  hb = Add(h, W7cb)
  y = MatMul(hb, W8)
}
"""


RENAMED = {"W7": "onnx::MatMul_7", "W7cb": "onnx::MatMul_7::codebook", "W8": "onnx::MatMul_8"}


def colons_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(COLONS)  # the text syntax has no '::' in names: renamed after
    for node in model.graph.node:
        node.input[:] = [RENAMED.get(i, i) for i in node.input]
    rng = np.random.default_rng(3)
    for name, shape in [("onnx::MatMul_7", (32, 64)), ("onnx::MatMul_7::codebook", (64,)), ("onnx::MatMul_8", (64, 64))]:
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("command", [["cluster", "--bits", "4"], ["prune", "--sparsity", "0.9"], ["quantize"],
                                     ["pipeline", "--prune", "0.8", "--bits", "4", "--huffman"]])
def test_names_with_the_tools_separator_never_collide(tmp_path, command):
    from modelsqueeze.model import model_to_bytes
    from modelsqueeze.pack import skeleton
    source = tmp_path / "colons.onnx"
    onnx.save_model(colons_model(), str(source))
    out = tmp_path / "out.onnx"
    summary = ok(command[0], source, "-o", out, *command[1:])
    pair = load_pair(out)
    assert set(pair.records) == {"onnx::MatMul_7", "onnx::MatMul_8"}
    written = onnx.load(str(out))
    names = [t.name for t in written.graph.initializer]
    assert len(names) == len(set(names)) and "onnx::MatMul_7::codebook" in names  # the real bias is kept
    bias = next(t for t in written.graph.initializer if t.name == "onnx::MatMul_7::codebook")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(bias),
                                  onnx.numpy_helper.to_array(colons_model().graph.initializer[1]))
    bare = skeleton(pair.model, pair.records.values())
    assert "onnx::MatMul_7::codebook" in {t.name for t in bare.graph.initializer}
    packed = len(model_to_bytes(bare)) + (tmp_path / "out.msq").stat().st_size
    assert ok("report", out)["packed_bytes"] == packed
    assert summary.get("packed_bytes_after", packed) == packed
    x = np.random.default_rng(4).standard_normal((7, 32)).astype(np.float32)
    options = ort.SessionOptions()  # level-all fuses DequantizeLinear + MatMul into an int8 kernel (issue 18)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    weights = {t.name: store.to_array(t) for t in pair.model.graph.initializer}
    want = ((x @ weights["onnx::MatMul_7"]) + weights["onnx::MatMul_7::codebook"]) @ weights["onnx::MatMul_8"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _old_mlp(opset: int, ir: int) -> onnx.ModelProto:
    """A 64x64 MLP as an older exporter writes it: low opset and IR, node metadata (PyTorch puts
    stack traces there), value_info."""
    from conftest import make_mlp
    model = make_mlp()
    model.opset_import[0].version = opset
    model.ir_version = ir
    for i, node in enumerate(model.graph.node):
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f"File model.py, line {i}\n" * 20)
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["batch", 64]))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("args,opset,ir", [([], 13, 7), (["--bits", "4"], 21, 10), (["--granularity", "tensor"], 11, 6)])
def test_quantize_raises_the_opset_and_ir_only_as_far_as_its_forms_need_and_keeps_metadata(tmp_path, args, opset, ir):
    source = tmp_path / "old.onnx"
    original = _old_mlp(11, 6)
    onnx.save_model(original, str(source))
    out = tmp_path / "q.onnx"
    summary = ok("quantize", source, "-o", out, "--min-params", "0", *args)
    written = onnx.load(str(out))
    assert (written.opset_import[0].version, written.ir_version) == (opset, max(ir, 6))
    if opset != 11:
        assert any(f"opset upgraded 11 -> {opset}, IR 6 -> {ir}" in n for n in summary["notes"]), summary["notes"]
    model_nodes = [n for n in written.graph.node if not n.name.startswith("msq/")]
    assert [list(n.metadata_props) for n in model_nodes] == [list(n.metadata_props) for n in original.graph.node]
    assert list(written.graph.value_info) == list(original.graph.value_info)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("steps", [[["prune", "--sparsity", "0.9"]], [["cluster", "--bits", "3"]], [["quantize", "--bits", "4", "--granularity", "block"]],
                                   [["prune", "--sparsity", "0.6"], ["cluster", "--bits", "5"], ["huffman"]],
                                   [["quantize", "--bits", "8"], ["huffman"]]])
def test_the_record_size_bound_is_never_below_the_exact_size(tmp_path, steps):
    """The no-bigger check skips encoding where record_size_bound already says a record pays: the
    bound must hold for every kind and codec, Huffman included."""
    from conftest import SAMPLES
    from modelsqueeze.sidecar import read_sidecar, record_size, record_size_bound
    source = SAMPLES / "lenet5.onnx"
    for i, step in enumerate(steps):
        out = tmp_path / f"s{i}.onnx"
        assert invoke(step[0], source, "-o", out, "--quiet", *step[1:]).exit_code == 0
        source = out
        for record in read_sidecar(out.with_suffix(".msq")).records.values():
            assert record_size_bound(record) >= record_size(record), (step, record.name, record.kind, record.stream_codecs)


# Class 8: svd on weights held in Constant nodes and in subgraphs (a branch's own initializer, and
# an outer-scope initializer read inside a branch). The weights are of rank 2, so rank-2 factors
# reproduce the layer. The rewrite moves the If node: the keys of its weights must not move.
BRANCHED = """
<ir_version: 7, opset_import: ["" : 13]>
g (float[N, 24] x, bool c) => (float[N, 20] y) {
  h0 = MatMul(x, WC)
  h = MatMul(h0, Wm)
  y = If(c) <then_branch = t () => (float[N, 20] yt) { yt = MatMul(h, Outer) },
             else_branch = e () => (float[N, 20] ye) { ye = MatMul(h, Own) }>
}
"""


def _rank2(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1]))).astype(np.float32) / 4


def branched_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(BRANCHED)
    model.graph.node.insert(0, onnx.helper.make_node(
        "Constant", [], ["WC"], value=onnx.numpy_helper.from_array(_rank2((24, 24), 1), "WC")))
    model.graph.initializer.append(onnx.numpy_helper.from_array(_rank2((24, 20), 2), "Outer"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(_rank2((24, 24), 5), "Wm"))
    branch = next(a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    branch.initializer.append(onnx.numpy_helper.from_array(_rank2((24, 20), 3), "Own"))
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(path, feeds):
    """Outputs with onnxruntime's basic optimizations (at level all it fuses DequantizeLinear +
    MatMul into kernels that quantize the activations too: issue 18)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_svd_factors_constant_node_and_subgraph_weights_and_the_output_computes(tmp_path):
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(branched_model(), str(source))
    result = ok("svd", source, "-o", out, "--rank", "2")
    factored = {t["name"] for t in result["tensors"]}
    assert factored == {f"{w}.svd_{s}" for w in ("WC", "Wm", "Outer", "If_3/else_branch/Own") for s in ("in", "out")}, factored
    assert out.stat().st_size < source.stat().st_size
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert not [n for n in written.graph.node if n.op_type == "Constant"]  # its factors are initializers now
    infos = {i.key for i in find_weights(written)}
    assert {"WC", "Wm", "Outer", "If_3/else_branch/Own"}.isdisjoint(infos)
    assert {"If_3/else_branch/Own.svd_in", "If_3/else_branch/Own.svd_out"} <= infos  # keys stay as reported
    x = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
    for branch in (True, False):
        feeds = {"x": x, "c": np.array(branch)}
        np.testing.assert_allclose(_run(out, feeds), _run(source, feeds), rtol=1e-4, atol=1e-4)


# Class 9: a recurrent cell's weight is gate-stacked; svd leaves it alone unless named. Two forms:
# an unrolled cell (MatMul -> Split into gates -> Sigmoid/Tanh) and a MatMul inside a Loop body.
UNROLLED_CELL = """
<ir_version: 7, opset_import: ["" : 13]>
cell (float[N, 32] x) => (float[N, 32] h, float[N, 32] y) {
  z = MatMul(x, Wg)
  zb = Add(z, Bg)
  i, f, g, o = Split<axis = 1>(zb)
  si = Sigmoid(i)
  sf = Sigmoid(f)
  tg = Tanh(g)
  so = Sigmoid(o)
  c0 = Mul(si, tg)
  c1 = Add(c0, sf)
  tc = Tanh(c1)
  h = Mul(so, tc)
  y = MatMul(x, Wplain)
}
"""

LOOP_CELL = """
<ir_version: 7, opset_import: ["" : 13]>
rnn (int64 steps, float[N, 32] h0) => (float[N, 32] h) {
  keep = Constant<value = bool {1}>()
  h = Loop(steps, keep, h0) <body = body (int64 i, bool c_in, float[N, 32] s) => (bool c_out, float[N, 32] s_out) {
    c_out = Identity(c_in)
    m = MatMul(s, Wr)
    s_out = Tanh(m)
  }>
}
"""


def _with(text: str, arrays: dict) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in arrays.items())
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("kind", ["unrolled", "loop"])
def test_svd_leaves_recurrent_weights_alone_by_default_and_factors_them_when_named(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "unrolled":
        model = _with(UNROLLED_CELL, {"Wg": rng.standard_normal((32, 128)).astype(np.float32),
                                      "Bg": rng.standard_normal(128).astype(np.float32),
                                      "Wplain": rng.standard_normal((32, 32)).astype(np.float32)})
        recurrent, reason = "Wg", "is gate-stacked: its output is cut into 4 parts read by Sigmoid, Tanh"
    else:
        model = _with(LOOP_CELL, {"Wr": rng.standard_normal((32, 32)).astype(np.float32)})
        recurrent, reason = "Wr", "is read in a Loop body"
    source = tmp_path / "m.onnx"
    onnx.save_model(model, str(source))
    result = ok("svd", source, "-o", tmp_path / "a.onnx", "--rank", "4")
    notes = "\n".join(result["notes"])
    assert f"{recurrent}: {reason}" in notes and "left alone (name it in --layers" in notes, notes
    factored = {t["name"].split(".svd_")[0] for t in result["tensors"]}
    assert recurrent not in factored and factored == ({"Wplain"} if kind == "unrolled" else set())
    for named in (["--layers", recurrent], ["--rank", f"{recurrent}=4,4"]):
        result = ok("svd", source, "-o", tmp_path / "b.onnx", "--force", *(named if named[0] == "--layers" else []),
                    *(["--rank", "4"] if named[0] == "--layers" else named))
        assert recurrent in {t["name"].split(".svd_")[0] for t in result["tensors"]}, named
        onnx.checker.check_model(onnx.load(str(tmp_path / "b.onnx")), full_check=True)


@pytest.mark.parametrize("command", [["cluster", "--bits", "6"], ["quantize"], ["prune", "--sparsity", "0.5"]])
def test_subgraph_and_constant_weights_are_compressed_where_the_graph_reads_them(tmp_path, command):
    """The forms of a branch's own weight go into that branch, whatever nodes go in before the
    branch's node (its key, "If_3/else_branch/Own", must keep pointing there); the output computes
    with the compressed values in both branches, and unpacking gives a model no bigger than the
    original."""
    source, out, unpacked = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "plain.onnx"
    model = branched_model()
    onnx.save_model(model, str(source))
    result = ok(command[0], source, "-o", out, *command[1:])
    assert {t["name"] for t in result["tensors"]} == {"WC", "Wm", "Outer", "If_3/else_branch/Own"}
    pair = load_pair(out)
    values = {info.key: info.array() for info in find_weights(pair.model)}
    assert set(values) == {"WC", "Wm", "Outer", "If_3/else_branch/Own"}
    # The reference: the original graph with the pair's values put in where each weight lives.
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    expected.graph.node[0].attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(values["WC"], "WC"))
    branch = next(a.g for n in expected.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    for graph, key, name in ((expected.graph, "Wm", "Wm"), (expected.graph, "Outer", "Outer"),
                             (branch, "If_3/else_branch/Own", "Own")):
        tensor = next(t for t in graph.initializer if t.name == name)
        tensor.CopyFrom(onnx.numpy_helper.from_array(values[key], name))
    reference = tmp_path / "expected.onnx"
    onnx.save_model(expected, str(reference))
    assert not np.array_equal(values["If_3/else_branch/Own"], _rank2((24, 20), 3))  # compressed, so not the original
    assert invoke("unpack", out, "-o", unpacked).exit_code == 0
    assert unpacked.stat().st_size <= source.stat().st_size
    x = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
    for branch_taken in (True, False):
        feeds = {"x": x, "c": np.array(branch_taken)}
        want = _run(reference, feeds)
        np.testing.assert_allclose(_run(out, feeds), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_run(unpacked, feeds), want, rtol=1e-5, atol=1e-5)


# Class 10: inputs that are not one batch of samples. A VAD-like signature: a 0-d sample rate, a
# state whose batch axis is 1, an array the model never reads, labels under another name.
VAD = """
<ir_version: 8, opset_import: ["" : 17]>
vad (float[{b}, 64] input, int64 sr, float[2, {b}, 16] state) => (float[{b}, 2] output, float[2, {b}, 16] stateN) {{
  srf = Cast<to = 1>(sr)
  scale = Div(srf, k)
  h = MatMul(input, W)
  hs = Mul(h, scale)
  s0 = ReduceSum<keepdims = 0>(state, zero)
  z = Add(hs, s0)
  t = Tanh(z)
  output = MatMul(t, V)
  tu = Unsqueeze(t, zero)
  stateN = Concat<axis = 0>(tu, tu)
}}
"""


def vad_model(batch: str = "batch") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _with(VAD.format(b=batch), {"W": rng.standard_normal((64, 16)).astype(np.float32) / 8,
                                       "V": rng.standard_normal((16, 2)).astype(np.float32),
                                       "k": np.array(16000, np.float32), "zero": np.array([0])})


def vad_data(path, n: int = 600):
    rng = np.random.default_rng(1)
    arrays = {"input": rng.standard_normal((n, 64)).astype(np.float32), "sr": np.array(8000, np.int64),
              "state": rng.standard_normal((2, n, 16)).astype(np.float32) / 4, "sample_rate": np.array(8000)}
    ort_out = _run_whole(vad_model(), arrays)
    arrays["labels"] = ort_out[0].argmax(axis=1)
    np.savez(path, **arrays)
    return arrays


def _run_whole(model, arrays):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: arrays[k] for k in ("input", "sr", "state")})


def test_a_scalar_input_is_fed_whole_and_a_state_is_batched_along_its_batch_axis(tmp_path):
    from modelsqueeze.validate import Runner

    arrays = vad_data(tmp_path / "d.npz")
    runner = Runner(vad_model())
    samples = runner.samples({k: arrays[k] for k in ("input", "sr", "state")})
    assert samples.axes == {"input": 0, "sr": None, "state": 1} and samples.n == 600
    got = runner.run(samples)  # 3 batches of at most 256 along each input's own axis
    for ours, whole in zip(got, _run_whole(vad_model(), arrays)):
        np.testing.assert_allclose(ours, whole, rtol=1e-6, atol=1e-6)


def test_eval_validate_calibration_and_sensitivity_take_such_data(tmp_path):
    source, data = tmp_path / "vad.onnx", tmp_path / "d.npz"
    onnx.save_model(vad_model(), str(source))
    vad_data(data)
    result = invoke("eval", source, "--data", data, "--labels", "labels", "--reference", source, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    assert "sample_rate ignored" in result.stderr  # an array the model does not read: a note, not an error
    summary = json.loads(result.stdout)
    assert summary["accuracy"] == 1.0 and summary["samples"] == 600
    assert set(summary["fidelity_per_output"]) == {"output", "stateN"}
    out = tmp_path / "out.onnx"
    step = ok("quantize", source, "-o", out, "--validate", data, "--labels", "labels", "--calibration", data)
    assert 0.9 <= step["accuracy_after"] <= 1.0 and step["accuracy_before"] == 1.0
    sens = invoke("sensitivity", source, "--data", data, "--labels", "labels", "--method", "prune", "--json", "--quiet")
    assert sens.exit_code == 0, sens.output + sens.stderr
    # Without --labels there is no `y`: --validate says so in one line.
    line = refused("prune", source, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--validate", data, "--quiet")
    assert "no `y` labels" in line and "other arrays: labels, sample_rate; --labels KEY" in line, line
    assert not (tmp_path / "p.onnx").exists()
    assert "no array 'target' for --labels" in refused("eval", source, "--data", data, "--labels", "target")


def test_a_state_whose_batch_axis_the_model_does_not_name_needs_batch_axis(tmp_path):
    source, data = tmp_path / "vad.onnx", tmp_path / "d.npz"
    onnx.save_model(vad_model(batch="?"), str(source))
    vad_data(data, n=40)
    line = refused("eval", source, "--data", data, "--labels", "labels", "--quiet")
    assert "different numbers of samples: input 40 (axis 0), state 2 (axis 0)" in line and "--batch-axis" in line, line
    summary = ok("eval", source, "--data", data, "--labels", "labels", "--batch-axis", "state=1")
    assert summary["accuracy"] == 1.0 and summary["samples"] == 40
    assert "no input of that name" in refused("eval", source, "--data", data, "--batch-axis", "states=1", "--quiet")
    assert "expected INPUT=AXIS" in refused("eval", source, "--data", data, "--batch-axis", "state=-1", "--quiet")


# Class 11: skl2onnx classifiers put an int64 label before the probabilities.
CLASSIFIER = """
<ir_version: 8, opset_import: ["" : 17]>
clf (float[N, 8] x) => (int64[N] label, float[N, 3] probabilities) {
  z = MatMul(x, W)
  probabilities = Softmax<axis = 1>(z)
  label = ArgMax<axis = 1, keepdims = 0>(z)
}
"""


def test_eval_headlines_the_float_scores_and_lists_every_output(tmp_path):
    rng = np.random.default_rng(0)
    source, small, data = tmp_path / "clf.onnx", tmp_path / "small.onnx", tmp_path / "d.npz"
    onnx.save_model(_with(CLASSIFIER, {"W": rng.standard_normal((8, 3)).astype(np.float32)}), str(source))
    np.savez(data, x=rng.standard_normal((200, 8)).astype(np.float32))
    ok("cluster", source, "-o", small, "--bits", "2", "--min-params", "0")
    summary = ok("eval", small, "--data", data, "--reference", source)
    assert summary["headline_output"] == "probabilities"
    assert summary["fidelity"] == summary["fidelity_per_output"]["probabilities"] != summary["fidelity_per_output"]["label"]
    text = invoke("eval", small, "--data", data, "--reference", source).stdout
    assert "headline output" in text and "output label" in text and "output probabilities" in text


# --metric: models without labels are gated and searched on fidelity to the input model.
def test_validate_gates_on_agreement_or_snr_without_labels(tmp_path):
    source, data, out = tmp_path / "vad.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save_model(vad_model(), str(source))
    vad_data(data)
    step = ok("quantize", source, "-o", out, "--validate", data, "--metric", "snr", "--min-snr", "20")
    measured = ok("eval", out, "--data", data, "--reference", source, "--metric", "snr")
    assert step["snr_db_after"] == pytest.approx(measured["metric"]["value"], abs=1e-9) and step["snr_db_after"] > 20
    assert measured["metric"]["output"] == "output"  # the first float output
    out.unlink()
    out.with_suffix(".msq").unlink(missing_ok=True)
    result = invoke("quantize", source, "-o", out, "--validate", data, "--metric", "snr:stateN", "--min-snr", "90", "--quiet")
    assert result.exit_code == 1 and "below --min-snr 90 dB; nothing written" in result.stderr, result.stderr
    result = invoke("cluster", source, "-o", out, "--bits", "2", "--min-params", "0", "--validate", data,
                    "--metric", "agreement", "--max-drop", "1", "--quiet")
    assert result.exit_code == 1 and "top-1 agreement with vad.onnx fell" in result.stderr, result.stderr
    assert not out.exists() and not out.with_suffix(".msq").exists()
    agreed = ok("cluster", source, "-o", out, "--bits", "2", "--min-params", "0", "--validate", data, "--metric", "agreement")
    assert agreed["accuracy_before"] == 1.0 and agreed["drop_pp"] == pytest.approx(100 * (1 - agreed["accuracy_after"]))
    for bad, message in ((["--metric", "snr", "--max-drop", "1"], "gate it with --min-snr"),
                         (["--min-snr", "20"], "--min-snr needs --metric snr"),
                         (["--metric", "f1"], "expected one of top1, agreement, snr"),
                         (["--metric", "snr:nope"], "no output 'nope' (outputs: output, stateN)")):
        line = refused("prune", source, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--validate", data, *bad, "--quiet")
        assert message in line, (bad, line)
    assert "needs --validate" in refused("prune", source, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--metric", "snr")


def test_eval_and_sensitivity_take_the_metric(tmp_path):
    source, data, out = tmp_path / "vad.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save_model(vad_model(), str(source))
    vad_data(data)
    ok("cluster", source, "-o", out, "--bits", "3", "--min-params", "0")
    measured = ok("eval", out, "--data", data, "--reference", source, "--metric", "snr:stateN")
    assert measured["headline_output"] == "stateN"
    assert measured["metric"]["value"] == measured["fidelity_per_output"]["stateN"]["snr_db"] == measured["fidelity"]["snr_db"]
    sens = ok("sensitivity", source, "--data", data, "--method", "cluster", "--values", "4,2", "--metric", "agreement",
              "--min-params", "0")
    assert sens["baseline_accuracy"] == 1.0  # agreement of the model with itself, although `labels` are there


def test_sensitivity_and_its_search_measure_the_output_snr_and_keep_the_floor(tmp_path):
    """--metric snr: each cell is the SNR `eval --metric snr` gives the model with that layer
    alone compressed; the chosen setting per layer is the most aggressive one at or above
    --min-snr; the recipe carries the metric and the floor, and `run` holds it; the search's
    chosen point is measured for real."""
    source, data = tmp_path / "vad.onnx", tmp_path / "d.npz"
    onnx.save_model(vad_model(), str(source))
    vad_data(data)
    recipe = tmp_path / "r.toml"
    sens = ok("sensitivity", source, "--data", data, "--method", "cluster", "--values", "5,3,1", "--metric", "snr:output",
              "--min-snr", "15", "--min-params", "0", "--recipe", recipe)
    assert sens["metric"] == "snr:output" and sens["min_snr_db"] == 15 and sens["baseline_snr_db"] is None  # identical
    for layer in sens["layers"]:
        for point in layer["points"]:
            alone = tmp_path / f"{layer['name']}_{point['value']}.onnx"
            written = ok("cluster", source, "-o", alone, "--bits", str(point["value"]), "--layers", layer["name"],
                         "--min-params", "0")
            # sizes as the command writes them (a V that would grow is left as it was, there too)
            assert point["packed_bytes"] == written["packed_bytes_after"]
            measured = ok("eval", alone, "--data", data, "--reference", source, "--metric", "snr:output")
            value = measured["metric"]["value"]  # None: identical outputs (a 32-value V at 5 bits is exact)
            assert point["snr_db"] == (None if value is None else pytest.approx(value, rel=1e-9))
        passing = [p["value"] for p in layer["points"] if (p["snr_db"] is None or p["snr_db"] >= 15)
                   and p["packed_bytes"] < sens["baseline_bytes"]]  # and only what saves bytes
        assert sens["chosen"].get(layer["name"]) == (passing[-1] if passing else None)
    assert any(p["snr_db"] is not None and p["snr_db"] < 15 for layer in sens["layers"] for p in layer["points"])  # the floor bites
    assert "W" in sens["chosen"]
    text = recipe.read_text()
    assert 'metric = "snr:output"' in text and "min_snr = 15" in text and "validate" in text
    run = invoke("run", recipe, "-o", tmp_path / "small.onnx", "--json", "--quiet")
    combined = sens["combined"]["snr_db"]
    assert run.exit_code == (0 if combined >= 15 else 1), run.stderr
    # the search: its chosen point is what the recipe it writes gives
    searched = tmp_path / "s.toml"
    found = ok("sensitivity", source, "--data", data, "--method", "cluster", "--values", "6,4,3,2", "--metric", "snr:output",
               "--min-snr", "10", "--min-params", "0", "--target-ratio", "3", "--recipe", searched)
    chosen = found["chosen"]
    assert chosen["snr_db"] >= 10
    small = tmp_path / "searched.onnx"
    ok("run", searched, "-o", small)
    measured = ok("eval", small, "--data", data, "--reference", source, "--metric", "snr:output")
    assert measured["metric"]["value"] == pytest.approx(chosen["snr_db"], rel=1e-9)
    # what the metric cannot take, refused before any work
    base = ("sensitivity", source, "--data", data, "--method", "cluster")
    assert "--min-snr DB" in refused(*base, "--metric", "snr", "--max-drop", "1")
    assert "needs --metric snr" in refused(*base, "--min-snr", "20")
    assert "with --metric snr" in refused(*base, "--metric", "snr", "--plot", tmp_path / "p.png")


QDQ = """
<ir_version: 8, opset_import: ["" : 17]>
qdq (float[N, 8] x) => (float[N, 4] y) {
  w = DequantizeLinear(Wq, scale, zero)
  y = MatMul(x, w)
}
"""


@pytest.mark.parametrize("command", [["quantize"], ["cluster", "--bits", "4"], ["prune", "--sparsity", "0.5"],
                                     ["svd", "--rank", "2"], ["huffman"]])
def test_an_already_quantized_model_is_refused_saying_so(tmp_path, command):
    model = _with(QDQ, {"Wq": np.arange(32, dtype=np.int8).reshape(8, 4), "scale": np.array(0.1, np.float32),
                        "zero": np.array(0, np.int8)})
    source = tmp_path / "qdq.onnx"
    onnx.save_model(model, str(source))
    line = refused(command[0], source, "-o", tmp_path / "o.onnx", *command[1:])
    assert "no float weights to compress: it is already quantized (1 DequantizeLinear" in line, line
    assert not (tmp_path / "o.onnx").exists()


# Class 6, by default: a tensor tiny both absolutely and against the model (a 1-output head on a
# 131k-parameter body) is left alone; --min-params 0 compresses it.
HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 1024] x) => (float[N, 1] y) {
  h = MatMul(x, body)
  r = Relu(h)
  y = MatMul(r, head)
}
"""


@pytest.mark.parametrize("command", [["quantize"], ["cluster", "--bits", "4"], ["prune", "--sparsity", "0.5"]])
def test_by_default_tiny_tensors_of_a_big_model_are_left_alone(tmp_path, command):
    rng = np.random.default_rng(0)
    model = _with(HEAD, {"body": rng.standard_normal((1024, 128)).astype(np.float32),
                         "head": rng.standard_normal((128, 1)).astype(np.float32)})
    source = tmp_path / "m.onnx"
    onnx.save_model(model, str(source))
    result = ok(command[0], source, "-o", tmp_path / "a.onnx", *command[1:])
    assert [t["name"] for t in result["tensors"]] == ["body"]
    assert any("1 tensor(s) of fewer than 1,024 parameters and under 0.1% of the model left alone by default: head (128)"
               in note for note in result["notes"]), result["notes"]
    every = ok(command[0], source, "-o", tmp_path / "b.onnx", *command[1:], "--min-params", "0")
    # head is compressed now, or measured and kept because its record would not be smaller
    assert "head" in {t["name"] for t in every["tensors"]} or any(n.startswith("head: ") for n in every["notes"]), every
    assert not any("left alone by default" in note for note in every["notes"])


# Class 7, at least: per-tensor output sensitivity, so a tensor int8 hurts most shows up first.
def test_report_sensitivity_ranks_tensors_by_the_output_snr_int8_alone_gives(tmp_path):
    rng = np.random.default_rng(0)
    body = rng.standard_normal((1024, 128)).astype(np.float32)
    head = rng.standard_normal((128, 1)).astype(np.float32)
    source, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save_model(_with(HEAD, {"body": body, "head": head}), str(source))
    np.savez(data, x=rng.standard_normal((64, 1024)).astype(np.float32))  # no labels needed
    rows = ok("report", source, "--data", data, "--sensitivity")["output_sensitivity"]
    snrs = [float("inf") if r["snr_db"] is None else r["snr_db"] for r in rows]  # JSON has no inf: identical
    assert snrs == sorted(snrs) and {r["name"] for r in rows} == {"body", "head"}  # lowest SNR first
    for row in rows:  # each figure is what quantizing that tensor alone and measuring the file gives
        if row["note"]:  # left as it was: the output is the model's own
            assert row["snr_db"] is None and "left as it was" in row["note"]
            continue
        out = tmp_path / f"{row['name']}.onnx"
        ok("quantize", source, "-o", out, "--layers", row["name"], "--min-params", "0")
        measured = ok("eval", out, "--data", data, "--reference", source, "--metric", "snr")["metric"]["value"]
        assert row["snr_db"] == pytest.approx(measured, rel=1e-9), row
    assert "--sensitivity needs --data" in refused("report", source, "--sensitivity")


def test_huffman_on_a_float_model_writes_no_bigger_file_and_no_sidecar(tmp_path):
    """Class 12: nothing to code (no codebook or grid yet) leaves the model as it was, with notes."""
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save_model(branched_model(), str(source))
    result = ok("huffman", source, "-o", out)
    assert out.stat().st_size <= source.stat().st_size and not out.with_suffix(".msq").exists()
    assert result["packed_bytes_after"] == out.stat().st_size
    assert all("nothing to code" in n for n in result["notes"]), result["notes"]


def test_a_recipe_carries_the_metric_and_its_floor(tmp_path):
    source, data = tmp_path / "vad.onnx", tmp_path / "d.npz"
    onnx.save_model(vad_model(), str(source))
    vad_data(data)
    recipe = tmp_path / "r.toml"
    ok("pipeline", source, "-o", tmp_path / "p.onnx", "--quantize", "8", "--validate", data, "--metric", "snr",
       "--min-snr", "20", "--save-recipe", recipe)
    text = recipe.read_text()
    assert 'metric = "snr"' in text and "min_snr = 20" in text, text
    ran = ok("run", recipe, "-o", tmp_path / "r.onnx")
    assert ran["metric"] == "snr" and ran["snr_db_after"] > 20
    recipe.write_text(text.replace("min_snr = 20", "min_snr = 90"))
    result = invoke("run", recipe, "-o", tmp_path / "s.onnx", "--quiet")
    assert result.exit_code == 1 and "below --min-snr 90 dB" in result.stderr and not (tmp_path / "s.onnx").exists()
    recipe.write_text(text.replace('metric = "snr"', 'metric = "psnr"'))
    assert "metric = 'psnr'" in refused("run", recipe, "-o", tmp_path / "t.onnx")


# Class 7: a fixed basis (an STFT fed to a Conv on the raw signal) is not a learned weight.
STFT = """
<ir_version: 8, opset_import: ["" : 17]>
vad (float[N, 1, 2048] wave) => (float[N, 2] y) {
  spec = Conv<strides = [128]>(wave, basis)
  p = Mul(spec, spec)
  h = Conv<strides = [1]>(p, learned)
  r = Relu(h)
  g = GlobalAveragePool(r)
  f = Flatten(g)
  y = MatMul(f, head)
}
"""


def stft_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    taps, bins = 256, 32
    t = np.arange(taps)
    window = np.hanning(taps)
    basis = np.stack([window * np.cos(2 * np.pi * k * t / taps) for k in range(1, bins + 1)])[:, None, :]
    return _with(STFT, {"basis": basis.astype(np.float32),
                        "learned": (rng.standard_normal((64, bins, 33)) / 30).astype(np.float32),
                        "head": rng.standard_normal((64, 2)).astype(np.float32)})


def test_a_fixed_basis_is_left_alone_by_default_and_compressed_when_named(tmp_path):
    from modelsqueeze.model import fixed_basis

    model = stft_model()
    found = {info.key: fixed_basis(info) for info in find_weights(model)}
    assert found["basis"].startswith("a fixed signal-processing basis") and not found["learned"], found
    source = tmp_path / "m.onnx"
    onnx.save_model(model, str(source))
    for command in (["quantize"], ["cluster", "--bits", "4"], ["prune", "--sparsity", "0.5"]):
        result = ok(command[0], source, "-o", tmp_path / "a.onnx", "--force", *command[1:])
        assert "basis" not in {t["name"] for t in result["tensors"]} and "learned" in {t["name"] for t in result["tensors"]}
        assert any(n.startswith("basis: a fixed signal-processing basis") and "name it in --layers" in n
                   for n in result["notes"]), result["notes"]
        named = ok(command[0], source, "-o", tmp_path / "b.onnx", "--force", *command[1:], "--layers", "basis")
        assert [t["name"] for t in named["tensors"]] == ["basis"]


def test_report_lists_fixed_bases_and_tiny_tensors_among_those_left_out_by_default(tmp_path):
    rng = np.random.default_rng(0)
    for model, name, reason in ((stft_model(), "basis", "a fixed signal-processing basis"),
                                (_with(HEAD, {"body": rng.standard_normal((1024, 128)).astype(np.float32),
                                              "head": rng.standard_normal((128, 1)).astype(np.float32)}),
                                 "head", "tiny (128 parameters, under 0.1% of the model); --min-params 0")):
        source = tmp_path / f"{name}.onnx"
        onnx.save_model(model, str(source))
        left = {row["name"]: row["reason"] for row in ok("report", source)["left_out"]}
        assert left.get(name, "").startswith(reason), left
    # once compressed (it has a record), it is no longer listed
    ok("quantize", tmp_path / "basis.onnx", "-o", tmp_path / "q.onnx", "--layers", "basis")
    assert "basis" not in {row["name"] for row in ok("report", tmp_path / "q.onnx")["left_out"]}


# float16 and float64 weights: quantize's DequantizeLinear form gives float32, so a Cast to the
# weight's type follows, and the file that runs is as small as the pack says (slovorez_morph ran
# as float16 at 1.03x before, packed 2x).
HALF = """
<ir_version: 8, opset_import: ["" : 13]>
half ({t}[batch, 96] x) => ({t}[batch, 64] y) {{
  h = MatMul(x, W)
  r = Relu(h)
  y = MatMul(r, V)
}}
"""


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("args", [(), ("--bits", "4", "--granularity", "channel")])
def test_quantize_writes_float16_and_float64_weights_in_compact_form_computing_the_pair(tmp_path, dtype, args):
    rng = np.random.default_rng(3)
    model = onnx.parser.parse_model(HALF.format(t={"float16": "float16", "float64": "double"}[dtype]))
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(rng.standard_normal((96, 128)).astype(dtype), "W"),
        onnx.numpy_helper.from_array(rng.standard_normal((128, 64)).astype(dtype), "V")])
    onnx.checker.check_model(model, full_check=True)
    source, out, plain = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "plain.onnx"
    onnx.save_model(model, str(source))
    result = ok("quantize", source, "-o", out, *args)
    assert not [n for n in result["notes"] if "stay floats" in n]
    graph = onnx.load(str(out))
    assert [n.op_type for n in graph.graph.node].count("DequantizeLinear") == 2
    assert [n.op_type for n in graph.graph.node].count("Cast") == 2
    # the runnable file is near the pack: 8-bit codes of 16-bit weights are about half
    assert source.stat().st_size / out.stat().st_size > {"float16": 1.8, "float64": 7.0}[dtype]
    # the weights the graph computes are the pair's, bit for bit
    assert invoke("unpack", out, "-o", plain).exit_code == 0
    casts = [n.output[0] for n in graph.graph.node if n.op_type == "Cast"]
    graph.graph.output.extend([onnx.helper.make_tensor_value_info(name, model.graph.output[0].type.tensor_type.elem_type, None)
                               for name in casts])
    x = rng.standard_normal((5, 96)).astype(dtype)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got, *weights = session.run(None, {"x": x})
    dense = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(plain)).graph.initializer}
    for name, value in zip(casts, weights):
        assert value.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(value, dense[name])
    want = _run(plain, {"x": x})
    assert got.dtype == np.dtype(dtype)
    if dtype == "float64":
        np.testing.assert_array_equal(got, want)
    else:  # onnxruntime's float16 MatMul rounds differently when B is computed: 1 ulp of the outputs
        np.testing.assert_allclose(got, want, rtol=0, atol=2 * float(np.spacing(np.abs(want).max())))
