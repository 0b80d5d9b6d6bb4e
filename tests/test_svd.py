"""Low-rank factorization: the kernel's Eckart-Young error and rank choices, the budget allocator,
exact MatMul / Gemm / Conv rewrites (checked by onnxruntime), parameter and MAC counts, what is left
alone, records, the factors as ordinary weights for later passes, and bad options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels import lowrank
from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair, write_pair
from modelsqueeze.passes import LayerRule, Selection
from modelsqueeze.passes.prune import PruneConfig, prune
from modelsqueeze.passes.quantize import QuantizeConfig, quantize
from modelsqueeze.passes.svd import SvdConfig, svd

from conftest import SAMPLES
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes

LENET300 = SAMPLES / "lenet300.onnx"
LENET5 = SAMPLES / "lenet5.onnx"


def rule(text: str, option: str = "--option") -> LayerRule:
    return LayerRule.parse(text, option)


def low_rank(shape: tuple[int, int], rank: int, seed: int = 0) -> np.ndarray:
    """A float32 matrix of exactly `rank` (up to rounding): the 'full rank' a factorization can reproduce."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))).astype(np.float32)


def with_arrays(text: str, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def written(tmp_path: Path, result, name: str = "out.onnx"):
    """Write the pass's output as a pair (write_pair runs the full checker) and read it back."""
    out = tmp_path / name
    write_pair(result.model, list(result.records.values()), out)
    return load_pair(out)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: store.to_array(t) for t in model.graph.initializer}


def singular_values(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


# ---------------------------------------------------------------------------------------------
# Kernel


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.integers(0, 2**31 - 1), st.data())
def test_factor_error_is_the_discarded_singular_values(k, n, seed, data):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    rank = data.draw(st.integers(1, min(k, n)))
    f = lowrank.factorize(w, rank)
    assert f.a.shape == (k, rank) and f.b.shape == (rank, n) and f.a.dtype == f.b.dtype == np.float32
    s = singular_values(w)
    expected = np.sqrt(np.sum(s[rank:] ** 2)) / np.linalg.norm(w.astype(np.float64))
    measured = np.linalg.norm(w.astype(np.float64) - f.a.astype(np.float64) @ f.b) / np.linalg.norm(w.astype(np.float64))
    assert abs(measured - expected) < 1e-5  # Eckart-Young
    assert abs(f.relative_error - expected) < 1e-5 and abs(f.optimal_error - expected) < 1e-6
    assert abs(f.kept_energy - np.sum(s[:rank] ** 2) / np.sum(s**2)) < 1e-6
    # The singular values are split evenly: both factors have the same spectral norm sqrt(s1).
    assert np.allclose([np.linalg.norm(f.a, 2), np.linalg.norm(f.b, 2)], np.sqrt(s[0]), rtol=1e-4)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30), st.integers(0, 2**31 - 1), st.floats(0.05, 1.0), st.floats(0.0, 0.95))
def test_rank_choices_are_the_smallest_that_meet_them(k, n, seed, keep, max_error):
    w = np.random.default_rng(seed).standard_normal((k, n))
    s2 = singular_values(w) ** 2
    spectrum = lowrank.energies(w)
    assert np.allclose(spectrum, s2, rtol=1e-9, atol=1e-9 * s2[0])
    discarded = np.array([s2[r:].sum() for r in range(1, s2.size + 1)]) / s2.sum()  # by rank 1..
    r = lowrank.rank_for_energy(spectrum, keep)
    assert 1 - discarded[r - 1] >= keep - 1e-12 and (r == 1 or 1 - discarded[r - 2] < keep + 1e-12)
    r = lowrank.rank_for_error(spectrum, max_error)
    error = np.sqrt(discarded)
    assert error[r - 1] <= max_error + 1e-9 and (r == 1 or error[r - 2] > max_error - 1e-9)
    for ratio in (0.1, 0.5, 0.99):
        r = lowrank.rank_for_ratio(k, n, ratio)
        assert r * (k + n) <= ratio * k * n < (r + 1) * (k + n) or r == min(k, n)
    limit = lowrank.saving_rank_limit(k, n)
    assert limit * (k + n) < k * n <= (limit + 1) * (k + n)


def test_randomized_svd_is_used_where_faster_at_equal_error():
    rng = np.random.default_rng(3)
    # A slowly decaying spectrum, like trained layers, on a matrix big enough for the randomized path.
    u, _ = np.linalg.qr(rng.standard_normal((640, 520)))
    v, _ = np.linalg.qr(rng.standard_normal((520, 520)))
    w = ((u * np.arange(1, 521) ** -0.4) @ v.T).astype(np.float32)
    fast = lowrank.factorize(w, 24)
    assert fast.method == "randomized" and lowrank.prefers_randomized(640, 520, 24)
    exact = lowrank.factorize(w, 24, method="exact")
    assert fast.relative_error <= exact.relative_error * (1 + lowrank.ERROR_TOLERANCE) + 1e-6
    assert lowrank.factorize(w, 24).a.tobytes() == fast.a.tobytes()  # deterministic
    assert lowrank.factorize(w, 200).method == "exact"  # a large rank: exact SVD


def test_allocator_meets_the_budget_and_prefers_the_flat_spectrum():
    rng = np.random.default_rng(0)
    flat = rng.standard_normal((40, 30))
    steep = low_rank((40, 30), 2, seed=1) + 1e-3 * rng.standard_normal((40, 30))
    spectra = [lowrank.energies(flat), lowrank.energies(steep)]
    shapes = [(40, 30), (40, 30)]
    for budget in (140, 500, 1000, 2000):
        ranks = lowrank.allocate_ranks(spectra, shapes, budget)
        cost = sum(40 * 30 if r == 0 else r * 70 for r in ranks)
        assert cost <= budget
    ranks = lowrank.allocate_ranks(spectra, shapes, 1000)
    assert ranks[1] == 2 and ranks[0] > 2  # the steep layer is done at its rank; the rest goes to the flat one
    with pytest.raises(ValueError):
        lowrank.allocate_ranks(spectra, shapes, 139)
    # A budget that holds both whole keeps both whole.
    assert lowrank.allocate_ranks(spectra, shapes, 2400) == [0, 0]


# ---------------------------------------------------------------------------------------------
# MatMul and Gemm rewrites


MATMUL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 5, 24] x) => (float[N, 5, 20] y) {
  h = MatMul(x, W)
  y = Relu(h)
}
"""


def test_matmul_at_full_rank_reproduces_the_outputs(tmp_path):
    w = low_rank((24, 20), 4)
    model = with_arrays(MATMUL, {"W": w})
    result = svd(model, {}, SvdConfig(rank=rule("4")))
    pair = written(tmp_path, result)
    x = np.random.default_rng(1).standard_normal((3, 5, 24)).astype(np.float32)
    np.testing.assert_allclose(run(pair.runnable(), {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    inits = initializers(pair.model)
    assert "W" not in inits and inits["W.svd_in"].shape == (24, 4) and inits["W.svd_out"].shape == (4, 20)
    assert [n.op_type for n in pair.model.graph.node] == ["MatMul", "MatMul", "Relu"]
    assert len({n.name for n in pair.model.graph.node}) == 3
    assert result.changed == ["W.svd_in", "W.svd_out"]


def test_truncated_matmul_computes_its_factors_and_the_eckart_young_error(tmp_path):
    w = np.random.default_rng(2).standard_normal((24, 20)).astype(np.float32)
    model = with_arrays(MATMUL, {"W": w})
    result = svd(model, {}, SvdConfig(rank=rule("3")))
    pair = written(tmp_path, result)
    inits = initializers(pair.model)
    approx = inits["W.svd_in"].astype(np.float64) @ inits["W.svd_out"]
    s = singular_values(w)
    error = np.linalg.norm(w - approx) / np.linalg.norm(w.astype(np.float64))
    assert abs(error - np.sqrt(np.sum(s[3:] ** 2)) / np.sqrt(np.sum(s**2))) < 1e-5
    (layer,) = result.layers
    assert abs(layer.relative_error - error) < 1e-6 and layer.rank == 3
    x = np.random.default_rng(3).standard_normal((2, 5, 24)).astype(np.float32)
    expected = np.maximum(x.astype(np.float64) @ approx, 0)
    np.testing.assert_allclose(run(pair.runnable(), {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("bias", ["none", "vector", "matrix"])
def test_gemm_variants_are_exact_at_full_rank(tmp_path, trans_a, trans_b, alpha, beta, bias):
    k, n, rows = 24, 20, 3
    a_shape = f"{k}, {rows}" if trans_a else f"{rows}, {k}"
    c_arg = "" if bias == "none" else ", C"
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[{a_shape}] a) => (float[{rows}, {n}] y) {{
      y = Gemm<transA = {trans_a}, transB = {trans_b}, alpha = {alpha}, beta = {beta}>(a, B{c_arg})
    }}
    """
    w = low_rank((k, n), 5)  # op(B)
    arrays = {"B": w.T if trans_b else w}
    if bias != "none":
        arrays["C"] = np.random.default_rng(4).standard_normal((n,) if bias == "vector" else (rows, n))
    model = with_arrays(text, arrays)
    result = svd(model, {}, SvdConfig(rank=rule("5")))
    pair = written(tmp_path, result)
    feed = {"a": np.random.default_rng(5).standard_normal(tuple(int(d) for d in a_shape.split(", "))).astype(np.float32)}
    np.testing.assert_allclose(run(pair.runnable(), feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-4)
    gemm = pair.model.graph.node[-1]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert gemm.op_type == "Gemm" and attrs.get("alpha", 1.0) == alpha and attrs.get("beta", 1.0) == beta
    assert "transA" not in attrs and "transB" not in attrs
    assert [x.op_type for x in pair.model.graph.node] == ["Transpose"] * trans_a + ["MatMul", "Gemm"]


def test_gemm_at_an_old_opset_keeps_its_required_bias(tmp_path):
    text = """
    <ir_version: 3, opset_import: ["" : 7]>
    g (float[2, 24] x, float[24, 20] B, float[20] C) => (float[2, 20] y) {
      y = Gemm<alpha = 2.0>(x, B, C)
    }
    """
    # IR 3: initializers are also graph inputs, so the factors must be too.
    model = with_arrays(text, {"B": low_rank((24, 20), 4), "C": np.arange(20)})
    result = svd(model, {}, SvdConfig(rank=rule("4")))
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == ["x", "B.svd_in", "B.svd_out", "C"]
    x = np.random.default_rng(6).standard_normal((2, 24)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Conv rewrites


@pytest.mark.parametrize("attrs,with_bias", [
    ("kernel_shape = [3, 3]", True),
    ("kernel_shape = [3, 3], strides = [2, 1], pads = [1, 2, 0, 1], dilations = [1, 2]", True),
    ("kernel_shape = [3, 3], auto_pad = \"SAME_UPPER\", strides = [2, 2]", False),
    ("kernel_shape = [3, 3], dilations = [2, 2], pads = [2, 2, 2, 2]", False),
])
def test_conv_keeps_its_attributes_and_is_exact_at_full_rank(tmp_path, attrs, with_bias):
    m, c = 16, 6
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, {c}, 11, 13] x) => (float[N, {m}, ?, ?] y) {{
      y = Conv<{attrs}>(x, W{", b" if with_bias else ""})
    }}
    """
    w = low_rank((m, c * 9), 4).reshape(m, c, 3, 3)
    arrays = {"W": w} | ({"b": np.linspace(-1, 1, m)} if with_bias else {})
    model = with_arrays(text, arrays)
    result = svd(model, {}, SvdConfig(rank=rule("4")))
    pair = written(tmp_path, result)
    first, second = pair.model.graph.node
    original = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert {a.name: helper.get_attribute_value(a) for a in first.attribute} == original
    assert list(first.input)[1] == "W.svd_in" and len(first.input) == 2  # no bias on the k x k step
    assert list(second.input)[1:] == ["W.svd_out"] + (["b"] if with_bias else [])
    assert {a.name: helper.get_attribute_value(a) for a in second.attribute} == {"kernel_shape": [1, 1]}
    inits = initializers(pair.model)
    assert inits["W.svd_in"].shape == (4, c, 3, 3) and inits["W.svd_out"].shape == (m, 4, 1, 1)
    x = np.random.default_rng(7).standard_normal((2, c, 11, 13)).astype(np.float32)
    np.testing.assert_allclose(run(pair.runnable(), {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_one_dimensional_conv(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 30] x) => (float[N, 12, ?] y) { y = Conv<kernel_shape = [5], strides = [2]>(x, W, b) }
    """
    model = with_arrays(text, {"W": low_rank((12, 40), 3).reshape(12, 8, 5), "b": np.ones(12)})
    result = svd(model, {}, SvdConfig(rank=rule("3")))
    pair = written(tmp_path, result)
    x = np.random.default_rng(8).standard_normal((2, 8, 30)).astype(np.float32)
    np.testing.assert_allclose(run(pair.runnable(), {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Where it pays, and what is left alone


def test_a_layer_is_factored_only_where_it_saves_parameters():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, float[N, 24] z) => (float[N, 4] y, float[N, 20] v) { y = MatMul(x, S)  v = MatMul(z, W) }
    """
    model = with_arrays(text, {"S": low_rank((4, 4), 2), "W": np.random.default_rng(0).standard_normal((24, 20))})
    # rank 2 of a 4x4 matrix: 2 * (4 + 4) = 16 parameters, not fewer than 16.
    result = svd(model, {}, SvdConfig(rank=rule("2")))
    assert [layer.weight for layer in result.layers] == ["W"]
    assert any(note.startswith("S: --rank 2 needs rank 2") for note in result.notes)
    # An energy the truncation keeps only near full rank saves nothing either.
    result = svd(model, {}, SvdConfig(energy=rule("0.999")))
    assert result.layers == [] and result.changed == []
    assert any(n.startswith("W: --energy 0.999 needs rank") and "up to rank 10" in n for n in result.notes)
    assert initializers(result.model).keys() == {"S", "W"}


def test_parameter_and_mac_counts_fall_as_reported(tmp_path):
    src = load_pair(LENET5)
    result = svd(src.model, src.records, SvdConfig(ratio=rule("0.5")))
    pair = written(tmp_path, result)
    before = {w.key: w.n_params for w in find_weights(src.model)}
    after = {w.key: w.n_params for w in find_weights(pair.model)}
    saved = sum(layer.params_before - layer.params_after for layer in result.layers)
    assert sum(after.values()) == sum(before.values()) - saved > 0
    by_name = {layer.weight: layer for layer in result.layers}
    for layer in result.layers:
        first, second = layer.factors
        assert after[first] + after[second] == layer.params_after <= 0.5 * layer.params_before
        assert layer.weight not in after and before[layer.weight] == layer.params_before
    conv1, conv2 = by_name["conv1.weight"], by_name["conv2.weight"]
    assert conv1.matrix == (20, 25) and conv1.positions == 24 * 24
    assert (conv1.macs_before, conv1.macs_after) == (20 * 25, conv1.rank * 25 + 20 * conv1.rank)
    assert conv2.positions == 8 * 8 and conv2.macs_after == conv2.rank * (20 * 25 + 50)
    fc1 = by_name["fc1.weight"]
    assert fc1.positions == 1 and (fc1.macs_before, fc1.macs_after) == (800 * 500, fc1.rank * 1300)
    assert any(n.startswith("conv2.weight (Conv conv2, 50x500): rank") and "MACs 1,600,000 ->" in n for n in result.notes)
    assert result.notes[-1].startswith("svd: 4 layer(s) factored, params 430,500 -> ")
    # The factors are ordinary Conv / MatMul / Gemm weights to every later pass.
    roles = {w.key: (w.role, w.ops) for w in find_weights(pair.model)}
    assert roles["conv2.weight.svd_in"] == ("weight", "Conv") and roles["conv2.weight.svd_out"] == ("weight", "Conv")
    assert roles["fc1.weight.svd_in"] == ("weight", "MatMul") and roles["fc1.weight.svd_out"] == ("weight", "MatMul")
    assert roles["fc2.weight.svd_out"] == ("weight", "Gemm")


def test_dynamic_spatial_size_reports_macs_per_output_position():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 6, H, W] x) => (float[N, 16, ?, ?] y) { y = Conv<kernel_shape = [3, 3]>(x, K) }
    """
    result = svd(with_arrays(text, {"K": low_rank((16, 54), 3).reshape(16, 6, 3, 3)}), {}, SvdConfig(rank=rule("3")))
    (layer,) = result.layers
    assert layer.positions is None and (layer.macs_before, layer.macs_after) == (16 * 54, 3 * 70)
    assert "per output position" in result.notes[0]


def test_cases_it_does_not_factor_are_left_alone_and_listed():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8, 10, 10] x, float[N, 24] z, float[N, 2, 24] t, bool c) => (float[N, 8, 8, 8] a, float[N, 4, 12, 12] b,
                                                                      float[N, 20] d, float[N, 20] e, float[N, 2, 20] f, float[N, 20] s) {
      a = Conv<kernel_shape = [3, 3], group = 2>(x, G)
      b = ConvTranspose<kernel_shape = [3, 3]>(x, T)
      d = MatMul(z, Shared)
      e = MatMul(z, Shared)
      f = MatMul(t, Batched)
      s = If(c) <then_branch = th () => (float[N, 20] o) { o = MatMul(z, Inner) },
                 else_branch = el () => (float[N, 20] o2) { o2 = MatMul(z, Inner) }>
    }
    """
    rng = np.random.default_rng(0)
    arrays = {"G": rng.standard_normal((8, 4, 3, 3)), "T": rng.standard_normal((8, 4, 3, 3)),
              "Shared": rng.standard_normal((24, 20)), "Batched": rng.standard_normal((2, 24, 20)),
              "Inner": rng.standard_normal((24, 20))}
    model = with_arrays(text, arrays)
    result = svd(model, {}, SvdConfig(rank=rule("2")))
    assert result.layers == [] and result.model.graph == model.graph
    notes = "\n".join(result.notes)
    for expected in ("G: feeds a grouped Conv (group=2)", "T: is a ConvTranspose weight", "Shared: is read by 2 nodes",
                     "Batched: is a 3-D MatMul weight", "Inner: is read by 2 nodes"):
        assert expected in notes


def test_per_layer_rules_and_the_selection():
    src = load_pair(LENET300)
    result = svd(src.model, src.records, SvdConfig(energy=rule("fc1*=0.95,0.5"), selection=Selection(exclude=("fc3*",))))
    ranks = {layer.weight: layer for layer in result.layers}
    assert set(ranks) == {"fc1.weight", "fc2.weight"}
    assert ranks["fc1.weight"].kept_energy >= 0.95 and 0.5 <= ranks["fc2.weight"].kept_energy < 0.95
    only = svd(src.model, src.records, SvdConfig(rank=rule("fc2*=7")))  # no default: other layers untouched
    assert [(layer.weight, layer.rank) for layer in only.layers] == [("fc2.weight", 7)]


# ---------------------------------------------------------------------------------------------
# Budgets, records, later passes, determinism


def test_target_params_meets_the_budget(tmp_path):
    src = load_pair(LENET300)
    total = sum(w.n_params for w in find_weights(src.model))
    for budget in (30_000, 60_000, 120_000):
        result = svd(src.model, src.records, SvdConfig(target_params=budget))
        pair = written(tmp_path, result, f"b{budget}.onnx")
        params = sum(w.n_params for w in find_weights(pair.model))
        assert params <= budget and params > 0.95 * budget  # the budget is used, not squandered
    unchanged = svd(src.model, src.records, SvdConfig(target_params=total))
    assert unchanged.layers == [] and "already within" in unchanged.notes[0]
    with pytest.raises(ModelSqueezeError, match="unreachable; the fewest parameters svd can leave is 2,004"):
        svd(src.model, src.records, SvdConfig(target_params=1_000))


def test_records_of_factored_tensors_are_dropped_and_the_factors_compress_later(tmp_path):
    src = load_pair(LENET300)
    pruned = prune(src.model, src.records, PruneConfig(sparsity=rule("0.5")))
    pruned_pair = written(tmp_path, pruned, "pruned.onnx")
    assert set(pruned_pair.records) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    result = svd(pruned_pair.model, pruned_pair.records, SvdConfig(rank=rule("fc1*=20,fc2*=10")))
    assert set(result.records) == {"fc3.weight"}
    assert "fc1.weight: its sparse+raw record is dropped; the factors are plain weights" in "\n".join(result.notes)
    factored = written(tmp_path, result, "factored.onnx")
    quantized = quantize(factored.model, factored.records, QuantizeConfig(bits=8))
    assert {"fc1.weight.svd_in", "fc1.weight.svd_out", "fc2.weight.svd_in", "fc2.weight.svd_out"} <= set(quantized.changed)
    final = written(tmp_path, quantized, "final.onnx")
    x = np.load(SAMPLES / "lenet300.npz")["x"][:64]
    logits = run(final.runnable(), {"x": x})[0]
    reference = run(factored.runnable(), {"x": x})[0]
    assert logits.shape == (64, 10) and np.mean(logits.argmax(1) == reference.argmax(1)) > 0.95


def test_same_input_same_output_bytes(tmp_path):
    src = load_pair(LENET5)
    config = SvdConfig(energy=rule("0.8"))
    a, b = (svd(src.model, src.records, config) for _ in range(2))
    assert model_to_bytes(a.model) == model_to_bytes(b.model) and a.notes == b.notes


def test_stale_value_info_is_cleared():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 24] x) => (float[N, 20] y) <float[24, 20] W> { h = MatMul(x, W)  y = Relu(h) }
    """
    model = onnx.parser.parse_model(text)
    del model.graph.initializer[:]
    model.graph.initializer.append(numpy_helper.from_array(low_rank((24, 20), 3), "W"))
    model.graph.value_info.extend([helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [24, 20]),
                                   helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["N", 20])])
    result = svd(model, {}, SvdConfig(rank=rule("3")))
    assert [v.name for v in result.model.graph.value_info] == ["h"]
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of --rank, --energy"),
    ({"rank": rule("4"), "energy": rule("0.9")}, r"\(got --rank, --energy\)"),
    ({"rank": rule("0")}, "--rank values must be whole numbers"),
    ({"rank": rule("2.5")}, "--rank values must be whole numbers"),
    ({"energy": rule("0")}, r"--energy values must lie in \(0, 1\]"),
    ({"energy": rule("fc1=1.5,0.9")}, r"--energy values must lie in \(0, 1\]"),
    ({"ratio": rule("1")}, r"--ratio values must lie in \(0, 1\)"),
    ({"max_error": rule("1")}, r"--max-error values must lie in \[0, 1\)"),
    ({"target_params": 0}, "--target-params 0: must be a whole number"),
    ({"target_params": 10.5}, "--target-params 10.5: must be a whole number"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ModelSqueezeError, match=message):
        SvdConfig(**kwargs)


def test_no_matching_weights_is_an_error():
    src = load_pair(LENET300)
    with pytest.raises(ModelSqueezeError, match="no weight tensors match"):
        svd(src.model, src.records, SvdConfig(rank=rule("4"), selection=Selection(layers=("nothing*",))))
