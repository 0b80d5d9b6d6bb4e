"""End-to-end tests of data-aware compression (--calibration, --sequential, --damp) through the CLI:
the files the calibrated prune / cluster / quantize / svd / pipeline / run commands write are run
in onnxruntime on held-out inputs and compared with the data-free result of the same size (same
mask count, bits, rank); exact cases stay exact; zeros stay zero; bad calibration data is one
error line with nothing written; layers that cannot be calibrated fall back with a note."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cli_helpers import invoke, ok, refused
from conftest import SAMPLES
from modelsqueeze.pack import load_pair
from modelsqueeze import store
from modelsqueeze.model import model_to_bytes

ERROR_NOTE = re.compile(r"^(?P<key>\S+): (?P<how>calibrated|sequential) output error "
                        r"(?P<before>[0-9.]+)% -> (?P<after>[0-9.]+)% of the layer's output energy$")


# --- helpers -------------------------------------------------------------------------------------







def build(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, array in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def run(path: Path, x: np.ndarray) -> np.ndarray:
    """The written OUT.onnx (a single-input model) as onnxruntime runs it."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def error(path: Path, reference: Path, x: np.ndarray) -> float:
    """||f(x) - f_orig(x)|| over all held-out samples."""
    return float(np.linalg.norm(run(path, x).astype(np.float64) - run(reference, x).astype(np.float64)))


def weights_of(path: Path) -> dict[str, np.ndarray]:
    """The logical weights of a written pair (sidecar records decoded)."""
    return {t.name: store.to_array(t) for t in load_pair(path).model.graph.initializer}


def records_of(path: Path) -> dict:
    return load_pair(path).records


def error_notes(summary: dict) -> dict[str, tuple[str, float, float]]:
    found = {}
    for note in summary["notes"]:
        match = ERROR_NOTE.match(note)
        if match:
            found[match["key"]] = (match["how"], float(match["before"]), float(match["after"]))
    return found


def written(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- models and data -----------------------------------------------------------------------------

DENSE_K, DENSE_N = 32, 24
CONV_C, CONV_M, CONV_HW = 4, 8, 8

MATMUL_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
lin (float[batch, {DENSE_K}] x) => (float[batch, {DENSE_N}] y) {{
  y = MatMul(x, w)
}}
"""
GEMM_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
lin (float[batch, {DENSE_K}] x) => (float[batch, {DENSE_N}] y) {{
  y = Gemm<transB = 1>(x, w, b)
}}
"""


MATMUL_3D_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
lin3 (float[batch, 5, {DENSE_K}] x) => (float[batch, 5, {DENSE_N}] y) {{
  y = MatMul(x, w)
}}
"""
GEMM_TRANS_A_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
lin_t (float[{DENSE_K}, batch] x) => (float[batch, {DENSE_N}] y) {{
  y = Gemm<transA = 1, alpha = 0.5, beta = 2.0>(x, w, b)
}}
"""


def conv_text(stride: int, pads: tuple[int, int, int, int], dilation: int = 1) -> str:
    return f"""
<ir_version: 8, opset_import: ["" : 17]>
conv (float[batch, {CONV_C}, {CONV_HW}, {CONV_HW}] x) => (float[batch, {CONV_M}, oh, ow] y) {{
  y = Conv<kernel_shape = [3, 3], strides = [{stride}, {stride}], pads = {list(pads)}, dilations = [{dilation}, {dilation}]>(x, w, b)
}}
"""


def dense_inputs(n: int, seed: int, k: int = DENSE_K) -> np.ndarray:
    """Strongly correlated features x = (z * s) @ Q with decaying scales s and a fixed random
    rotation Q (the same distribution for every seed), plus a mean offset."""
    mixing = np.random.default_rng(1234)
    q, _ = np.linalg.qr(mixing.standard_normal((k, k)))
    scales = np.exp(-np.linspace(0.0, 4.0, k))
    offset = mixing.standard_normal(k) * 0.3
    z = np.random.default_rng(seed).standard_normal((n, k))
    return ((z * scales) @ q + offset).astype(np.float32)


def sequence_inputs(n: int, seed: int) -> np.ndarray:
    return dense_inputs(5 * n, seed).reshape(n, 5, DENSE_K)


def transposed_inputs(n: int, seed: int) -> np.ndarray:
    """[K, batch]: Gemm transA's A (samples along the second axis)."""
    return np.ascontiguousarray(dense_inputs(n, seed).T)


def conv_inputs(n: int, seed: int) -> np.ndarray:
    """Images with correlated channels (a fixed mixing with decaying scales) and spatially smooth
    values (2x2 box sums)."""
    mixing = np.random.default_rng(4321)
    m = mixing.standard_normal((CONV_C, CONV_C)) * np.exp(-np.linspace(0.0, 3.0, CONV_C))[:, None]
    z = np.random.default_rng(seed).standard_normal((n, CONV_C, CONV_HW, CONV_HW))
    z = z + np.roll(z, 1, 2) + np.roll(z, 1, 3) + np.roll(np.roll(z, 1, 2), 1, 3)
    return np.einsum("nchw,cd->ndhw", z, m).astype(np.float32)


CONV_SHAPES = {"w": (CONV_M, CONV_C, 3, 3), "b": (CONV_M,)}
FORMS = {
    # name -> (text, weight shapes, input generator, calibration samples)
    "matmul": (MATMUL_TEXT, {"w": (DENSE_K, DENSE_N)}, dense_inputs, 512),
    "matmul_3d": (MATMUL_3D_TEXT, {"w": (DENSE_K, DENSE_N)}, sequence_inputs, 128),
    "gemm_transB_bias": (GEMM_TEXT, {"w": (DENSE_N, DENSE_K), "b": (DENSE_N,)}, dense_inputs, 512),
    "gemm_transA_alpha": (GEMM_TRANS_A_TEXT, {"w": (DENSE_K, DENSE_N), "b": (DENSE_N,)}, transposed_inputs, 512),
    "conv_s1_p1": (conv_text(1, (1, 1, 1, 1)), CONV_SHAPES, conv_inputs, 96),
    "conv_s2_asymmetric_pads": (conv_text(2, (1, 0, 0, 1)), CONV_SHAPES, conv_inputs, 96),
    "conv_dilated": (conv_text(1, (2, 2, 2, 2), dilation=2), CONV_SHAPES, conv_inputs, 96),
}


def form_case(tmp_path: Path, form: str, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """(model, calibration .npz, held-out inputs) for one single-layer form."""
    text, shapes, inputs, n_calib = FORMS[form]
    rng = np.random.default_rng(seed)
    model = save(build(text, {name: rng.standard_normal(shape) for name, shape in shapes.items()}), tmp_path / f"{form}.onnx")
    calib = tmp_path / f"{form}_calib.npz"
    np.savez(calib, x=inputs(n_calib, seed + 1))
    held_out = inputs(n_calib // 2, seed + 1000)
    return model, calib, held_out


# --- 1. calibrated beats data-free at the same size ------------------------------------------------

METHODS = {
    # method -> command and options, the same for the data-free and the calibrated run
    "prune": ["prune", "--sparsity", "0.6"],
    "cluster": ["cluster", "--bits", "2"],
    "quantize": ["quantize", "--bits", "3"],
    "svd": ["svd", "--rank", "2"],
}


def _same_size(method: str, form: str, free: Path, calibrated: Path) -> None:
    """The two results are the same size: same number of zeros / values / bits / factor shapes."""
    wf, wc = weights_of(free), weights_of(calibrated)
    if method == "prune":
        assert np.count_nonzero(wf["w"]) == np.count_nonzero(wc["w"])
        assert np.count_nonzero(wc["w"]) == round(0.4 * wc["w"].size)
    elif method == "cluster":
        assert len(np.unique(wc["w"])) <= 4 and len(np.unique(wf["w"])) <= 4
        assert records_of(calibrated)["w"].index_bits == records_of(free)["w"].index_bits == 2
    elif method == "quantize":
        rf, rc = records_of(free)["w"], records_of(calibrated)["w"]
        assert rf.index_bits == rc.index_bits == 3
        np.testing.assert_array_equal(rf.scale, rc.scale)  # GPTQ keeps the data-free grid
        np.testing.assert_array_equal(rf.zero_point, rc.zero_point)
    else:
        shapes_f = sorted(a.shape for a in wf.values())
        shapes_c = sorted(a.shape for a in wc.values())
        assert shapes_f == shapes_c
        assert "w" not in wc  # factored away
        assert any(2 in shape for shape in shapes_c)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method", list(METHODS))
def test_calibrated_output_error_is_lower_than_data_free_at_the_same_size(tmp_path, form, method):
    model, calib, held_out = form_case(tmp_path, form)
    args = METHODS[method]
    free, calibrated = tmp_path / "free.onnx", tmp_path / "cal.onnx"
    ok(*args[:1], model, "-o", free, *args[1:])
    summary = ok(*args[:1], model, "-o", calibrated, *args[1:], "--calibration", calib)
    assert "w" in error_notes(summary)
    _same_size(method, form, free, calibrated)
    e_free, e_cal = error(free, model, held_out), error(calibrated, model, held_out)
    assert e_free > 0
    assert e_cal < e_free, (method, form, e_cal, e_free)


# --- 2. exact where a closed form exists -----------------------------------------------------------

@pytest.mark.parametrize("form", ["matmul", "gemm_transB_bias", "conv_s2_asymmetric_pads"])
def test_prune_sparsity_zero_with_calibration_leaves_weights_bit_exact(tmp_path, form):
    model, calib, _ = form_case(tmp_path, form)
    ok("prune", model, "-o", tmp_path / "p.onnx", "--sparsity", "0", "--calibration", calib)
    original = {t.name: store.to_array(t) for t in onnx.load_model(str(model)).graph.initializer}
    after = weights_of(tmp_path / "p.onnx")
    np.testing.assert_array_equal(after["w"], original["w"])
    assert after["w"].tobytes() == original["w"].tobytes()


@pytest.mark.parametrize("form", ["matmul", "gemm_transB_bias", "conv_s1_p1"])
def test_cluster_with_enough_codes_reproduces_weights_exactly(tmp_path, form):
    text, shapes, inputs, _ = FORMS[form]
    rng = np.random.default_rng(5)
    values = np.array([-1.5, -0.75, 0.25, 0.5, 2.0], np.float32)
    weights = {"w": rng.choice(values, size=shapes["w"])}
    if "b" in shapes:
        weights["b"] = rng.standard_normal(shapes["b"])
    model = save(build(text, weights), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=inputs(256 if inputs is dense_inputs else 48, 2))
    summary = ok("cluster", model, "-o", tmp_path / "c.onnx", "--clusters", "8", "--calibration", calib, "--layers", "w")
    assert "w" in error_notes(summary)
    after = weights_of(tmp_path / "c.onnx")["w"]
    assert set(np.unique(after)) <= set(values.tolist())
    np.testing.assert_array_equal(after, weights["w"])


@pytest.mark.parametrize("form", ["matmul", "gemm_transB_bias"])
def test_svd_at_the_weight_s_true_rank_reproduces_outputs(tmp_path, form):
    text, shapes, inputs, _ = FORMS[form]
    rng = np.random.default_rng(6)
    k, n = shapes["w"]
    w = rng.standard_normal((k, 3)) @ rng.standard_normal((3, n))  # rank 3, factors save parameters
    weights = {"w": w, **({"b": rng.standard_normal(shapes["b"])} if "b" in shapes else {})}
    model = save(build(text, weights), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=inputs(256, 3))
    out = tmp_path / "s.onnx"
    summary = ok("svd", model, "-o", out, "--rank", "3", "--calibration", calib)
    assert "w" in error_notes(summary)
    assert "w" not in weights_of(out)  # really factored, not left whole
    x = inputs(64, 77)
    np.testing.assert_allclose(run(out, x), run(model, x), rtol=1e-4, atol=1e-4 * float(np.abs(run(model, x)).max()))


def test_svd_full_rank_is_left_whole_with_calibration(tmp_path):
    model, calib, held_out = form_case(tmp_path, "matmul")
    out = tmp_path / "s.onnx"
    summary = ok("svd", model, "-o", out, "--rank", str(min(DENSE_K, DENSE_N)), "--calibration", calib)
    assert any("left whole" in note for note in summary["notes"])
    np.testing.assert_array_equal(run(out, held_out), run(model, held_out))


def test_quantize_with_diagonal_H_is_round_to_nearest(tmp_path):
    """Calibration rows that are scaled unit vectors give an exactly diagonal H = XᵀX, where GPTQ's
    error feedback is zero: the codes are round-to-nearest, i.e. the data-free result."""
    model, _, _ = form_case(tmp_path, "matmul")
    calib = tmp_path / "diag.npz"
    np.savez(calib, x=(np.eye(DENSE_K) * np.linspace(0.5, 3.0, DENSE_K)[:, None]).astype(np.float32))
    ok("quantize", model, "-o", tmp_path / "free.onnx", "--bits", "4")
    summary = ok("quantize", model, "-o", tmp_path / "cal.onnx", "--bits", "4", "--calibration", calib)
    before, after = error_notes(summary)["w"][1:]
    assert before == after
    rf, rc = records_of(tmp_path / "free.onnx")["w"], records_of(tmp_path / "cal.onnx")["w"]
    np.testing.assert_array_equal(rc.indices, rf.indices)
    np.testing.assert_array_equal(weights_of(tmp_path / "cal.onnx")["w"], weights_of(tmp_path / "free.onnx")["w"])


@pytest.mark.parametrize("bits, granularity", [(3, "channel"), (4, "channel"), (4, "block"), (3, "tensor")])
@pytest.mark.parametrize("form", ["gemm_transB_bias", "conv_s1_p1"])
def test_gptq_codes_lie_on_the_data_free_grid_and_zeros_stay_zero(tmp_path, form, bits, granularity):
    from modelsqueeze.kernels.quant import Layout

    model, calib, held_out = form_case(tmp_path, form)
    pruned = tmp_path / "p.onnx"
    ok("prune", model, "-o", pruned, "--sparsity", "0.5")
    options = ["--bits", str(bits), "--granularity", granularity, "--block-size", "4"]
    out, free = tmp_path / "q.onnx", tmp_path / "free.onnx"
    ok("quantize", pruned, "-o", free, *options)
    ok("quantize", pruned, "-o", out, *options, "--calibration", calib)
    record, plain = records_of(out)["w"], records_of(free)["w"]
    assert record.index_bits == bits
    assert record.indices.min() >= 0 and record.indices.max() < 2 ** bits
    np.testing.assert_array_equal(record.scale, plain.scale)
    before, after = weights_of(pruned)["w"], weights_of(out)["w"]
    assert np.all(after[before == 0] == 0)  # (a survivor may round to the zero code, as in round-to-nearest)
    # every value is an integer number of its own group's steps, within the signed range
    layout = Layout(after.shape, record.quant_axis, record.block_size) if record.quant_axis is not None else Layout(after.shape)
    steps = after.astype(np.float64) / layout.expand(np.asarray(record.scale, np.float64))
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
    assert np.abs(np.round(steps)).max() <= 2 ** (bits - 1)
    assert error(out, model, held_out) < error(free, model, held_out)


@pytest.mark.parametrize("form", ["matmul", "gemm_transB_bias", "conv_s1_p1"])
def test_nm_with_calibration_keeps_the_pattern_and_lowers_the_error(tmp_path, form):
    model, calib, held_out = form_case(tmp_path, form)
    ok("prune", model, "-o", tmp_path / "free.onnx", "--nm", "2:4")
    ok("prune", model, "-o", tmp_path / "cal.onnx", "--nm", "2:4", "--calibration", calib)
    w = weights_of(tmp_path / "cal.onnx")["w"]
    axis = {"matmul": 0, "gemm_transB_bias": 1, "conv_s1_p1": 1}[form]  # the input axis of the stored weight
    groups = np.moveaxis(w != 0, axis, -1)
    groups = groups.reshape(groups.shape[:-1] + (groups.shape[-1] // 4, 4))
    assert np.all(groups.sum(-1) == 2)
    assert error(tmp_path / "cal.onnx", model, held_out) < error(tmp_path / "free.onnx", model, held_out)


def test_threshold_with_calibration_keeps_the_data_free_mask_and_refits(tmp_path):
    model, calib, held_out = form_case(tmp_path, "gemm_transB_bias")
    ok("prune", model, "-o", tmp_path / "free.onnx", "--threshold", "0.8")
    ok("prune", model, "-o", tmp_path / "cal.onnx", "--threshold", "0.8", "--calibration", calib)
    free, cal = weights_of(tmp_path / "free.onnx")["w"], weights_of(tmp_path / "cal.onnx")["w"]
    np.testing.assert_array_equal(free == 0, cal == 0)
    assert not np.array_equal(free, cal)
    assert error(tmp_path / "cal.onnx", model, held_out) < error(tmp_path / "free.onnx", model, held_out)


def test_structured_prune_with_calibration_is_the_data_free_result_with_a_note(tmp_path):
    model, calib, _ = form_case(tmp_path, "gemm_transB_bias")
    ok("prune", model, "-o", tmp_path / "free.onnx", "--structured", "rows", "--sparsity", "0.5")
    summary = ok("prune", model, "-o", tmp_path / "cal.onnx", "--structured", "rows", "--sparsity", "0.5", "--calibration", calib)
    assert any("no re-fit" in n for n in summary["notes"]), summary["notes"]
    assert (tmp_path / "cal.msq").read_bytes() == (tmp_path / "free.msq").read_bytes()


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.6"], ["prune", "--sparsity", "0.6", "--scope", "global"],
                                     ["cluster", "--bits", "3"], ["svd", "--rank", "3"]])
def test_repeating_the_calibration_data_changes_nothing(tmp_path, command):
    """H of the data repeated 4 times is 4 H: masks, codes and fits are all scale-free."""
    model, calib, _ = mlp2(tmp_path)
    np.savez(tmp_path / "x4.npz", x=np.tile(np.load(calib)["x"], (4, 1)))
    ok(command[0], model, "-o", tmp_path / "a.onnx", *command[1:], "--calibration", calib)
    ok(command[0], model, "-o", tmp_path / "b.onnx", *command[1:], "--calibration", tmp_path / "x4.npz")
    wa, wb = weights_of(tmp_path / "a.onnx"), weights_of(tmp_path / "b.onnx")
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_array_equal(wa[name] == 0, wb[name] == 0)
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_global_prune_mask_depends_on_calibration_size_when_a_layer_is_not_calibrated(tmp_path):
    """prune --scope global ranks calibrated layers by |w|·sqrt(diag H) (grows with the number of
    calibration rows) against uncalibrated ones (here a shared weight) by |w|: repeating the same
    calibration data 4 times moves the global split, and the uncalibrated layer absorbs almost all
    of the pruning (over 90% of it zeroed at 50% global sparsity)."""
    rng = np.random.default_rng(3)
    model = save(build(SHARED_TEXT, {"ws": rng.standard_normal((DENSE_K, DENSE_K)) * 0.3,
                                     "wl": rng.standard_normal((DENSE_K, DENSE_K))}), tmp_path / "m.onnx")
    x = dense_inputs(128, 1)
    np.savez(tmp_path / "x1.npz", x=x)
    np.savez(tmp_path / "x4.npz", x=np.tile(x, (4, 1)))
    ok("prune", model, "-o", tmp_path / "a.onnx", "--sparsity", "0.5", "--scope", "global", "--calibration", tmp_path / "x1.npz")
    ok("prune", model, "-o", tmp_path / "b.onnx", "--sparsity", "0.5", "--scope", "global", "--calibration", tmp_path / "x4.npz")
    wa, wb = weights_of(tmp_path / "a.onnx"), weights_of(tmp_path / "b.onnx")
    assert np.count_nonzero(wa["ws"] == 0) + np.count_nonzero(wa["wl"] == 0) == DENSE_K * DENSE_K  # 50% overall
    for name in ("ws", "wl"):
        np.testing.assert_array_equal(wa[name] == 0, wb[name] == 0, err_msg=name)


# --- 3. pruned zeros stay zero through calibrated cluster / quantize -----------------------------------

@pytest.mark.parametrize("step", [["cluster", "--bits", "3"], ["quantize", "--bits", "4"],
                                  ["cluster", "--bits", "3", "--sequential"]])
@pytest.mark.parametrize("form", ["gemm_transB_bias", "conv_s2_asymmetric_pads"])
def test_pruned_zeros_stay_zero_through_calibrated_steps(tmp_path, form, step):
    model, calib, held_out = form_case(tmp_path, form)
    pruned = tmp_path / "p.onnx"
    ok("prune", model, "-o", pruned, "--sparsity", "0.7")
    out = tmp_path / "o.onnx"
    summary = ok(step[0], pruned, "-o", out, *step[1:], "--calibration", calib)
    assert "w" in error_notes(summary)
    before, after = weights_of(pruned)["w"], weights_of(out)["w"]
    zeros = before == 0
    assert zeros.sum() == round(0.7 * before.size)
    assert np.all(after[zeros] == 0)
    record = records_of(out)["w"]
    if record.positions is not None:  # a sparse record stores exactly the survivors
        np.testing.assert_array_equal(record.positions, np.flatnonzero(before.reshape(-1)))
    if step[0] == "cluster":  # no codebook value is exactly zero: the survivors stay non-zero
        assert np.count_nonzero(after) == np.count_nonzero(before)
    else:  # GPTQ may round a survivor to the zero code, never the other way round
        assert np.count_nonzero(after) <= np.count_nonzero(before)
    assert np.all(np.isfinite(run(out, held_out)))


# --- 4. --sequential and --damp ------------------------------------------------------------------------

MLP2_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
mlp2 (float[batch, {DENSE_K}] x) => (float[batch, 8] y) {{
  h = Gemm<transB = 1>(x, fc1_w, fc1_b)
  r = Relu(h)
  y = MatMul(r, fc2_w)
}}
"""


def mlp2(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(11)
    model = save(build(MLP2_TEXT, {"fc1_w": rng.standard_normal((40, DENSE_K)), "fc1_b": rng.standard_normal(40) * 0.5,
                                   "fc2_w": rng.standard_normal((40, 8))}), tmp_path / "mlp2.onnx")
    calib = tmp_path / "mlp2_calib.npz"
    np.savez(calib, x=dense_inputs(512, 12))
    return model, calib, dense_inputs(256, 13)


@pytest.mark.parametrize("step", [["prune", "--sparsity", "0.7"], ["quantize", "--bits", "3"], ["cluster", "--bits", "2"],
                                  ["svd", "--rank", "4"]])
def test_sequential_runs_and_is_no_worse_at_the_output(tmp_path, step):
    model, calib, held_out = mlp2(tmp_path)
    plain, seq, free = tmp_path / "plain.onnx", tmp_path / "seq.onnx", tmp_path / "free.onnx"
    ok(step[0], model, "-o", free, *step[1:])
    s_plain = ok(step[0], model, "-o", plain, *step[1:], "--calibration", calib)
    s_seq = ok(step[0], model, "-o", seq, *step[1:], "--calibration", calib, "--sequential")
    assert {k: v[0] for k, v in error_notes(s_plain).items()} == {"fc1_w": "calibrated", "fc2_w": "calibrated"}
    assert {k: v[0] for k, v in error_notes(s_seq).items()} == {"fc1_w": "sequential", "fc2_w": "sequential"}
    w_plain, w_seq = weights_of(plain), weights_of(seq)
    assert sorted(w_plain) == sorted(w_seq)
    # the first layer sees the same inputs either way: the same result; the second one differs
    first = [name for name in w_plain if name.startswith("fc1_w")]
    second = [name for name in w_plain if name.startswith("fc2_w")]
    assert first and second
    for name in first:
        np.testing.assert_array_equal(w_seq[name], w_plain[name])
    assert any(not np.array_equal(w_seq[name], w_plain[name]) for name in second)
    if step[0] == "prune":
        assert np.count_nonzero(w_seq["fc2_w"]) == np.count_nonzero(w_plain["fc2_w"])
    e_free, e_plain, e_seq = (error(p, model, held_out) for p in (free, plain, seq))
    assert e_plain < e_free
    assert e_seq <= e_plain * 1.05, (e_seq, e_plain)


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["cluster", "--bits", "3"],
                                     ["quantize", "--bits", "4"], ["svd", "--rank", "2"]])
def test_sequential_without_calibration_is_refused(tmp_path, command):
    model, _, _ = form_case(tmp_path, "matmul")
    line = refused(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--sequential")
    assert "--sequential" in line and "--calibration" in line
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.msq").exists()


def test_pipeline_sequential_without_calibration_is_refused(tmp_path):
    model, _, _ = form_case(tmp_path, "matmul")
    line = refused("pipeline", model, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--sequential")
    assert "--sequential" in line and "--calibration" in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("command, damp", [(["prune", "--sparsity", "0.5"], "-0.5"), (["prune", "--sparsity", "0.5"], "nan"),
                                           (["quantize", "--bits", "4"], "nan"), (["cluster", "--bits", "3"], "-1e-9"),
                                           (["svd", "--rank", "2"], "inf"), (["pipeline", "--prune", "0.5"], "nan")])
def test_bad_damp_is_refused(tmp_path, command, damp):
    model, calib, _ = form_case(tmp_path, "matmul")
    before = written(tmp_path)
    line = refused(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--calibration", calib, f"--damp={damp}")
    assert "damp" in line
    assert written(tmp_path) == before


def test_damp_changes_the_fit_and_zero_damp_works(tmp_path):
    model, calib, held_out = form_case(tmp_path, "matmul")
    errors = {}
    for damp in ("0", "0.01", "100"):
        out = tmp_path / f"d{damp}.onnx"
        ok("prune", model, "-o", out, "--sparsity", "0.6", "--calibration", calib, f"--damp={damp}")
        errors[damp] = error(out, model, held_out)
    assert len(set(errors.values())) == 3
    assert errors["0.01"] < errors["100"]


# --- 5. bad calibration files ----------------------------------------------------------------------

def _bad_calibration(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"bad_{kind}.npz"
    rng = np.random.default_rng(0)
    if kind == "missing":
        return tmp_path / "nowhere.npz"
    if kind == "wrong_name":
        np.savez(path, inputs=rng.standard_normal((20, DENSE_K)).astype(np.float32))
    elif kind == "wrong_features":
        np.savez(path, x=rng.standard_normal((20, DENSE_K + 3)).astype(np.float32))
    elif kind == "only_y":
        np.savez(path, y=np.arange(20))
    elif kind == "not_npz":
        path.write_text("this is not an npz file\n")
    elif kind == "no_samples":
        np.savez(path, x=np.zeros((0, DENSE_K), np.float32))
    return path


BAD_KINDS = ["missing", "wrong_name", "wrong_features", "only_y", "not_npz", "no_samples"]


BAD_CASES = [(["prune", "--sparsity", "0.5"], kind) for kind in BAD_KINDS] + [
    (["cluster", "--bits", "3"], "missing"), (["cluster", "--bits", "3"], "wrong_features"),
    (["quantize", "--bits", "4"], "wrong_name"), (["quantize", "--bits", "4"], "only_y"),
    (["svd", "--rank", "2"], "wrong_features"), (["svd", "--rank", "2"], "no_samples"),
]


@pytest.mark.parametrize("command, kind", BAD_CASES)
def test_bad_calibration_files_are_one_error_line_and_nothing_written(tmp_path, command, kind):
    model, _, _ = form_case(tmp_path, "matmul")
    bad = _bad_calibration(tmp_path, kind)
    before = written(tmp_path)
    line = refused(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--calibration", bad)
    assert line.startswith("error: ") and "step 1" not in line, line  # a single command has no steps to name
    assert bad.name in line or "calibration" in line, line
    assert written(tmp_path) == before


@pytest.mark.parametrize("command, value", [(["prune", "--sparsity", "0.5"], "nan"), (["cluster", "--bits", "3"], "inf"),
                                            (["quantize", "--bits", "4"], "nan"), (["svd", "--rank", "2"], "inf")])
def test_non_finite_calibration_data_is_one_error_line_not_a_traceback(tmp_path, command, value):
    """Calibration inputs holding NaN or inf make H non-finite; the kernels then raise a bare
    ValueError('H has NaN or infinite values'), which escapes as a traceback with exit code 1."""
    model, calib, _ = form_case(tmp_path, "matmul")
    x = np.load(calib)["x"]
    x[3, 4] = float(value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x)
    before = written(tmp_path)
    result = invoke(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--calibration", bad)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert written(tmp_path) == before


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["quantize", "--bits", "4"]])
def test_activations_overflowing_to_inf_are_a_note_or_one_error_line_not_a_traceback(tmp_path, command):
    """Finite calibration inputs whose activations overflow float32 inside the model (fc2's input
    is inf/NaN): either fc2 is left data-free with a note, or the command is refused in one line;
    today the kernels' ValueError escapes as a traceback."""
    rng = np.random.default_rng(11)
    model = save(build(MLP2_TEXT, {"fc1_w": rng.standard_normal((40, DENSE_K)) * 1e4, "fc1_b": rng.standard_normal(40),
                                   "fc2_w": rng.standard_normal((40, 8))}), tmp_path / "m.onnx")
    calib = tmp_path / "big.npz"
    np.savez(calib, x=dense_inputs(64, 1) * np.float32(1e36))
    assert np.all(np.isfinite(np.load(calib)["x"]))
    before = written(tmp_path)
    result = invoke(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--calibration", calib, "--json", "--quiet")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        summary = json.loads(result.stdout)
        assert any(n.startswith("fc2_w:") and "not calibrated" in n for n in summary["notes"]), summary["notes"]
    else:
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert written(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "wrong_name", "only_y"])
def test_pipeline_bad_calibration_is_one_error_line_and_nothing_written(tmp_path, kind):
    model, _, _ = form_case(tmp_path, "matmul")
    bad = _bad_calibration(tmp_path, kind)
    before = written(tmp_path)
    refused("pipeline", model, "-o", tmp_path / "o.onnx", "--prune", "0.5", "--bits", "3", "--calibration", bad)
    assert written(tmp_path) == before


def test_calibration_by_input_name_and_by_x_agree(tmp_path):
    text = MATMUL_TEXT.replace("float[batch, 32] x", "float[batch, 32] pixels").replace("MatMul(x, w)", "MatMul(pixels, w)")
    rng = np.random.default_rng(0)
    model = save(build(text, {"w": rng.standard_normal((DENSE_K, DENSE_N))}), tmp_path / "m.onnx")
    data = dense_inputs(256, 1)
    np.savez(tmp_path / "named.npz", pixels=data)
    np.savez(tmp_path / "x.npz", x=data, y=np.zeros(256, np.int64))  # labels are ignored
    ok("prune", model, "-o", tmp_path / "a.onnx", "--sparsity", "0.6", "--calibration", tmp_path / "named.npz")
    ok("prune", model, "-o", tmp_path / "b.onnx", "--sparsity", "0.6", "--calibration", tmp_path / "x.npz")
    assert (tmp_path / "a.msq").read_bytes() == (tmp_path / "b.msq").read_bytes()


# --- 6. layers that cannot be calibrated -------------------------------------------------------------

SHARED_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
shared (float[batch, {DENSE_K}] x) => (float[batch, {DENSE_K}] y) {{
  a = MatMul(x, ws)
  r = Relu(a)
  b = MatMul(r, ws)
  y = MatMul(b, wl)
}}
"""
LEFT_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
left (float[{DENSE_K}, batch] x) => (float[{DENSE_N}, batch] y) {{
  y = MatMul(wleft, x)
}}
"""


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["cluster", "--bits", "3"], ["quantize", "--bits", "4"]])
def test_uncalibratable_layers_fall_back_to_data_free_with_a_note(tmp_path, command):
    rng = np.random.default_rng(3)
    model = save(build(SHARED_TEXT, {"ws": rng.standard_normal((DENSE_K, DENSE_K)) * 0.3,
                                     "wl": rng.standard_normal((DENSE_K, DENSE_K))}), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=dense_inputs(256, 1))
    free = tmp_path / "free.onnx"
    ok(command[0], model, "-o", free, *command[1:])
    summary = ok(command[0], model, "-o", tmp_path / "cal.onnx", *command[1:], "--calibration", calib)
    shared_notes = [n for n in summary["notes"] if n.startswith("ws:")]
    assert len(shared_notes) == 1 and "not calibrated" in shared_notes[0] and "shared" in shared_notes[0]
    assert set(error_notes(summary)) == {"wl"}  # the other layer is calibrated
    # the shared weight gets exactly the data-free treatment
    np.testing.assert_array_equal(weights_of(tmp_path / "cal.onnx")["ws"], weights_of(free)["ws"])
    assert not np.array_equal(weights_of(tmp_path / "cal.onnx")["wl"], weights_of(free)["wl"])


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["quantize", "--bits", "4"], ["cluster", "--bits", "3"]])
def test_left_operand_weight_falls_back_with_a_note(tmp_path, command):
    rng = np.random.default_rng(4)
    model = save(build(LEFT_TEXT, {"wleft": rng.standard_normal((DENSE_N, DENSE_K))}), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=transposed_inputs(64, 1))  # [K, batch], as the graph input wants
    free = tmp_path / "free.onnx"
    ok(command[0], model, "-o", free, *command[1:])
    summary = ok(command[0], model, "-o", tmp_path / "cal.onnx", *command[1:], "--calibration", calib)
    notes = [n for n in summary["notes"] if "wleft" in n]
    assert notes and any("not calibrated" in n for n in notes), summary["notes"]
    assert not error_notes(summary)
    assert (tmp_path / "cal.onnx").read_bytes() == free.read_bytes()
    assert (tmp_path / "cal.msq").read_bytes() == free.with_suffix(".msq").read_bytes()


CONVS_TEXT = f"""
<ir_version: 8, opset_import: ["" : 17]>
convs (float[batch, {CONV_C}, {CONV_HW}, {CONV_HW}] x) => (float[batch, {CONV_M}, {CONV_HW}, {CONV_HW}] y) {{
  g = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 2>(x, wg)
  gr = Relu(g)
  a = Conv<kernel_shape = [3, 3], auto_pad = "SAME_UPPER">(gr, wa)
  ar = Relu(a)
  y = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(ar, wc)
}}
"""


@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.5"], ["quantize", "--bits", "4"]])
def test_grouped_and_auto_pad_convs_fall_back_with_notes(tmp_path, command):
    rng = np.random.default_rng(8)
    model = save(build(CONVS_TEXT, {"wg": rng.standard_normal((CONV_M, CONV_C // 2, 3, 3)),
                                    "wa": rng.standard_normal((CONV_M, CONV_M, 3, 3)),
                                    "wc": rng.standard_normal((CONV_M, CONV_M, 3, 3))}), tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=conv_inputs(24, 1))
    free = tmp_path / "free.onnx"
    ok(command[0], model, "-o", free, *command[1:])
    summary = ok(command[0], model, "-o", tmp_path / "cal.onnx", *command[1:], "--calibration", calib)
    notes = summary["notes"]
    assert any(n.startswith("wg:") and "group" in n and "not calibrated" in n for n in notes), notes
    assert any(n.startswith("wa:") and "auto_pad" in n and "not calibrated" in n for n in notes), notes
    assert set(error_notes(summary)) == {"wc"}
    cal = weights_of(tmp_path / "cal.onnx")
    for key in ("wg", "wa"):
        np.testing.assert_array_equal(cal[key], weights_of(free)[key])
    held_out = conv_inputs(16, 99)
    assert error(tmp_path / "cal.onnx", model, held_out) < error(free, model, held_out)


# --- 7. recipes --------------------------------------------------------------------------------------

def test_recipe_step_calibration_is_relative_to_the_recipe_folder(tmp_path, monkeypatch):
    model, calib, _ = form_case(tmp_path, "gemm_transB_bias")
    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copy(calib, folder / "calib.npz")
    (folder / "r.toml").write_text(
        f'input = "../{model.name}"\noutput = "../via_recipe.onnx"\n'
        '[[step]]\ncommand = "prune"\nsparsity = 0.6\ncalibration = "calib.npz"\n'
        '[[step]]\ncommand = "quantize"\nbits = 4\ncalibration = "calib.npz"\nsequential = true\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the recipe's folder nor the model's
    summary = ok("run", folder / "r.toml")
    assert len(summary["steps"]) == 2
    # the same as the two commands with the calibration given directly
    ok("prune", model, "-o", tmp_path / "p.onnx", "--sparsity", "0.6", "--calibration", calib)
    ok("quantize", tmp_path / "p.onnx", "-o", tmp_path / "q.onnx", "--bits", "4", "--calibration", calib, "--sequential")
    assert (tmp_path / "via_recipe.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    assert (tmp_path / "via_recipe.msq").read_bytes() == (tmp_path / "q.msq").read_bytes()


def test_recipe_with_a_missing_calibration_file_is_refused(tmp_path):
    model, _, _ = form_case(tmp_path, "gemm_transB_bias")
    (tmp_path / "r.toml").write_text(
        f'input = "{model.name}"\noutput = "o.onnx"\n[[step]]\ncommand = "prune"\nsparsity = 0.5\ncalibration = "nope.npz"\n')
    before = written(tmp_path)
    refused("run", tmp_path / "r.toml")
    assert written(tmp_path) == before


def _lenet300_calib(tmp_path: Path, rows: int = 200) -> Path:
    path = tmp_path / "data" / "lenet300_calib_small.npz"
    path.parent.mkdir(exist_ok=True)
    with np.load(SAMPLES / "lenet300_calib.npz") as data:
        np.savez(path, x=data["x"][:rows])
    return path


def test_pipeline_with_calibration_and_its_saved_recipe_write_identical_files(tmp_path, monkeypatch):
    calib = _lenet300_calib(tmp_path)
    shutil.copy(SAMPLES / "lenet300.onnx", tmp_path / "lenet300.onnx")
    (tmp_path / "recipes").mkdir()
    monkeypatch.chdir(tmp_path)  # paths given relative to the working directory
    summary = ok("pipeline", "lenet300.onnx", "-o", "a.onnx", "--prune", "0.8", "--bits", "4", "--huffman",
                 "--calibration", calib.relative_to(tmp_path), "--save-recipe", "recipes/r.toml")
    assert [s["command"] for s in summary["steps"]] == ["prune", "cluster", "huffman"]
    assert error_notes(summary)  # the steps really were calibrated
    # the recipe names the data relative to its own folder, and runs from anywhere
    assert '"../data/lenet300_calib_small.npz"' in (tmp_path / "recipes" / "r.toml").read_text()
    monkeypatch.chdir(tmp_path / "recipes")
    ok("run", "r.toml", "-o", tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.msq").read_bytes() == (tmp_path / "b.msq").read_bytes()
    # and the pipeline == one command per step
    ok("prune", tmp_path / "lenet300.onnx", "-o", tmp_path / "p.onnx", "--sparsity", "0.8", "--calibration", calib)
    ok("cluster", tmp_path / "p.onnx", "-o", tmp_path / "c.onnx", "--bits", "4", "--calibration", calib)
    ok("huffman", tmp_path / "c.onnx", "-o", tmp_path / "h.onnx")
    assert (tmp_path / "a.msq").read_bytes() == (tmp_path / "h.msq").read_bytes()


@pytest.mark.parametrize("third", [["--quantize", "3"], ["--bits", "3"]])
def test_pipeline_svd_prune_then_quantize_or_cluster_with_calibration_beats_data_free(tmp_path, third):
    model, calib, held_out = mlp2(tmp_path)
    args = ["--svd-rank", "6", "--prune", "0.5", *third]
    ok("pipeline", model, "-o", tmp_path / "free.onnx", *args)
    summary = ok("pipeline", model, "-o", tmp_path / "cal.onnx", *args, "--calibration", calib)
    assert [s["command"] for s in summary["steps"]] == ["svd", "prune", third[0].strip("-").replace("bits", "cluster")]
    # every step fitted the factors: one error note per factor per data-aware step
    notes = [n for n in summary["notes"] if ERROR_NOTE.match(n)]
    assert len(notes) == 2 + 4 + 4, summary["notes"]
    assert error(tmp_path / "cal.onnx", model, held_out) < error(tmp_path / "free.onnx", model, held_out)
    # the pipeline with --sequential and --damp runs too, and is what its saved recipe writes
    recipe = tmp_path / "seq.toml"
    ok("pipeline", model, "-o", tmp_path / "seq.onnx", *args, "--calibration", calib, "--sequential", "--damp", "0.05",
       "--save-recipe", recipe)
    assert "sequential = true" in recipe.read_text() and "damp = 0.05" in recipe.read_text()
    ok("run", recipe, "-o", tmp_path / "seq_run.onnx")
    assert (tmp_path / "seq.onnx").read_bytes() == (tmp_path / "seq_run.onnx").read_bytes()
    assert (tmp_path / "seq.msq").read_bytes() == (tmp_path / "seq_run.msq").read_bytes()


# --- 8. the data-aware notes -------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["prune", "--sparsity", "0.6"], ["prune", "--nm", "2:4"], ["quantize", "--bits", "3"],
                                     ["quantize", "--bits", "4", "--granularity", "block", "--block-size", "8"],
                                     ["cluster", "--bits", "2"]])
def test_notes_report_output_error_not_larger_after_the_fit(tmp_path, command):
    model, calib, _ = mlp2(tmp_path)
    summary = ok(command[0], model, "-o", tmp_path / "o.onnx", *command[1:], "--calibration", calib)
    notes = error_notes(summary)
    assert set(notes) == {"fc1_w", "fc2_w"}, summary["notes"]
    for key, (how, before, after) in notes.items():
        assert how == "calibrated"
        assert 0 < before and 0 <= after <= before, (key, before, after)
    changed = {row["name"] for row in summary["tensors"]}
    assert set(notes) <= changed


def test_notes_on_lenet300_quantize_match_the_measured_layer_errors(tmp_path):
    """The note's 'A% -> B%' are the layer's relative output errors on the calibration rows:
    recompute B for fc3 (its inputs are relu2 of the unchanged model) from the written weights."""
    calib = _lenet300_calib(tmp_path)
    out = tmp_path / "q.onnx"
    summary = ok("quantize", SAMPLES / "lenet300.onnx", "-o", out, "--bits", "3", "--calibration", calib)
    notes = error_notes(summary)
    assert set(notes) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for _, before, after in notes.values():
        assert after <= before
    original = onnx.load_model(str(SAMPLES / "lenet300.onnx"))
    probe = onnx.ModelProto()
    probe.CopyFrom(original)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("relu2", onnx.TensorProto.FLOAT, None))
    with np.load(calib) as data:
        x = data["x"]
    relu2 = ort.InferenceSession(model_to_bytes(probe)).run(["relu2"], {"x": x})[0].astype(np.float64)
    w = {t.name: store.to_array(t) for t in original.graph.initializer}["fc3.weight"].astype(np.float64)
    w2 = weights_of(out)["fc3.weight"].astype(np.float64)
    measured = np.sum((relu2 @ (w2 - w).T) ** 2) / np.sum((relu2 @ w.T) ** 2)
    assert 100 * measured == pytest.approx(notes["fc3.weight"][2], abs=0.01)
