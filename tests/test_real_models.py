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
