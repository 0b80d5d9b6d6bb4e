"""The CI size gate: `report --baseline-json size.json --max-growth P% [--data D --max-drop PP]`
fails (exit 1) on growth and on an accuracy drop against the committed report, and report --plot."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import SAMPLES
from modelsqueeze.cli import app

runner = CliRunner()
LENET300 = SAMPLES / "lenet300.onnx"
DATA = SAMPLES / "lenet300.npz"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A compressed model, its committed size.json, and two candidate changes: one bigger and
    one that loses accuracy."""
    folder = tmp_path_factory.mktemp("gate")
    for name, flags in [("ship", ["--bits", "4"]), ("bigger", ["--bits", "6"]), ("worse", ["--bits", "2"])]:
        result = invoke("cluster", LENET300, "-o", folder / f"{name}.onnx", *flags, "--quiet")
        assert result.exit_code == 0, result.output
    result = invoke("report", folder / "ship.onnx", "--data", DATA, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    (folder / "size.json").write_text(result.stdout)
    return folder


def gate(folder, model, *extra):
    return invoke("report", folder / model, "--baseline-json", folder / "size.json", "--quiet", *extra)


def test_the_same_model_passes_the_gate(shipped):
    result = gate(shipped, "ship.onnx", "--max-growth", "0%", "--data", DATA, "--max-drop", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["growth_pct"] == 0.0 and report["ok"] is True
    assert report["previous_bytes"] == report["packed_bytes"]


def test_growth_fails_the_gate(shipped):
    previous = json.loads((shipped / "size.json").read_text())["packed_bytes"]
    result = gate(shipped, "bigger.onnx", "--max-growth", "1%", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["packed_bytes"] > previous * 1.01
    assert report["growth_pct"] == pytest.approx(100 * (report["packed_bytes"] - previous) / previous)
    assert "grew" in result.stderr and "more than --max-growth 1%" in result.stderr
    # Generous enough a limit lets the same change through.
    generous = f"{report['growth_pct'] + 0.01:.2f}"
    assert gate(shipped, "bigger.onnx", "--max-growth", generous).exit_code == 0


def test_accuracy_drop_against_the_saved_report_fails_the_gate(shipped):
    result = gate(shipped, "worse.onnx", "--data", DATA, "--max-drop", "0.5", "--max-growth", "1%")
    assert result.exit_code == 1, result.output
    assert "accuracy dropped" in result.stderr and "size.json" in result.stderr
    assert "grew" not in result.stderr  # smaller: only the accuracy gate fails


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("{", "not JSON"), ('{"ratio": 3}', "no packed_bytes"), ('{"packed_bytes": -4}', "no packed_bytes"),
    ('{"packed_bytes": 10, "accuracy": 7}', "not a fraction"),
])
def test_bad_baseline_json(tmp_path, shipped, content, message):
    path = tmp_path / "size.json"
    if content is not None:
        path.write_text(content)
    result = invoke("report", shipped / "ship.onnx", "--baseline-json", path, "--max-growth", "1")
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--max-growth", "1%"], "--max-growth needs --baseline-json"),
    (["--max-growth", "lots"], "expected a percentage"),
    (["--max-growth", "-1"], "0 or more"),
    (["--data", str(DATA), "--max-drop", "1"], "--max-drop needs"),
])
def test_gate_usage_errors(shipped, args, message):
    result = invoke("report", shipped / "ship.onnx", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_report_plot(tmp_path, shipped):
    result = invoke("report", shipped / "ship.onnx", "--baseline", LENET300, "--plot", tmp_path / "w.png", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("report", shipped / "ship.onnx", "--plot", tmp_path / "w.gif")
    assert result.exit_code == 2 and ".png" in result.stderr
    assert not (tmp_path / "w.gif").exists()


def test_report_plot_without_matplotlib(tmp_path, shipped, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    result = invoke("report", shipped / "ship.onnx", "--plot", tmp_path / "w.png")
    assert result.exit_code == 2 and "pip install 'modelsqueeze[plot]'" in result.stderr
    assert not (tmp_path / "w.png").exists()
