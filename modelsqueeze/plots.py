"""Pictures for users who would rather look than read: per-layer sensitivity curves, the
size/accuracy frontier, and weight histograms with their codebooks or quantization grids.

matplotlib is optional (``pip install 'modelsqueeze[plot]'``) and is imported only when a plot is
drawn, never when this module is imported. Every figure is drawn with the Agg backend, written
atomically (a temporary file beside the target, then renamed), closed after saving, and
deterministic: the same inputs give byte-identical PNG, SVG and PDF files (no dates, no version
stamps, a fixed SVG id salt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelsqueeze.errors import ModelSqueezeError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from modelsqueeze.pack import Pair

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
MARK_KINDS = ("centroids", "grid", "none")
# Settings whose *smaller* values are the more aggressive compression (fewer bits, less energy kept,
# lower rank, fewer shared values); sparsity and the like grow with aggressiveness.
SMALLER_IS_AGGRESSIVE = ("bits", "energy", "rank", "clusters", "k")
# More marks than this are drawn as a rug of ticks along the x axis instead of full-height lines.
MAX_MARK_LINES = 64
# Per-channel / per-block grids: at most this many distinct levels are drawn, else none.
MAX_GRID_LEVELS = 256
_SVG_SALT = "modelsqueeze"
_DPI = 120


# ----------------------------------------------------------------------------------------------
# Guards: cheap checks the CLI runs before any work


def require_matplotlib():
    """`matplotlib.pyplot`, with the non-interactive Agg backend selected; a one-line
    ModelSqueezeError when matplotlib is not installed. (Selecting Agg in a process that already
    drew with another pyplot backend switches it, as `matplotlib.use` does: meant for the CLI.)"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModelSqueezeError(
            "--plot needs matplotlib, which is not installed: pip install 'modelsqueeze[plot]'"
        ) from None
    return plt


def check_plot_path(path: Path) -> None:
    """Refuse a plot path that cannot be written: a suffix other than .png, .svg or .pdf, a missing
    parent folder, or an existing directory. Nothing is written."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ModelSqueezeError(f"{path}: a plot must end in one of {', '.join(PLOT_SUFFIXES)}")
    parent = path.parent
    if not parent.is_dir():
        raise ModelSqueezeError(f"{path}: the folder {parent} does not exist")
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory")
    from modelsqueeze.model import check_writable_folder

    check_writable_folder(path)


# ----------------------------------------------------------------------------------------------
# Saving


def _save(fig, path: Path) -> None:
    """Write `fig` to `path` atomically and deterministically, then close it."""
    import matplotlib

    from modelsqueeze.model import atomic_write

    plt = require_matplotlib()
    fmt = path.suffix.lower().lstrip(".")
    # Drop everything that changes between runs or installs: dates and the software stamp.
    metadata = {
        "png": {"Software": None},
        "svg": {"Date": None, "Creator": None},
        "pdf": {"CreationDate": None, "ModDate": None, "Creator": None, "Producer": None},
    }[fmt]

    def write(tmp: Path) -> None:
        with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT}):
            fig.savefig(tmp, format=fmt, dpi=_DPI, metadata=metadata, bbox_inches="tight")

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def _title(fig, title: str) -> None:
    if title:
        fig.suptitle(title)


# ----------------------------------------------------------------------------------------------
# Sensitivity curves


def plot_sensitivity(
    curves: dict[str, list[tuple[float, float]]],
    setting: str,
    path: Path,
    baseline_accuracy: float,
    max_drop_pp: float | None = None,
    title: str = "",
    aggressive_right_is_smaller: bool | None = None,
) -> None:
    """One line per layer: top-1 accuracy (%) against the compression setting applied to that
    layer alone. `curves` maps a layer name to (setting value, accuracy as a fraction 0..1) pairs;
    `baseline_accuracy` is a fraction too, `max_drop_pp` in percentage points.

    A dashed line marks the baseline and, with `max_drop_pp`, a dotted one the allowed floor.
    More aggressive compression is always drawn to the right: for settings whose smaller values are
    more aggressive (bits, energy, rank, clusters, k) the x axis is reversed. Pass
    `aggressive_right_is_smaller` to override (True: reverse the axis, False: keep it ascending);
    None derives it from `setting`.
    """
    path = Path(path)
    check_plot_path(path)
    plt = require_matplotlib()
    if aggressive_right_is_smaller is None:
        aggressive_right_is_smaller = setting.lower() in SMALLER_IS_AGGRESSIVE
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    try:
        for i, (name, points) in enumerate(curves.items()):
            pts = sorted((float(x), float(y)) for x, y in points)
            xs = [x for x, _ in pts]
            ys = [100.0 * y for _, y in pts]
            # the colour cycle has 10 colours: past it, a different marker keeps the lines apart
            ax.plot(xs, ys, marker="os^Dv"[(i // 10) % 5], markersize=3.5, linewidth=1.4, label=name)
        base = 100.0 * baseline_accuracy
        ax.axhline(base, color="0.3", linestyle="--", linewidth=1.0, label=f"baseline {base:.2f}%")
        if max_drop_pp is not None:
            ax.axhline(base - max_drop_pp, color="tab:red", linestyle=":", linewidth=1.2,
                       label=f"baseline \u2212 {max_drop_pp:g} pp")
        if aggressive_right_is_smaller:
            ax.invert_xaxis()
        ax.set_xlabel(f"{setting}  (more aggressive \u2192)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
        many = len(curves) > 8
        ax.legend(fontsize="small" if many else "medium",
                  loc="upper left" if many else "best",
                  bbox_to_anchor=(1.01, 1.0) if many else None,
                  ncol=2 if len(curves) > 24 else 1)
        _title(fig, title or f"Per-layer sensitivity to {setting}")
    except BaseException:
        plt.close(fig)
        raise
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Size / accuracy frontier


def _size_unit(n_bytes: float) -> tuple[str, float]:
    """The decimal unit (as the CLI's --max-bytes reads them) that keeps tick labels short."""
    if n_bytes >= 10e6:
        return "MB", 1e6
    if n_bytes >= 10e3:
        return "KB", 1e3
    return "bytes", 1.0


def plot_frontier(
    points: list[tuple[int, float]],
    path: Path,
    baseline_bytes: int,
    baseline_accuracy: float,
    chosen: tuple[int, float] | None = None,
    target_bytes: int | None = None,
    title: str = "",
) -> None:
    """Top-1 accuracy (%) against packed size: each (bytes, accuracy fraction) point, joined in size
    order; the baseline as a dashed line and a square; `chosen` as a star with its numbers; a
    vertical line at `target_bytes`. The x axis is in B/KB/MB (decimal), logarithmic when the sizes
    span more than 20x; the top axis reads the same positions as compression ratio baseline/size."""
    path = Path(path)
    check_plot_path(path)
    plt = require_matplotlib()
    if baseline_bytes <= 0:
        raise ModelSqueezeError(f"baseline size {baseline_bytes} bytes: must be positive")
    pts = sorted((int(b), float(a)) for b, a in points)
    sizes = [b for b, _ in pts] + [baseline_bytes] + ([chosen[0]] if chosen else []) + (
        [target_bytes] if target_bytes else [])
    if any(s <= 0 for s in sizes):
        raise ModelSqueezeError("every size on the frontier must be a positive number of bytes")
    unit, div = _size_unit(max(sizes))
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    try:
        log = max(sizes) / min(sizes) > 20
        if log:
            ax.set_xscale("log")
        if pts:
            ax.plot([b / div for b, _ in pts], [100.0 * a for _, a in pts], marker="o", markersize=4,
                    linewidth=1.4, color="tab:blue", label="candidates")
        base = 100.0 * baseline_accuracy
        ax.axhline(base, color="0.3", linestyle="--", linewidth=1.0, label=f"baseline {base:.2f}%")
        ax.plot([baseline_bytes / div], [base], marker="s", color="0.3", linestyle="none",
                label=f"baseline {_fmt_size(baseline_bytes)}")
        if target_bytes:
            ax.axvline(target_bytes / div, color="tab:red", linestyle=":", linewidth=1.2,
                       label=f"target {_fmt_size(target_bytes)} ({baseline_bytes / target_bytes:.1f}\u00d7)")
        if chosen is not None:
            cb, ca = chosen
            ax.plot([cb / div], [100.0 * ca], marker="*", markersize=16, color="tab:orange",
                    markeredgecolor="black", linestyle="none", zorder=5,
                    label=f"chosen {_fmt_size(cb)}, {100.0 * ca:.2f}% ({baseline_bytes / cb:.1f}\u00d7)")
        ref = baseline_bytes / div

        def ratio(x):
            x = np.asarray(x, dtype=np.float64)
            return ref / np.where(x > 0, x, np.nan)

        top = ax.secondary_xaxis("top", functions=(ratio, ratio))  # x -> ref/x is its own inverse
        if log:
            _plain_log_ticks(ax.xaxis, "{:g}")
            _plain_log_ticks(top.xaxis, "{:g}\u00d7")
        else:
            from matplotlib.ticker import FuncFormatter

            top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}\u00d7"))
        top.set_xlabel("compression ratio (baseline / size)")
        ax.set_xlabel(f"packed size ({unit})")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        _title(fig, title or "Size / accuracy frontier")
    except BaseException:
        plt.close(fig)
        raise
    _save(fig, path)


def _plain_log_ticks(axis, fmt: str) -> None:
    """Ticks at 1, 2, 5 x 10^n labelled as plain numbers (not 10^n), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(float(f"{v:.3g}"))))
    axis.set_minor_formatter(NullFormatter())


def _fmt_size(n_bytes: int) -> str:
    unit, div = _size_unit(n_bytes)
    return f"{n_bytes:,} bytes" if div == 1 else f"{n_bytes / div:.1f} {unit}"


# ----------------------------------------------------------------------------------------------
# Weight histograms


@dataclass(frozen=True, eq=False)
class HistogramLayer:
    """One tensor to draw: its non-zero weights, and the values they were snapped to.

    `marks` are codebook centroids (`mark_kind` "centroids"), quantization grid levels ("grid"),
    or None: with `mark_kind` "none" for a tensor that has no grid, with "grid" for a quantized
    tensor whose per-group grids are too many levels to draw."""

    name: str
    values: np.ndarray
    marks: np.ndarray | None
    mark_kind: str

    def __post_init__(self) -> None:
        if self.mark_kind not in MARK_KINDS:
            raise ModelSqueezeError(f"layer {self.name!r}: mark kind {self.mark_kind!r} is not one of {MARK_KINDS}")


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def plot_histograms(layers: list[HistogramLayer], path: Path, title: str = "", log_counts: bool = False) -> None:
    """One histogram per layer (up to 3 per row) of its non-zero weights, with the marks drawn on
    top: thin vertical lines, or for more than 64 marks a rug of ticks along the x axis. Each
    subplot is titled with the layer name, its number of weights and of marks. `log_counts` puts
    the count axis on a log scale (useful when a few values dominate)."""
    path = Path(path)
    check_plot_path(path)
    plt = require_matplotlib()
    n = max(len(layers), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False, layout="constrained")
    try:
        flat = axes.reshape(-1)
        for ax, layer in zip(flat, layers):
            _draw_histogram(ax, layer, log_counts)
        for ax in flat[len(layers):]:
            ax.set_axis_off()
        if not layers:
            flat[0].text(0.5, 0.5, "no weight tensors", ha="center", va="center", transform=flat[0].transAxes)
        _title(fig, title or "Weight histograms (non-zero weights)")
    except BaseException:
        plt.close(fig)
        raise
    _save(fig, path)


def _draw_histogram(ax, layer: HistogramLayer, log_counts: bool) -> None:
    values = np.asarray(layer.values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    marks = None if layer.marks is None else np.asarray(layer.marks, dtype=np.float64).reshape(-1)
    n_marks = 0 if marks is None else marks.size
    noun = {"centroids": "centroids", "grid": "grid levels"}.get(layer.mark_kind, "marks")
    head = f"{values.size:,} weights"
    if marks is not None:
        head += f", {n_marks} {noun}"
    elif layer.mark_kind == "grid":
        head += ", quantized (grid not drawn)"
    ax.set_title(f"{_short(layer.name)}\n{head}", fontsize="small")
    ax.tick_params(labelsize="x-small")
    if values.size == 0:
        ax.text(0.5, 0.5, "no non-zero weights", ha="center", va="center", transform=ax.transAxes,
                fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        lo, hi = float(values.min()), float(values.max())
        if lo == hi:
            lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
        counts, edges = np.histogram(values, bins=80, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.75)
        if log_counts:
            ax.set_yscale("log")
    if marks is not None and marks.size:
        color = "tab:red" if layer.mark_kind == "centroids" else "tab:orange"
        if marks.size > MAX_MARK_LINES:
            ax.plot(marks, np.zeros_like(marks), linestyle="none", marker="|", markersize=7,
                    markeredgewidth=0.6, color=color, transform=ax.get_xaxis_transform(), clip_on=False)
        else:
            for m in marks:
                ax.axvline(m, color=color, linewidth=0.7, alpha=0.8)
    ax.set_xlabel("weight value", fontsize="x-small")
    ax.set_ylabel("count" + (" (log)" if log_counts else ""), fontsize="x-small")


def histogram_layers(pair: "Pair") -> list[HistogramLayer]:
    """A HistogramLayer for every weight/embedding tensor of a loaded pair, and every tensor the
    sidecar holds a record for, in graph order. Values are the non-zero entries of the tensor's
    (decoded) value. Marks: a codebook record's codebook ("centroids"); for a quantized record the
    grid ("grid"): every level (q - zero_point) * scale of the code range when there is one scale,
    else the distinct decoded values when there are at most 256 of them, else None. Raw records
    and plain tensors have no marks."""
    from modelsqueeze.model import find_weights

    records = pair.records
    layers: list[HistogramLayer] = []
    seen: set[str] = set()
    for info in find_weights(pair.model):
        record = records.get(info.key)
        if record is None and info.role not in ("weight", "embedding"):
            continue
        seen.add(info.key)
        dense = record.decode() if record is not None else info.array()
        layers.append(_layer(info.key, dense, record))
    for key, record in records.items():  # a record the graph scan did not report (should not happen)
        if key not in seen:
            layers.append(_layer(key, record.decode(), record))
    return layers


def _layer(name: str, dense: np.ndarray, record) -> HistogramLayer:
    flat = np.asarray(dense).reshape(-1)
    values = flat[flat != 0]
    marks, kind = None, "none"
    if record is not None and record.codebook is not None:
        marks, kind = np.asarray(record.codebook).copy(), "centroids"
    elif record is not None and record.scale is not None:
        marks, kind = _grid_levels(record), "grid"  # marks None: too many per-group levels to draw
    return HistogramLayer(name=name, values=values, marks=marks, mark_kind=kind)


def _grid_levels(record) -> np.ndarray | None:
    from modelsqueeze.kernels.quant import qrange

    if record.scale.size == 1:
        qmin, qmax = qrange(record.index_bits, record.signed)
        q = np.arange(qmin, qmax + 1, dtype=np.int32)
        z = np.int32(np.asarray(record.zero_point).reshape(-1)[0])
        s = np.float32(np.asarray(record.scale).reshape(-1)[0])
        # float32, exactly as decode() and ONNX DequantizeLinear compute each level
        return ((q - z).astype(np.float32) * s).astype(record.dtype)
    distinct = np.unique(record.stored_values())
    return distinct if distinct.size <= MAX_GRID_LEVELS else None


__all__: list[str] = [
    "HistogramLayer",
    "check_plot_path",
    "histogram_layers",
    "plot_frontier",
    "plot_histograms",
    "plot_sensitivity",
    "require_matplotlib",
]
