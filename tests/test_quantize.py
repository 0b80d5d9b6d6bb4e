"""Linear quantization: the kernel's grids, half-step error, per-consumer axes, the sidecar round
trip, DequantizeLinear forms (int8/int4, per tensor/channel/block), zeros kept, checker + onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper
from typer.testing import CliRunner

from modelsqueeze.cli import app
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels import quant
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair
from modelsqueeze.passes import LayerRule
from modelsqueeze.passes.quantize import QuantizeConfig, quantize
from modelsqueeze.sidecar import decode_sidecar, encode_sidecar, read_sidecar
from modelsqueeze.tensor import CompressedTensor

from conftest import SAMPLES, make_mlp
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes

runner = CliRunner()
LENET5 = SAMPLES / "lenet5.onnx"


def cli(command: str, src: Path, out: Path, *args) -> dict:
    result = runner.invoke(app, [command, str(src), "-o", str(out), *map(str, args), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------
# Kernel


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                  elements=st.floats(-100, 100, allow_nan=False, width=32)),
       st.integers(2, 8), st.booleans(), st.booleans(), st.data())
def test_minmax_quantization_is_within_half_a_step(w, bits, signed, symmetric, data):
    axis = data.draw(st.sampled_from([None, *range(w.ndim)]))
    block = data.draw(st.sampled_from([0, 1, 2, 4])) if axis is not None else 0
    layout = quant.Layout(w.shape, axis, block)
    scale, zp = quant.choose_params(w, layout, bits, signed, symmetric)
    q = quant.quantize(w, layout, scale, zp, bits, signed)
    qmin, qmax = quant.qrange(bits, signed)
    assert q.min() >= qmin and q.max() <= qmax
    deq = quant.dequantize(q, layout, scale, zp)
    step = layout.expand(scale).astype(np.float64)
    assert np.all(np.abs(deq.astype(np.float64) - w) <= step / 2 * (1 + 1e-5) + 1e-6)
    assert np.all(deq[w == 0] == 0)  # zero is exactly representable


def test_clipping_ranges():
    w = np.concatenate([np.random.default_rng(0).standard_normal(10000), [40.0]]).astype(np.float32)
    layout = quant.Layout(w.shape)
    s_minmax, _ = quant.choose_params(w, layout, 4, True, True, "minmax")
    s_pct, _ = quant.choose_params(w, layout, 4, True, True, "percentile", 99.0)
    s_mse, _ = quant.choose_params(w, layout, 4, True, True, "mse")
    assert s_pct < s_minmax and s_mse < s_minmax  # the outlier no longer sets the step

    def err(scale):
        zp = np.zeros((), np.int64)
        return float(np.sum((quant.dequantize(quant.quantize(w, layout, scale, zp, 4, True), layout, scale, zp) - w) ** 2))

    assert err(s_mse) <= err(s_minmax)


def test_layout_param_shapes():
    assert quant.Layout((6, 10)).param_shape == ()
    assert quant.Layout((6, 10), 0).param_shape == (6,)
    assert quant.Layout((6, 10), 1, 4).param_shape == (6, 3)
    groups = quant.Layout((2, 5), 1, 2).groups()
    assert groups.tolist() == [[0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.booleans(), st.booleans(), st.sampled_from(["tensor", "channel", "block"]))
def test_quant_records_round_trip_through_the_sidecar(bits, signed, sparse, granularity):
    w = np.random.default_rng(bits).standard_normal((5, 12)).astype(np.float32)
    if sparse:
        w[np.abs(w) < 0.8] = 0
    layout = {"tensor": quant.Layout(w.shape), "channel": quant.Layout(w.shape, 0),
              "block": quant.Layout(w.shape, 1, 5)}[granularity]
    scale, zp = quant.choose_params(w, layout, bits, signed, False)
    q = quant.quantize(w, layout, scale, zp, bits, signed).reshape(-1) - quant.qrange(bits, signed)[0]
    positions = np.flatnonzero(w) if sparse else None
    record = CompressedTensor("w", w.shape, "float32", indices=(q if positions is None else q[positions]).astype(np.uint8),
                              index_bits=bits, scale=scale, zero_point=zp, quant_axis=layout.axis,
                              block_size=layout.block_size, signed=signed, positions=positions)
    back = decode_sidecar(encode_sidecar([record], bytes(32))).records["w"]
    assert back.kind == record.kind and np.array_equal(back.decode().view(np.uint32), record.decode().view(np.uint32))
    assert np.array_equal(back.scale, record.scale) and np.array_equal(back.zero_point, record.zero_point)


def test_bad_quant_records():
    ok = dict(indices=np.zeros(4, np.uint8), index_bits=4, scale=np.ones(2, np.float32),
              zero_point=np.zeros(2, np.int64), quant_axis=0)
    CompressedTensor("w", (2, 2), "float32", **ok)
    for bad, message in [({"scale": np.ones(3, np.float32)}, "shape"), ({"scale": np.array([1.0, -1.0], np.float32)}, "positive"),
                         ({"zero_point": np.array([0, 99])}, "grid"), ({"quant_axis": 2}, "axis"),
                         ({"block_size": 2, "quant_axis": None}, "block")]:
        with pytest.raises(ModelSqueezeError, match=message):
            CompressedTensor("w", (2, 2), "float32", **{**ok, **bad})


# ---------------------------------------------------------------------------------------------
# The command


def run(model_or_path, feeds: dict) -> np.ndarray:
    source = model_to_bytes(model_or_path) if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits, granularity, q_type, opset", [
    (8, "tensor", onnx.TensorProto.INT8, 17), (8, "channel", onnx.TensorProto.INT8, 17),
    (4, "channel", onnx.TensorProto.INT4, 21), (4, "block", onnx.TensorProto.INT4, 21),
    (8, "block", onnx.TensorProto.INT8, 21)])
def test_dequantize_linear_forms(tmp_path, bits, granularity, q_type, opset):
    out = tmp_path / "q.onnx"
    summary = cli("quantize", LENET5, out, "--bits", bits, "--granularity", granularity,
                  "--validate", SAMPLES / "lenet5.npz")
    model = onnx.load_model(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    # conv1, conv2, fc1, fc2 (conv1's 1-wide input axis would make blocks of one weight: it is
    # quantized per channel instead)
    assert len(dq) == 4
    q_types = {t.data_type for t in model.graph.initializer if t.name.endswith("::q")}
    assert q_types == {q_type}
    # The graph's weights are exactly the sidecar's decoded records.
    side = read_sidecar(out.with_suffix(".msq"))
    for node in dq:
        graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
                                  [t for t in model.graph.initializer if t.name in node.input])
        single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        assert np.array_equal(run(single, {}), side.records[node.output[0]].decode())
    x, y = np.load(SAMPLES / "lenet5.npz")["x"], np.load(SAMPLES / "lenet5.npz")["y"]
    assert summary["accuracy_after"] == pytest.approx(np.mean(run(out, {"x": x}).argmax(1) == y))
    assert summary["drop_pp"] < 1.0
    ratio = summary["packed_bytes_before"] / summary["packed_bytes_after"]
    assert ratio > {8: 3.3, 4: 5.5}[bits]


def test_channel_axis_follows_each_consumer(tmp_path):
    out = tmp_path / "q.onnx"
    cli("quantize", LENET5, out, "--bits", 8, "--granularity", "channel")
    side = read_sidecar(out.with_suffix(".msq"))
    # conv: filters (axis 0); MatMul fc1 [in, out]: axis 1; Gemm fc2 with transB [out, in]: axis 0.
    axes = {name: (r.quant_axis, r.scale.shape) for name, r in side.records.items()}
    assert axes == {"conv1.weight": (0, (20,)), "conv2.weight": (0, (50,)), "fc1.weight": (1, (500,)),
                    "fc2.weight": (0, (10,))}
    blocks = tmp_path / "b.onnx"
    cli("quantize", LENET5, blocks, "--bits", 4, "--granularity", "block", "--block-size", 64)
    side = read_sidecar(blocks.with_suffix(".msq"))
    # blocks run along the input axis: conv axis 1, MatMul [in, out] axis 0, Gemm transB axis 1
    assert {n: (r.quant_axis, r.scale.shape) for n, r in side.records.items()} == {
        # conv1's input axis is 1 wide: blocks would hold one weight each, so it gets one scale per channel
        "conv1.weight": (0, (20,)), "conv2.weight": (1, (50, 1, 5, 5)),
        "fc1.weight": (0, (13, 500)), "fc2.weight": (1, (10, 8))}


def test_recurrent_and_embedding_axes(tmp_path):
    out = tmp_path / "l.onnx"
    summary = cli("quantize", SAMPLES / "lstm_digits.onnx", out, "--bits", 8, "--validate", SAMPLES / "lstm_digits.npz")
    side = read_sidecar(out.with_suffix(".msq"))
    assert side.records["lstm.W"].quant_axis == 1 and side.records["lstm.W"].scale.shape == (256,)
    assert summary["drop_pp"] < 1.0
    out = tmp_path / "t.onnx"
    cli("quantize", SAMPLES / "tiny_transformer.onnx", out, "--bits", 8)
    side = read_sidecar(out.with_suffix(".msq"))
    assert side.records["tok_emb.weight"].quant_axis == 0 and side.records["tok_emb.weight"].scale.shape == (17,)


def test_pruned_zeros_stay_zero_and_sidecar_stays_sparse(tmp_path):
    pruned, q = tmp_path / "p.onnx", tmp_path / "q.onnx"
    cli("prune", LENET5, pruned, "--sparsity", 0.9, "--scope", "global")
    cli("quantize", pruned, q, "--bits", 4, "--granularity", "channel", "--affine", "--unsigned")
    before = {w.key: w.array() for w in find_weights(load_pair(pruned).model)}
    after = {w.key: w.array() for w in find_weights(load_pair(q).model)}
    side = read_sidecar(q.with_suffix(".msq"))
    for name in ("conv2.weight", "fc1.weight"):
        assert np.array_equal(after[name] == 0, before[name] == 0)
        assert side.records[name].positions is not None
    x = np.load(SAMPLES / "lenet5.npz")["x"][:20]
    dense = tmp_path / "d.onnx"
    assert runner.invoke(app, ["unpack", str(q), "-o", str(dense)]).exit_code == 0
    # Same weights bit for bit; onnxruntime may sum a computed weight in another order.
    assert np.allclose(run(q, {"x": x}), run(dense, {"x": x}), rtol=1e-5, atol=1e-5)


def test_opset_upgrade_failure_keeps_floats(tmp_path, monkeypatch):
    def refuse(model, target):
        raise RuntimeError("adapter missing")

    monkeypatch.setattr("modelsqueeze.passes.quantize.version_converter.convert_version", refuse)
    out = tmp_path / "q.onnx"
    summary = cli("quantize", LENET5, out, "--bits", 4)
    assert any("could not be upgraded" in n for n in summary["notes"])
    model = onnx.load_model(str(out))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    # 4-bit codes still live in the graph, but in int8 containers (opset 17 has no int4).
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("::q")} == {onnx.TensorProto.INT8}
    assert read_sidecar(out.with_suffix(".msq")).records["fc1.weight"].index_bits == 4


@pytest.mark.parametrize("args, message", [
    (["--bits", "9"], "2 to 8"), (["--bits", "1"], "2 to 8"), (["--granularity", "row"], "--granularity"),
    (["--range", "max"], "--range"), (["--block-size", "0"], "--block-size"), (["--percentile", "10"], "--percentile"),
    (["--percentile", "nan"], "finite")])
def test_bad_options(tmp_path, args, message):
    result = runner.invoke(app, ["quantize", str(LENET5), "-o", str(tmp_path / "q.onnx"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_denormal_ranges_keep_a_positive_float32_scale():
    w = np.array([1e-45, 0.0], np.float32)  # found by hypothesis: the step underflowed to 0
    layout = quant.Layout(w.shape)
    for signed in (True, False):
        for symmetric in (True, False):
            scale, zp = quant.choose_params(w, layout, 2, signed, symmetric)
            assert scale > 0 and np.isfinite(scale)
            q = quant.quantize(w, layout, scale, zp, 2, signed)
            assert np.all(quant.dequantize(q, layout, scale, zp) == 0)


# ---------------------------------------------------------------------------------------------
# Per-layer bits (the pass; fc1_w feeds a Gemm, fc2_w a MatMul; biases are not selected)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: store.to_array(t) for t in model.graph.initializer}


def _same_records(a: CompressedTensor, b: CompressedTensor) -> bool:
    return (a.index_bits == b.index_bits and np.array_equal(a.indices, b.indices) and np.array_equal(a.scale, b.scale)
            and np.array_equal(a.zero_point, b.zero_point) and a.quant_axis == b.quant_axis
            and np.array_equal(a.positions, b.positions))


def test_per_layer_bits_override_gives_that_layer_its_own_bits():
    model = make_mlp()
    config = QuantizeConfig(bits=LayerRule.parse("fc1*=4,8", "--bits"))
    result = quantize(model, {}, config)
    assert sorted(result.changed) == ["fc1_w", "fc2_w"]
    assert result.records["fc1_w"].index_bits == 4 and result.records["fc2_w"].index_bits == 8
    assert result.records["fc1_w"].indices.max() <= 15
    # Each tensor is exactly what a single-width run gives it.
    for name, bits in (("fc1_w", 4), ("fc2_w", 8)):
        alone = quantize(model, {}, QuantizeConfig(bits=bits)).records[name]
        assert _same_records(result.records[name], alone)
    # The 4-bit override needs opset 21 even though the default is 8.
    assert config.needed_opset == 21
    assert next(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")) == 21
    weights = _weights(result.model)
    for name in ("fc1_w", "fc2_w"):
        assert np.array_equal(weights[name], result.records[name].decode())


def test_override_without_default_quantizes_only_the_matching_tensor():
    model = make_mlp()
    result = quantize(model, {}, QuantizeConfig(bits=LayerRule(overrides=(("fc2*", 4.0),))))
    assert result.changed == ["fc2_w"] and list(result.records) == ["fc2_w"]
    assert result.records["fc2_w"].index_bits == 4
    before, after = _weights(model), _weights(result.model)
    assert np.array_equal(after["fc1_w"], before["fc1_w"])  # left alone, bit for bit
    assert not np.array_equal(after["fc2_w"], before["fc2_w"])
    # Consumer node names match too; a rule matching nothing changes nothing (and upgrades nothing).
    assert quantize(model, {}, QuantizeConfig(bits=LayerRule(overrides=(("MatMul_*", 6.0),)))).changed == ["fc2_w"]
    untouched = quantize(model, {}, QuantizeConfig(bits=LayerRule(overrides=(("conv*", 4.0),))))
    assert untouched.changed == [] and untouched.records == {}
    assert next(o.version for o in untouched.model.opset_import if o.domain in ("", "ai.onnx")) == 17


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_int_bits_equal_a_layer_rule_default(bits, granularity):
    model = make_mlp()
    plain = QuantizeConfig(bits=bits, granularity=granularity, block_size=3)
    rule = QuantizeConfig(bits=LayerRule(default=float(bits)), granularity=granularity, block_size=3)
    assert plain == rule and isinstance(plain.bits, LayerRule) and plain.needed_opset == rule.needed_opset
    a, b = quantize(model, {}, plain), quantize(model, {}, rule)
    assert a.changed == b.changed == ["fc1_w", "fc2_w"]
    for name in a.changed:
        assert a.records[name].index_bits == bits
        assert _same_records(a.records[name], b.records[name])
    assert model_to_bytes(a.model) == model_to_bytes(b.model)


def test_default_bits_and_needed_opset():
    assert QuantizeConfig().bits == LayerRule(8.0)
    assert QuantizeConfig.__dataclass_fields__["bits"].type in (LayerRule, "LayerRule")
    assert QuantizeConfig(bits=8, granularity="tensor").needed_opset == 10
    assert QuantizeConfig(bits=5, granularity="channel").needed_opset == 13
    assert QuantizeConfig(bits=8, granularity="block").needed_opset == 21
    assert QuantizeConfig(bits=LayerRule(8.0, (("fc1*", 3.0),)), granularity="tensor").needed_opset == 21
    assert QuantizeConfig(bits=LayerRule(None, (("fc1*", 6.0),)), granularity="channel").needed_opset == 13


@pytest.mark.parametrize("bits", [
    1, 9, 4.5, LayerRule(1.0), LayerRule(9.0), LayerRule(4.5), LayerRule(8.0, (("fc1*", 1.0),)),
    LayerRule(8.0, (("fc1*", 9.0),)), LayerRule(None, (("fc1*", 4.5),)), LayerRule(float("nan"))])
def test_bad_bits(bits):
    with pytest.raises(ModelSqueezeError, match="--bits .*: expected 2 to 8"):
        QuantizeConfig(bits=bits)


def test_empty_bits_rule():
    with pytest.raises(ModelSqueezeError, match="no value"):
        QuantizeConfig(bits=LayerRule())


def test_cli_takes_per_layer_bits(tmp_path):
    from modelsqueeze.pack import load_pair

    out = tmp_path / "mixed.onnx"
    cli("quantize", SAMPLES / "lenet300.onnx", out, "--bits", "fc1*=3,fc3*=8,4")
    records = load_pair(out).records
    assert {k: r.index_bits for k, r in records.items()} == {"fc1.weight": 3, "fc2.weight": 4, "fc3.weight": 8}
