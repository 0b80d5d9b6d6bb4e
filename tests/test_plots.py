"""Plots: real PNG/SVG/PDF files, byte-identical across runs, atomic, no figure leaks; bad paths and a
missing matplotlib refused before any work; histogram marks taken from real cluster/quantize pairs."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modelsqueeze import plots
from modelsqueeze.cli import app
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels.quant import qrange
from modelsqueeze.pack import load_pair
from modelsqueeze.plots import HistogramLayer

from conftest import SAMPLES

LENET300 = SAMPLES / "lenet300.onnx"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CURVES = {
    "fc1.weight": [(0.5, 0.981), (0.0, 0.982), (0.9, 0.95)],
    "fc2.weight": [(0.0, 0.982), (0.5, 0.97), (0.9, 0.80)],
}
FRONTIER = [(120_000, 0.979), (30_000, 0.95), (50_000, 0.975)]


def draw_sensitivity(path: Path, **kw) -> None:
    plots.plot_sensitivity(CURVES, "sparsity", path, baseline_accuracy=0.982, max_drop_pp=1.0, **kw)


def draw_frontier(path: Path) -> None:
    plots.plot_frontier(FRONTIER, path, baseline_bytes=1_067_115, baseline_accuracy=0.982,
                        chosen=(50_000, 0.975), target_bytes=60_000, title="frontier under test")


def draw_histograms(path: Path) -> None:
    rng = np.random.default_rng(0)
    layers = [
        HistogramLayer("few_centroids", rng.standard_normal(2000), np.linspace(-2, 2, 8), "centroids"),
        HistogramLayer("many_levels", rng.standard_normal(2000), np.linspace(-3, 3, 256), "grid"),
        HistogramLayer("plain", rng.standard_normal(300), None, "none"),
        HistogramLayer("all_pruned", np.zeros(0), None, "none"),
    ]
    plots.plot_histograms(layers, path, title="histograms under test")


DRAWERS = {"sensitivity": draw_sensitivity, "frontier": draw_frontier, "histograms": draw_histograms}
# Text matplotlib writes into an SVG (as <!-- comments --> beside each text path).
SVG_TEXT = {
    "sensitivity": ["fc1.weight", "fc2.weight", "baseline 98.20%", "top-1 accuracy (%)"],
    "frontier": ["frontier under test", "compression ratio", "chosen 50.0 KB", "packed size (KB)"],
    "histograms": ["few_centroids", "8 centroids", "256 grid levels", "no non-zero weights"],
}


@pytest.fixture(autouse=True)
def no_figure_leaks():
    plt = plots.require_matplotlib()
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "a plot left a figure open"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("kind", sorted(DRAWERS))
def test_png_is_a_png(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    DRAWERS[kind](path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200
    assert b"Software" not in data  # no version stamp
    assert listing(tmp_path) == [f"{kind}.png"]  # no temporary left behind


@pytest.mark.parametrize("kind", sorted(DRAWERS))
def test_svg_parses_and_holds_the_labels(tmp_path, kind):
    path = tmp_path / f"{kind}.svg"
    DRAWERS[kind](path)
    root = ET.fromstring(path.read_bytes())
    assert root.tag.rsplit("}", 1)[-1] == "svg"
    text = path.read_text()
    for label in SVG_TEXT[kind]:
        assert label in text, label
    assert "<dc:date>" not in text


@pytest.mark.filterwarnings("error")  # every metadata key we pass is one matplotlib knows
@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
@pytest.mark.parametrize("kind", sorted(DRAWERS))
def test_same_inputs_give_byte_identical_files(tmp_path, kind, suffix):
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    DRAWERS[kind](a)
    DRAWERS[kind](b)
    assert a.read_bytes() == b.read_bytes()
    if suffix == ".pdf":
        assert a.read_bytes().startswith(b"%PDF")
        assert b"CreationDate" not in a.read_bytes()


def test_a_failed_save_leaves_the_old_file_and_closes_the_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "p.png"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    from modelsqueeze.errors import ModelSqueezeError
    with pytest.raises(ModelSqueezeError, match=r"p\.png: cannot write it: disk full \(nothing was replaced\)"):
        draw_sensitivity(path)
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["p.png"]
    # the autouse fixture checks the figure was closed


# ---------------------------------------------------------------------------------------------
# Guards


@pytest.mark.parametrize("name", ["plot.jpg", "plot", "plot.png.txt", "plot.onnx"])
def test_bad_suffix_is_refused_before_anything(tmp_path, name, monkeypatch):
    def no_work():
        raise AssertionError("matplotlib was loaded before the path was checked")

    with pytest.raises(ModelSqueezeError) as err:
        plots.check_plot_path(tmp_path / name)
    message = str(err.value)
    assert name in message and ".png" in message and ".svg" in message and ".pdf" in message
    monkeypatch.setattr(plots, "require_matplotlib", no_work)
    for draw in DRAWERS.values():
        with pytest.raises(ModelSqueezeError):
            draw(tmp_path / name)
    assert listing(tmp_path) == []


def test_missing_folder_is_refused_before_anything(tmp_path, monkeypatch):
    path = tmp_path / "no" / "such" / "plot.svg"
    with pytest.raises(ModelSqueezeError, match="does not exist"):
        plots.check_plot_path(path)
    monkeypatch.setattr(plots, "require_matplotlib", lambda: pytest.fail("matplotlib loaded"))
    for draw in DRAWERS.values():
        with pytest.raises(ModelSqueezeError, match="does not exist"):
            draw(path)
    assert listing(tmp_path) == []


def test_a_directory_is_not_a_plot_path(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ModelSqueezeError, match="directory"):
        plots.check_plot_path(tmp_path / "d.png")


def test_good_paths_pass(tmp_path):
    for name in ("a.png", "b.SVG", "c.pdf"):
        plots.check_plot_path(tmp_path / name)
    assert listing(tmp_path) == []


def test_missing_matplotlib_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ModelSqueezeError) as err:
        plots.require_matplotlib()
    message = str(err.value)
    assert "\n" not in message
    assert "matplotlib" in message and "not installed" in message and "pip install 'modelsqueeze[plot]'" in message
    for draw in DRAWERS.values():
        with pytest.raises(ModelSqueezeError, match="not installed"):
            draw(tmp_path / "p.png")
    assert listing(tmp_path) == []


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, modelsqueeze.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mark_kind_is_checked():
    with pytest.raises(ModelSqueezeError, match="mark kind"):
        HistogramLayer("x", np.ones(3), np.ones(2), "levels")


# ---------------------------------------------------------------------------------------------
# What is drawn (figures inspected instead of saved)


@pytest.fixture
def captured(monkeypatch):
    figures = []

    def keep(fig, path):
        figures.append(fig)

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    plots.require_matplotlib().close("all")


def test_sensitivity_lines_in_percent_and_axis_direction(tmp_path, captured):
    draw_sensitivity(tmp_path / "s.png")
    ax = captured[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["fc2.weight"].get_xdata()) == [0.0, 0.5, 0.9]  # sorted by setting
    assert np.allclose(lines["fc2.weight"].get_ydata(), [98.2, 97.0, 80.0])
    assert np.allclose(lines["baseline 98.20%"].get_ydata(), 98.2)
    assert np.allclose(lines["baseline \u2212 1 pp"].get_ydata(), 97.2)
    assert not ax.xaxis_inverted()  # sparsity: more aggressive is larger, to the right

    plots.plot_sensitivity({"w": [(8, 0.98), (4, 0.97), (2, 0.5)]}, "bits", tmp_path / "b.png", 0.98)
    bits_ax = captured[1].axes[0]
    assert bits_ax.xaxis_inverted()  # fewer bits (more aggressive) to the right
    assert "baseline \u2212" not in " ".join(line.get_label() for line in bits_ax.get_lines())
    plots.plot_sensitivity({"w": [(8, 0.98)]}, "bits", tmp_path / "c.png", 0.98, aggressive_right_is_smaller=False)
    assert not captured[2].axes[0].xaxis_inverted()


def test_frontier_points_in_size_order_and_chosen_highlighted(tmp_path, captured):
    draw_frontier(tmp_path / "f.png")
    ax = captured[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["candidates"].get_xdata()) == [30.0, 50.0, 120.0]  # KB, in size order
    assert np.allclose(lines["candidates"].get_ydata(), [95.0, 97.5, 97.9])
    chosen = [label for label in lines if label.startswith("chosen")]
    assert chosen == ["chosen 50.0 KB, 97.50% (21.3\u00d7)"]
    target = [label for label in lines if label.startswith("target")]
    assert target and list(lines[target[0]].get_xdata()) == [60.0, 60.0]
    assert ax.get_xscale() == "log"  # 30 KB .. 1067 KB spans more than 20x


def test_histogram_marks_lines_or_rug(tmp_path, captured):
    draw_histograms(tmp_path / "h.png")
    axes = captured[0].axes
    few, many, plain, empty = axes[:4]
    assert len(few.get_lines()) == 8 and all(len(line.get_xdata()) == 2 for line in few.get_lines())
    assert len(many.get_lines()) == 1 and len(many.get_lines()[0].get_xdata()) == 256  # one rug
    assert plain.get_lines() == []
    assert "2,000 weights, 8 centroids" in few.get_title()
    assert "300 weights" in plain.get_title() and "0 weights" in empty.get_title()
    assert len(axes) == 6 and not axes[4].axison and not axes[5].axison  # 2x3 grid, 2 unused


# ---------------------------------------------------------------------------------------------
# histogram_layers on real pairs


def compress(folder: Path, *args: str) -> Path:
    folder.mkdir()
    out = folder / f"{args[0]}.onnx"
    result = CliRunner().invoke(app, [args[0], str(LENET300), "-o", str(out), *args[1:]])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    clustered = compress(tmp / "cluster", "cluster", "--bits", "3")
    per_tensor = compress(tmp / "tensor", "quantize", "--bits", "4", "--granularity", "tensor")
    per_channel = compress(tmp / "channel", "quantize", "--bits", "2", "--granularity", "channel")
    return {"cluster": load_pair(clustered), "tensor": load_pair(per_tensor), "channel": load_pair(per_channel)}


def test_clustered_pair_marks_are_the_codebooks(pairs):
    pair = pairs["cluster"]
    layers = plots.histogram_layers(pair)
    assert [layer.name for layer in layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for layer in layers:
        record = pair.records[layer.name]
        assert record.codebook is not None and layer.mark_kind == "centroids"
        assert np.array_equal(layer.marks, record.codebook)
        dense = record.decode()
        assert layer.values.size == np.count_nonzero(dense)
        assert np.all(layer.values != 0)
        assert np.isin(layer.values, record.codebook).all()


def test_per_tensor_quantized_pair_marks_are_the_grid(pairs):
    pair = pairs["tensor"]
    layers = plots.histogram_layers(pair)
    assert len(layers) == 3
    for layer in layers:
        record = pair.records[layer.name]
        assert record.scale.size == 1 and layer.mark_kind == "grid"
        qmin, qmax = qrange(4, record.signed)
        scale, zp = float(record.scale.reshape(-1)[0]), int(record.zero_point.reshape(-1)[0])
        expected = (np.arange(qmin, qmax + 1) - zp) * scale
        assert layer.marks.size == 16
        assert np.allclose(layer.marks, expected, rtol=1e-6, atol=0)
        assert np.isin(layer.values, layer.marks).all()  # every weight sits exactly on a level
        assert layer.values.size == np.count_nonzero(record.decode())


def test_per_channel_quantized_pair_marks_distinct_levels_or_none(pairs):
    pair = pairs["channel"]
    layers = {layer.name: layer for layer in plots.histogram_layers(pair)}
    small = layers["fc3.weight"]  # 10 channels x 4 levels: at most 40 distinct values
    record = pair.records["fc3.weight"]
    assert record.scale.size == 10 and small.mark_kind == "grid"
    assert np.array_equal(small.marks, np.unique(record.decode()))
    big = layers["fc1.weight"]  # 300 channels: more than 256 distinct values
    assert big.mark_kind == "grid" and big.marks is None
    assert np.unique(pair.records["fc1.weight"].decode()).size > 256


def test_plain_model_has_no_marks(tmp_path):
    layers = plots.histogram_layers(load_pair(LENET300))
    assert [layer.name for layer in layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(layer.marks is None and layer.mark_kind == "none" for layer in layers)
    path = tmp_path / "h.svg"
    plots.plot_histograms(layers, path)
    text = path.read_text()
    assert "235,200 weights" in text and "fc3.weight" in text
