"""Issue 16: what third-party exporters do that our samples never showed, each on a small model
written for it (ONNX text): weights behind shape-only ops, names with '::', metadata, IR versions,
layouts that cannot pay, tiny tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelsqueeze import store
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair

from cli_helpers import invoke, ok

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
