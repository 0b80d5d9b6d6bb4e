"""Statistics of a model (and its sidecar): per-tensor and total sizes, sparsity, unique values,
bits per weight, ratios and accuracy, rendered as a rich table, JSON or Markdown; CI thresholds."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import read_input
from modelsqueeze.model import (
    COMPRESSIBLE_ROLES,
    WeightInfo,
    find_weights,
    fixed_basis,
    graph_hash,
    load_model,
    model_to_bytes,
    model_file_bytes,
)
from modelsqueeze.pack import Pair, skeleton
from modelsqueeze.sidecar import HEADER_BYTES, rebound
from modelsqueeze.passes import AUTO_MIN_SHARE, Selection


@dataclass
class TensorRow:
    name: str
    ops: str
    role: str
    shape: list[int]
    params: int
    dtype: str
    kind: str  # how it is stored: dense / sparse_initializer in the graph, or the sidecar record kind
    sparsity: float
    unique_values: int
    original_bytes: int
    stored_bytes: int
    # For records with codes (codebook indices, quantized codes): bits each code takes as stored,
    # and the Shannon entropy of the codes, the limit any entropy coder can reach.
    index_bits_stored: float | None = None
    index_entropy_bits: float | None = None
    # Why the compression commands leave this tensor alone by default (None: they do not).
    left_out: str | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.params if self.params else 0.0

    @property
    def bits_per_nonzero(self) -> float:
        """What each surviving (non-zero) weight costs, position included."""
        nonzeros = round(self.params * (1.0 - self.sparsity))
        return 8.0 * self.stored_bytes / nonzeros if nonzeros else 0.0


@dataclass
class Report:
    model: str
    sidecar: str | None
    tensors: list[TensorRow]
    onnx_bytes: int  # the graph file as written (plus any external data files)
    sidecar_bytes: int
    packed_bytes: int  # skeleton + sidecar: the bytes `modelsqueeze pack` writes
    gzip_bytes: int | None  # gzip -9 of each file of the pack, to compare with other tools' figures (None: --no-gzip)
    skeleton_bytes: int = 0  # the pack's graph file (the model file itself when there is no sidecar)
    runnable_gzip_bytes: int | None = 0  # gzip -9 of the model file (what zip-based app bundles give)
    runs: bool = True  # the model file runs on its own (False: it is a pack's skeleton)
    baseline: str | None = None
    baseline_bytes: int | None = None
    baseline_gzip_bytes: int | None = None
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    # A previous report (`report --json` saved in the repository): the CI size gate compares with it.
    previous: str | None = None
    previous_bytes: int | None = None
    previous_accuracy: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return self.baseline_bytes / self.packed_bytes if self.baseline_bytes and self.packed_bytes else None

    @property
    def drop_pp(self) -> float | None:
        if self.accuracy is None or self.baseline_accuracy is None:
            return None
        return 100.0 * (self.baseline_accuracy - self.accuracy)

    @property
    def growth_pct(self) -> float | None:
        """How much bigger than the previous report's packed size, in percent (negative: smaller)."""
        if self.previous_bytes is None:
            return None
        return 100.0 * (self.packed_bytes - self.previous_bytes) / self.previous_bytes if self.previous_bytes else float("inf")

    def totals(self) -> dict[str, float]:
        params = sum(t.params for t in self.tensors)
        stored = sum(t.stored_bytes for t in self.tensors)
        zeros = sum(t.sparsity * t.params for t in self.tensors)
        return {
            "params": params,
            "original_bytes": sum(t.original_bytes for t in self.tensors),
            "stored_bytes": stored,
            "sparsity": zeros / params if params else 0.0,
            "bits_per_weight": 8.0 * stored / params if params else 0.0,
            "bits_per_nonzero": 8.0 * stored / (params - zeros) if params > zeros else 0.0,
        }

    def left_out(self) -> list[dict]:
        """The float tensors the commands leave alone by default, with why and their share of all
        the float tensors' bytes: what a ratio cannot reach without `--layers`."""
        total = sum(t.original_bytes for t in self.tensors) or 1
        rows = [t for t in self.tensors if t.left_out]
        return [{"name": t.name, "reason": t.left_out, "bytes": t.original_bytes, "share": t.original_bytes / total}
                for t in sorted(rows, key=lambda t: -t.original_bytes)]

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, obj in zip(data["tensors"], self.tensors):
            row["bits_per_weight"] = obj.bits_per_weight
            row["bits_per_nonzero"] = obj.bits_per_nonzero
        data.update(left_out=self.left_out(), totals=self.totals(), ratio=self.ratio, drop_pp=self.drop_pp, growth_pct=self.growth_pct,
                    ok=not self.failures)
        return data


def _gzip_sizes(groups: list[list[bytes]]) -> list[int]:
    """Bytes of `gzip -9` of each blob, summed per group (each file a user ships, compressed on its
    own). The gzip program is used where it exists, so the figure matches what users measure; the
    blobs are compressed at the same time, one process each (gzip -9 takes up to 0.8 s per MB on
    repetitive weights)."""
    from concurrent.futures import ThreadPoolExecutor

    program = shutil.which("gzip")

    def size(blob: bytes) -> int:
        if program:
            return len(subprocess.run([program, "-9", "-n", "-c"], input=blob, capture_output=True, check=True).stdout)
        return len(gzip.compress(blob, compresslevel=9, mtime=0))

    blobs = [blob for group in groups for blob in group]
    with ThreadPoolExecutor(max_workers=max(1, min(len(blobs), os.cpu_count() or 1))) as pool:
        sizes = iter(list(pool.map(size, blobs)))
    return [sum(next(sizes) for _ in group) for group in groups]


def entropy_bits(symbols: np.ndarray) -> float:
    """Shannon entropy of a stream of non-negative integers, in bits per symbol."""
    counts = np.bincount(symbols.astype(np.int64))
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum())


def left_out_reason(info: WeightInfo, recorded: bool, picked: bool = True) -> str | None:
    """Why the compression commands leave `info` alone by default, or None (`picked`: whether the
    default selection takes it: fixed bases and tiny tensors are weights it does not take)."""
    if recorded:
        return None
    if info.role in COMPRESSIBLE_ROLES:
        if picked:
            return None
        if fixed_basis(info):
            return "a fixed signal-processing basis (windowed sinusoids); --layers NAME compresses it"
        return f"tiny ({info.n_params:,} parameters, under {AUTO_MIN_SHARE:.1%} of the model); --min-params 0 compresses it"
    if not info.consumers:
        return "read by no node"
    if info.role in ("bias", "norm"):
        return f"a {info.role} of {info.ops}"
    return f"read by {info.ops}, not as a layer's weight"


def tensor_rows(pair: Pair) -> list[TensorRow]:
    records = pair.records
    record_bytes = pair.sidecar.record_bytes if pair.sidecar else {}
    rows = []
    picked = {info.key for info in Selection().pick(pair.model)}
    for info in find_weights(pair.model):
        array = info.array()
        record = records.get(info.key)
        codes_stored = codes_entropy = None
        if record is not None:
            kind, stored = f"msq:{record.kind}", record_bytes[info.key]
            if record.indices is not None and record.indices.size:
                coded = "+huffman" if record.stream_codecs else ""
                kind += coded
                codes_stored = 8.0 * pair.sidecar.stream_bytes[info.key]["indices"] / record.indices.size
                codes_entropy = entropy_bits(record.indices)
        elif info.source == "sparse_initializer":
            kind = "sparse_initializer"
            stored = info.proto.values.ByteSize() + info.proto.indices.ByteSize()
        else:
            kind, stored = "dense", array.nbytes
        rows.append(
            TensorRow(
                name=info.key, ops=info.ops, role=info.role, shape=list(info.shape), params=info.n_params,
                dtype=info.dtype, kind=kind,
                sparsity=float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0,
                unique_values=int(np.unique(array).size), original_bytes=int(array.nbytes), stored_bytes=int(stored),
                index_bits_stored=codes_stored, index_entropy_bits=codes_entropy,
                left_out=left_out_reason(info, record is not None, info.key in picked),
            )
        )
    return rows


def build_report(pair: Pair, baseline: Path | None = None, gzip_figures: bool = True) -> Report:
    """Sizes of `pair` (and of `baseline`, when given). Accuracy is filled in by the caller.
    `gzip_figures=False` leaves the gzip -9 reference figures out (None)."""
    records = list(pair.records.values())
    side_bytes = pair.sidecar_path.stat().st_size if pair.sidecar_path else 0
    runnable = read_input(pair.path, "an .onnx file")
    gzipped = [[runnable]]  # each file gzipped on its own: the runnable file, the pack's, the baseline
    if pair.sidecar:
        # The pack as `write_pack` writes it: the skeleton, and the sidecar bound to it.
        model = skeleton(pair.model, records)
        bare = model_to_bytes(model)
        side_data = read_input(pair.sidecar_path, "a sidecar file")
        side_data = rebound(side_data[:HEADER_BYTES], graph_hash(model), str(pair.sidecar_path)) + side_data[HEADER_BYTES:]
        packed = len(bare) + side_bytes
        gzipped.append([bare, side_data])
        onnx_bytes = len(runnable)
    else:
        onnx_bytes = model_file_bytes(pair.path)
        packed = onnx_bytes
    if baseline is not None:
        load_model(baseline)  # a bad baseline is reported like any bad model
        gzipped.append([read_input(baseline, "an .onnx file")])
    sizes: list[int | None] = _gzip_sizes(gzipped) if gzip_figures else [None] * len(gzipped)
    runnable_gz = sizes[0]
    gz = sizes[1] if pair.sidecar else runnable_gz
    report = Report(
        model=str(pair.path), sidecar=str(pair.sidecar_path) if pair.sidecar_path else None,
        tensors=tensor_rows(pair), onnx_bytes=onnx_bytes, sidecar_bytes=side_bytes,
        packed_bytes=packed, gzip_bytes=gz, skeleton_bytes=packed - side_bytes, runnable_gzip_bytes=runnable_gz, runs=pair.runs,
    )
    if baseline is not None:
        report.baseline = str(baseline)
        report.baseline_bytes = model_file_bytes(Path(baseline))
        report.baseline_gzip_bytes = sizes[-1]
    return report


def load_previous(report: Report, path: Path) -> None:
    """Fill `previous_*` from a saved `report --json` (the committed size baseline of a CI gate)."""
    try:
        if not Path(path).exists() and not Path(path).is_symlink():
            raise FileNotFoundError(path)
        # a byte order mark from an editor is fine; a saved report is a few kB, never megabytes
        text = read_input(path, "a saved report --json", max_bytes=16 << 20).decode("utf-8-sig")
    except ModelSqueezeError as exc:
        raise ModelSqueezeError(f"--baseline-json {exc}") from None
    except FileNotFoundError:
        raise ModelSqueezeError(f"--baseline-json {path}: not found (make one with `modelsqueeze report MODEL --json > {path}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSqueezeError(f"--baseline-json {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ModelSqueezeError(f"--baseline-json {path}: nested too deeply to be a saved report") from None
    except json.JSONDecodeError as exc:
        raise ModelSqueezeError(f"--baseline-json {path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    size = data.get("packed_bytes") if isinstance(data, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ModelSqueezeError(f"--baseline-json {path}: no packed_bytes count in it (is it the output of `modelsqueeze report --json`?)")
    if size == 0:  # growth over nothing is no percentage
        raise ModelSqueezeError(f"--baseline-json {path}: packed_bytes is 0, which no model weighs")
    accuracy = data.get("accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1):
        raise ModelSqueezeError(f"--baseline-json {path}: accuracy {accuracy!r} is not a fraction from 0 to 1")
    report.previous, report.previous_bytes, report.previous_accuracy = str(path), size, accuracy


def parse_growth(text: str) -> float:
    """Percent from '1%', '0.5%' or '2' (percent either way)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ModelSqueezeError(f"--max-growth {text!r}: expected a percentage such as 1% or 0.5") from None
    if not np.isfinite(value) or value < 0:
        raise ModelSqueezeError(f"--max-growth {text!r}: expected a percentage, 0 or more")
    return value


def check_thresholds(report: Report, max_bytes: int | None, min_ratio: float | None, max_drop: float | None,
                     max_growth: float | None = None) -> list[str]:
    """The CI gate: one message per threshold that failed. The accuracy drop is measured against
    the baseline model when one is given, else against the previous report's accuracy."""
    failures = []
    if max_bytes is not None and report.packed_bytes > max_bytes:
        failures.append(f"packed size {report.packed_bytes:,} B exceeds --max-bytes {max_bytes:,} B")
    if min_ratio is not None:
        if report.ratio is None:
            raise ModelSqueezeError("--min-ratio needs --baseline ORIGINAL.onnx to compute a ratio")
        if report.ratio < min_ratio:
            failures.append(f"ratio {report.ratio:.2f}x is below --min-ratio {min_ratio:g}x")
    if max_growth is not None:
        if report.growth_pct is None:
            raise ModelSqueezeError("--max-growth needs --baseline-json SIZE.json (a saved `report --json`)")
        if report.growth_pct > max_growth:
            failures.append(
                f"packed size {report.packed_bytes:,} B grew {report.growth_pct:.2f}% over {report.previous_bytes:,} B "
                f"in {report.previous}, more than --max-growth {max_growth:g}%"
            )
    if max_drop is not None:
        reference, against = report.baseline_accuracy, report.baseline
        if reference is None and report.accuracy is not None and report.previous_accuracy is not None:
            reference, against = report.previous_accuracy, report.previous
        if reference is None or report.accuracy is None:
            raise ModelSqueezeError("--max-drop needs --data DATA.npz and --baseline ORIGINAL.onnx "
                                    "(or a --baseline-json holding an accuracy)")
        drop = 100.0 * (reference - report.accuracy)
        if drop > max_drop:
            failures.append(
                f"accuracy dropped {drop:.2f} pp ({100 * reference:.2f}% in {against} -> "
                f"{100 * report.accuracy:.2f}%), more than --max-drop {max_drop:g} pp"
            )
    report.failures = failures
    return failures


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _summary_lines(report: Report) -> list[tuple[str, str]]:
    if report.runs:
        gz = "" if report.runnable_gzip_bytes is None else f" (gzip -9: {_fmt_bytes(report.runnable_gzip_bytes)} B)"
        lines = [("runnable (the .onnx alone)", f"{_fmt_bytes(report.onnx_bytes)} B{gz}")]
    else:
        lines = [("model file: a pack's skeleton", f"{_fmt_bytes(report.onnx_bytes)} B (runs once unpacked: `modelsqueeze unpack`)")]
    if report.sidecar:
        lines.append(("sidecar", f"{_fmt_bytes(report.sidecar_bytes)} B"))
        lines.append(("packed (`modelsqueeze pack`)", f"{_fmt_bytes(report.packed_bytes)} B: skeleton "
                                                      f"{_fmt_bytes(report.skeleton_bytes)} B + sidecar"))
    else:
        lines.append(("packed (`modelsqueeze pack`)", f"{_fmt_bytes(report.packed_bytes)} B: the model file itself"))
    if report.gzip_bytes is not None:
        lines.append(("gzip -9 of packed", f"{_fmt_bytes(report.gzip_bytes)} B"))
    if report.baseline:
        lines.append(("baseline", f"{_fmt_bytes(report.baseline_bytes)} B ({report.baseline})"))
        if report.baseline_gzip_bytes is not None:
            lines.append(("gzip -9 of baseline", f"{_fmt_bytes(report.baseline_gzip_bytes)} B"))
        lines.append(("ratio", f"{report.ratio:.2f}x"))
    left = report.left_out()
    if left:
        share = sum(row["share"] for row in left)
        top = left[0]
        lines.append(("left out by default", f"{len(left)} tensors, {100 * share:.1f}% of the float bytes "
                                              f"(largest: {top['name']}, {top['reason']})"))
    if report.accuracy is not None:
        lines.append(("accuracy", f"{100 * report.accuracy:.2f}%"))
    if report.baseline_accuracy is not None:
        lines.append(("baseline accuracy", f"{100 * report.baseline_accuracy:.2f}%"))
        lines.append(("drop", f"{report.drop_pp:+.2f} pp"))
    if report.previous is not None:
        lines.append(("previous packed", f"{_fmt_bytes(report.previous_bytes)} B ({report.previous}), "
                                         f"growth {report.growth_pct:+.2f}%"))
        if report.previous_accuracy is not None:
            lines.append(("previous accuracy", f"{100 * report.previous_accuracy:.2f}%"))
    return lines


_COLUMNS = ["tensor", "op", "shape", "params", "dtype", "stored as", "sparsity", "unique", "bits/w", "bits/nz", "code bits (H)", "bytes orig → stored"]


def _row_cells(t: TensorRow) -> list[str]:
    return [
        t.name, t.ops, "×".join(map(str, t.shape)) or "scalar", f"{t.params:,}", t.dtype, t.kind,
        f"{100 * t.sparsity:.1f}%", f"{t.unique_values:,}", f"{t.bits_per_weight:.2f}", f"{t.bits_per_nonzero:.2f}",
        "-" if t.index_bits_stored is None else f"{t.index_bits_stored:.2f} ({t.index_entropy_bits:.2f})",
        f"{t.original_bytes:,} → {t.stored_bytes:,}",
    ]


def _total_cells(report: Report) -> list[str]:
    tot = report.totals()
    return [
        "total", "", "", f"{tot['params']:,}", "", "", f"{100 * tot['sparsity']:.1f}%", "",
        f"{tot['bits_per_weight']:.2f}", f"{tot['bits_per_nonzero']:.2f}", "", f"{tot['original_bytes']:,} → {tot['stored_bytes']:,}",
    ]


def rich_table(report: Report) -> Table:
    table = Table(title=escape(report.model), title_justify="left", box=box.SIMPLE_HEAD)
    for col in _COLUMNS:
        right = col in ("params", "sparsity", "unique", "bits/w", "bits/nz", "code bits (H)")
        table.add_column(col, justify="right" if right else "left", no_wrap=col != "bytes orig → stored")
    for t in report.tensors:
        table.add_row(*map(Text, _row_cells(t)))
    table.add_section()
    table.add_row(*map(Text, _total_cells(report)), style="bold")
    return table


def summary_table(report: Report) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in _summary_lines(report):
        table.add_row(Text(key), Text(value))
    return table


def markdown(report: Report) -> str:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"### {report.model}", "", row(_COLUMNS), row(["---"] * len(_COLUMNS))]
    lines += [row(_row_cells(t)) for t in report.tensors]
    lines += [row([f"**{c}**" if c else "" for c in _total_cells(report)]), ""]
    lines += [row(["", ""]).replace("|  |  |", "| measure | value |"), "| --- | --- |"]
    lines += [row([k, v]) for k, v in _summary_lines(report)]
    lines += [f"\n**FAILED:** {f}" for f in report.failures]
    return "\n".join(lines) + "\n"
