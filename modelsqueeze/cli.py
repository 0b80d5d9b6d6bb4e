"""The Typer app: one thin function per command (parse options, show progress, print results)."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import numpy as np
import onnx
import typer
from google.protobuf.message import EncodeError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from modelsqueeze import __version__
from modelsqueeze.errors import CheckFailed, ModelSqueezeError
from modelsqueeze.model import atomic_write_bytes, check_output, find_weights, model_file_bytes
from modelsqueeze.pack import (SIDECAR_SUFFIX, check_not_read_from, check_outputs, load_pair, packed_size, rendered, sidecar_path, skeleton_size,
                               unpack as unpack_pair, write_pack, write_pair)
from modelsqueeze.passes import parallel, watching
from modelsqueeze.pipeline import run_steps
from modelsqueeze.recipe import Recipe, Step, dump_recipe, load_recipe, make_step, step_options
from modelsqueeze.report import build_report, check_thresholds, load_previous, markdown, parse_growth, rich_table, summary_table
from modelsqueeze.validate import (
    Runner,
    accuracy,
    Metric,
    Scorer,
    data_notes,
    data_options,
    fidelity,
    headline_output,
    label_key,
    load_npz,
    metric_value,
    parse_batch_axes,
    parse_dims,
    random_inputs,
    sample_count_hint,
    split_data,
    top1_accuracy,
)

app = typer.Typer(
    name="modelsqueeze",
    help="Make saved ONNX models smaller (Deep Compression: prune, cluster, quantize, SVD, Huffman) "
    "and prove with onnxruntime that they still work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
# Piped output (CI logs, files) has no terminal width; give tables room instead of rich's 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)

ModelArg = Annotated[Path, typer.Argument(help="The ONNX model (its sidecar NAME.msq beside it is read too).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes, only results and errors.")]
BatchAxisOpt = Annotated[list[str], typer.Option(
    "--batch-axis", help="An input's sample axis in the data, INPUT=AXIS, or INPUT=none to feed it whole to every batch "
    "(default: from the model's dims; 0-d arrays are fed whole). Repeatable.")]
LabelsOpt = Annotated[Optional[str], typer.Option("--labels", help="The data's label array (default `y`).")]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]


def _one_line(text: str) -> str:
    """An error is one line on stderr, whatever the file names in it hold."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def handles_errors(command: Callable) -> Callable:
    """Turn our errors into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            # Any command that reads data: --batch-axis / --labels shape how arrays meet the
            # model's inputs, and what the reader notices is one note line on stderr each.
            quiet = bool(kwargs.get("quiet"))
            with data_options(parse_batch_axes(kwargs.get("batch_axis") or []), kwargs.get("labels")), \
                    data_notes(lambda note: None if quiet else err.print(f"note: {escape(note)}", highlight=False)):
                return command(*args, **kwargs)
        except CheckFailed as exc:
            err.print(f"[bold red]check failed:[/] {escape(_one_line(str(exc)))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except ModelSqueezeError as exc:
            err.print(f"[bold red]error:[/] {escape(_one_line(str(exc)))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except EncodeError:  # protobuf cannot serialize a message over 2 GB
            err.print("[bold red]error:[/] the model is over protobuf's 2 GB limit once its weights are in memory; "
                      "compressing models this large is not supported yet", highlight=False)
            raise typer.Exit(2) from None
        except MemoryError:
            err.print("[bold red]error:[/] out of memory (the model, or a tensor it declares, is too large for this machine)",
                      highlight=False)
            raise typer.Exit(2) from None
        except OSError as exc:  # a write that fails midway (disk full, folder gone): one line, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            err.print(f"[bold red]error:[/] {escape(_one_line(where + (exc.strerror or str(exc))))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@contextmanager
def progress_bar(description: str, total: int, quiet: bool) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; `advance(n, description=None)` moves it (and relabels it).
    Silent when quiet."""
    if quiet or not err.is_terminal:  # a bar in a log file is noise
        yield lambda n, description=None: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int, description: str | None = None) -> None:
            progress.update(task, advance=n, **({"description": description} if description else {}))

        yield advance


@contextmanager
def step_progress(label: str, n_steps: int, quiet: bool) -> Iterator[tuple[Callable, Callable]]:
    """Two bars on stderr: the steps, and the tensors of the current step. Yields the callbacks
    (on_step(index, step), on_tensor(done, total)); silent when quiet or not a terminal."""
    if quiet or not err.is_terminal:
        yield (lambda index, step: None), (lambda done, total: None)
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        steps = progress.add_task(label, total=n_steps)
        tensors = progress.add_task("  tensors", total=None)

        def on_step(index: int, step) -> None:
            progress.update(steps, completed=index, description=f"{label}: step {index + 1}/{n_steps} {step.command}")
            progress.reset(tensors, total=None, description=f"  {step.command}: tensors")

        def on_tensor(done: int, total: int) -> None:
            progress.update(tensors, completed=done, total=total)

        yield on_step, on_tensor
        progress.update(steps, completed=n_steps)


def _sensitivity_table(rows: list[dict]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title="output sensitivity: each tensor alone at int8 per channel",
                  title_justify="left")
    for col in ("tensor", "params", "output", "SNR", "top-1 agreement", ""):
        table.add_column(col, justify="left" if col in ("tensor", "output", "") else "right")
    for row in rows:
        table.add_row(Text(row["name"]), f"{row['params']:,}", Text(row["output"]),
                      "-" if row["snr_db"] is None else Metric("snr").show(row["snr_db"]),
                      "-" if row["top1_agreement"] is None else f"{100 * row['top1_agreement']:.2f}%", Text(row["note"]))
    return table


def _agreement_text(fid: dict) -> str:
    return "n/a (no class axis)" if fid["top1_agreement"] is None else f"{100 * fid['top1_agreement']:.2f}%"


def _snr_text(fid: dict) -> str:
    if fid["snr_db"] is not None:
        return f"{fid['snr_db']:.2f} dB"
    return "identical" if fid["max_abs_error"] == 0 else "undefined (zero reference)"


def _run(runner: Runner, feeds, label: str, quiet: bool) -> list:
    samples = runner.samples(feeds)
    with progress_bar(f"running {label}", samples.n, quiet) as advance:
        return runner.run(samples, advance)


def _labelled_accuracy(model, label: str, arrays: dict, source: str, quiet: bool) -> float:
    """validate.top1_accuracy with a progress bar (the shared path of report and --validate)."""
    with progress_bar(f"running {label}", sample_count_hint(arrays), quiet) as advance:
        return top1_accuracy(model, arrays, label, source, advance)


def parse_size(text: str) -> int:
    """Bytes from '123', '1.5MB', '200KiB', '2G' (decimal K/M/G, binary KiB/MiB/GiB)."""
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower()
    number = s.rstrip("kmgibB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ModelSqueezeError(f"--max-bytes {text!r}: expected a size such as 1500000, 1.5MB or 200KiB") from None
    if unit not in units or not 0 <= value < 2**63:
        raise ModelSqueezeError(f"--max-bytes {text!r}: expected a size such as 1500000, 1.5MB or 200KiB")
    return int(value * units[unit])


def _finite(value):
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _print_json(data: dict) -> None:
    print(json.dumps(_finite(data), indent=2, allow_nan=False, default=str))


def _check_finite(**options: float | None) -> None:
    for name, value in options.items():
        if value is not None and not np.isfinite(value):
            raise ModelSqueezeError(f"--{name.replace('_', '-')} {value}: must be a finite number")


def _version(value: bool) -> None:
    if value:
        print(f"modelsqueeze {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Make saved ONNX models smaller and prove with onnxruntime that they still work."""


@app.command("eval", epilog="Examples:  modelsqueeze eval small.onnx --data sample_models/lenet300.npz   |   "
             "modelsqueeze eval small.onnx --reference sample_models/lenet300.onnx --random 256")
@handles_errors
def eval_command(
    model: ModelArg,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Labelled .npz: input arrays by input name (or `x`) and `y` labels.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", "-r", help="Compare outputs with this model (fidelity).")] = None,
    random: Annotated[Optional[int], typer.Option("--random", help="Generate N inputs from the input signature instead of --data.")] = None,
    dim: Annotated[list[str], typer.Option("--dim", help="Size of a dynamic input dimension, NAME=VALUE (repeatable).")] = [],
    seed: Annotated[int, typer.Option(help="Seed for --random inputs.")] = 0,
    metric: Annotated[Optional[str], typer.Option("--metric", help="The figure to headline: top1 (accuracy, needs labels) | agreement | snr (against --reference); :OUTPUT picks the output, e.g. snr:probabilities.")] = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1 accuracy on labelled data, and fidelity against a reference model."""
    if data is None and reference is None:
        raise ModelSqueezeError("give --data DATA.npz (accuracy) and/or --reference ORIGINAL.onnx (fidelity)")
    if data is not None and random is not None:
        raise ModelSqueezeError("give either --data or --random, not both")
    if random is not None and reference is None:
        raise ModelSqueezeError("--random inputs have no labels: compare with --reference ORIGINAL.onnx")
    gauge = Metric.parse(metric)
    if metric is not None and gauge.kind != "top1" and reference is None:
        raise ModelSqueezeError(f"--metric {gauge.text} compares with a reference: add --reference ORIGINAL.onnx")
    pair = load_pair(model)
    runner = Runner(pair.runnable(), str(model))
    ref_runner = Runner(load_pair(reference).runnable(), str(reference)) if reference else None
    labels = None
    if data is not None:
        samples = split_data(load_npz(data), runner, str(data))
        feeds, labels = samples, samples.labels
        source = str(data)
    else:
        n = 100 if random is None else random
        feeds = runner.samples(random_inputs(runner, pair.model, n, parse_dims(dim), seed))
        source = f"{n} random inputs (seed {seed})"
    result: dict = {"model": str(model), "data": source, "samples": int(feeds.n)}
    if labels is None and ref_runner is None:
        raise ModelSqueezeError(f"{data}: no `{label_key()}` labels for accuracy; add --reference ORIGINAL.onnx for fidelity")
    outputs = _run(runner, feeds, str(model), quiet)
    if labels is not None:
        result["accuracy"] = accuracy(outputs[0], labels, source)
    if ref_runner is not None:
        ref_outputs = _run(ref_runner, feeds, str(reference), quiet)
        result["reference"] = str(reference)
        if labels is not None:
            result["reference_accuracy"] = accuracy(ref_outputs[0], labels, source)
        if len(ref_outputs) != len(outputs):
            raise ModelSqueezeError(f"{model} has {len(outputs)} outputs, the reference {len(ref_outputs)}")
        # The headline is the first float output (the scores: skl2onnx classifiers put an int64
        # label first); every output is listed.
        headline = gauge.output_index(runner) if gauge.kind != "top1" else headline_output(runner)
        result["headline_output"] = runner.output_names[headline]
        result["fidelity"] = fidelity(outputs[headline], ref_outputs[headline])
        if len(outputs) > 1:
            result["fidelity_per_output"] = {
                name: fidelity(o, r) for name, o, r in zip(runner.output_names, outputs, ref_outputs)
            }
    if metric is not None:
        index = gauge.output_index(runner)
        if gauge.kind == "top1":
            if labels is None:
                raise ModelSqueezeError(f"--metric top1 needs labels: {data or 'random inputs'} has no `{label_key()}`")
            value = accuracy(outputs[index], labels, source)
        else:
            value = metric_value(gauge, fidelity(outputs[index], ref_outputs[index]), runner.output_names[index],
                                 outputs[index].shape)
        result["metric"] = {"metric": gauge.text, "output": runner.output_names[index], "value": value}
    if as_json:
        _print_json(result)
        return
    out.print(f"[bold]eval[/] {escape(str(model))} on {escape(source)}", highlight=False)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("samples", str(result["samples"]))
    if "metric" in result:
        table.add_row(Text(f"{result['metric']['metric']} ({result['metric']['output']})"),
                      gauge.show(result["metric"]["value"]))
    if "accuracy" in result:
        table.add_row("top-1 accuracy", f"{100 * result['accuracy']:.2f}%")
    if "reference_accuracy" in result:
        table.add_row("reference accuracy", f"{100 * result['reference_accuracy']:.2f}%")
    if "fidelity" in result:
        fid = result["fidelity"]
        snr = _snr_text(fid)
        table.add_row("top-1 agreement", _agreement_text(fid))
        table.add_row("max abs error", f"{fid['max_abs_error']:.6g}")
        table.add_row("mean abs error", f"{fid['mean_abs_error']:.6g}")
        table.add_row("cosine similarity", f"{fid['cosine_similarity']:.6f}")
        table.add_row("SNR", snr)
        if "fidelity_per_output" in result:
            table.add_row("headline output", Text(result["headline_output"]))
        for name, fid in result.get("fidelity_per_output", {}).items():
            table.add_row(Text(f"output {name}"), f"SNR {_snr_text(fid)}, top-1 agreement {_agreement_text(fid)}, "
                          f"max abs error {fid['max_abs_error']:.6g}, cosine {fid['cosine_similarity']:.6f}")
    out.print(table)


@app.command(epilog="Examples:  modelsqueeze report small.onnx --baseline sample_models/lenet300.onnx   |   "
             "modelsqueeze report small.onnx --baseline big.onnx --data test.npz --max-drop 1 --min-ratio 10 --max-bytes 100KB   |   "
             "CI size gate: modelsqueeze report small.onnx --data test.npz --baseline-json size.json --max-growth 1% --max-drop 0.5   |   "
             "modelsqueeze report small.onnx --plot weights.png   |   quick sizes only: modelsqueeze report small.onnx --no-gzip")
@handles_errors
def report(
    model: ModelArg,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", "-b", help="The original model: ratio and accuracy drop against it.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Labelled .npz: report top-1 accuracy (and the baseline's).")] = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (for PR comments, docs).")] = False,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", help="Fail (exit 1) if the packed size exceeds this (e.g. 120000, 1.5MB, 200KiB).")] = None,
    min_ratio: Annotated[Optional[float], typer.Option("--min-ratio", help="Fail (exit 1) if baseline/packed is below this ratio.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Fail (exit 1) if accuracy falls more than PP percentage points below the baseline's (needs --data and --baseline or a --baseline-json with an accuracy).")] = None,
    baseline_json: Annotated[Optional[Path], typer.Option("--baseline-json", help="A saved `report --json` (e.g. committed as size.json): --max-growth and --max-drop compare with it.")] = None,
    max_growth: Annotated[Optional[str], typer.Option("--max-growth", help="Fail (exit 1) if the packed size grew more than this over --baseline-json, e.g. 1% or 0.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write per-layer weight histograms with codebook centroids / quantization grid marked (.png, .svg, .pdf; needs matplotlib).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing --plot file.")] = False,
    gzip_figures: Annotated[bool, typer.Option("--gzip/--no-gzip", help="Measure gzip -9 of the model file, of the pack and of the baseline, for comparison with other tools (one gzip process per file, at the same time; gzip -9 takes up to 0.8 s per MB on repetitive weights). --no-gzip leaves them out (null in --json).")] = True,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="With --data (labels not needed): per tensor, the output SNR and top-1 agreement with that tensor alone quantized to int8 per channel, lowest first (fixed signal-processing bases and sensitive heads show up at the top).")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-tensor and total sizes, sparsity, unique values, bits per weight, ratio and accuracy; CI gates."""
    if as_json and as_markdown:
        raise ModelSqueezeError("give --json or --markdown, not both")
    _check_finite(min_ratio=min_ratio, max_drop=max_drop)
    limit = parse_size(max_bytes) if max_bytes is not None else None
    growth = parse_growth(max_growth) if max_growth is not None else None
    if growth is not None and baseline_json is None:
        raise ModelSqueezeError("--max-growth needs --baseline-json SIZE.json (a saved `report --json`)")
    if max_drop is not None and (data is None or (baseline is None and baseline_json is None)):
        raise ModelSqueezeError("--max-drop needs --data DATA.npz and --baseline ORIGINAL.onnx (or --baseline-json SIZE.json)")
    if min_ratio is not None and baseline is None:
        raise ModelSqueezeError("--min-ratio needs --baseline ORIGINAL.onnx to compute a ratio")
    if sensitivity and data is None:
        raise ModelSqueezeError("--sensitivity needs --data DATA.npz (the model's inputs; labels not needed)")
    if plot is not None:
        from modelsqueeze import plots

        plots.check_plot_path(plot)
        check_output(plot, force, [model, sidecar_path(model)] + ([baseline] if baseline else []))
        plots.require_matplotlib()
    pair = load_pair(model)
    result = build_report(pair, baseline, gzip_figures)
    if baseline_json is not None:
        load_previous(result, baseline_json)
    rows = None
    if data is not None:
        arrays = load_npz(data)
        if sensitivity:
            from modelsqueeze.sensitivity import output_sensitivity, sensitivity_infos

            infos = sensitivity_infos(pair.model)
            with progress_bar(f"int8 one tensor at a time: {model.name}", len(infos), quiet) as advance:
                rows = output_sensitivity(pair.model, pair.records, arrays, str(data), advance, infos)
    if data is not None and (not sensitivity or label_key() in arrays or max_drop is not None):
        result.accuracy = _labelled_accuracy(pair.runnable(), str(model), arrays, str(data), quiet)
        if baseline is not None:
            result.baseline_accuracy = _labelled_accuracy(load_pair(baseline).runnable(), str(baseline), arrays, str(data), quiet)
    failures = check_thresholds(result, limit, min_ratio, max_drop, growth)
    if plot is not None:
        layers, title = plots.histogram_layers(pair), f"weights of {model.name}"
        if baseline is not None:  # the original weights under the compressed model's centroids / grid
            original = {w.key: w.array() for w in find_weights(load_pair(baseline).model)}
            layers = [dataclasses.replace(layer, values=original[layer.name][original[layer.name] != 0])
                      if layer.name in original else layer for layer in layers]
            title = f"weights of {baseline.name} with the codebooks / grids of {model.name}"
        plots.plot_histograms(layers, plot, title=title)
    if as_json:
        _print_json({**result.to_dict(), **({"output_sensitivity": rows} if rows is not None else {})})
    elif as_markdown:
        print(markdown(result), end="")
    else:
        out.print(rich_table(result))
        out.print(summary_table(result))
        if rows is not None:
            out.print(_sensitivity_table(rows))
    if failures:
        raise CheckFailed("; ".join(failures))


# ---------------------------------------------------------------------------------------------
# Transforming commands share one runner: load the pair, run the pass, validate, write the pair.

OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output model; its sidecar OUT.msq is written beside it.", show_default=False)]
LayersOpt = Annotated[list[str], typer.Option("--layers", help="Only tensors whose name, or a consuming node's name, matches this glob (repeatable).")]
ExcludeOpt = Annotated[list[str], typer.Option("--exclude", help="Leave tensors matching this glob alone (repeatable).")]
MinParamsOpt = Annotated[Optional[int], typer.Option("--min-params", help="Leave tensors with fewer parameters alone. Default: leave alone those under 1,024 parameters that are also under 0.1% of the model's (they weigh next to nothing and small errors show there); 0 compresses every tensor.", show_default=False)]
ValidateOpt = Annotated[Optional[Path], typer.Option("--validate", help="Labelled .npz: print accuracy before and after.")]
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", "-c", help="Inputs (.npz, labels not needed, e.g. a few thousand training samples): fit each layer to its original outputs, not only its weights.")]
SequentialOpt = Annotated[bool, typer.Option("--sequential", help="With --calibration: fit each layer to the inputs the already-compressed layers before it produce.")]
DampOpt = Annotated[float, typer.Option("--damp", help="With --calibration: ridge added to XᵀX, as a fraction of its mean diagonal.")]
MaxDropOpt = Annotated[Optional[float], typer.Option("--max-drop", help="With --validate: exit 1, writing nothing, if accuracy falls by more than PP percentage points.")]
MetricOpt = Annotated[Optional[str], typer.Option("--metric", help="With --validate: top1 (accuracy on the labels, the default) | agreement (top-1 agreement with the input model, no labels needed) | snr (output SNR against the input model, dB; gate with --min-snr); :OUTPUT picks the output, e.g. snr:probabilities.")]
MinSnrOpt = Annotated[Optional[float], typer.Option("--min-snr", help="With --metric snr: exit 1, writing nothing, if the output's SNR against the input falls below DB.")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", help="Threads for independent tensors (cluster's k-means, Huffman coding). The output is the same for any value.")]


def _transform(
    model: Path, output: Path, force: bool, steps: list[Step], command: str,
    validate: Optional[Path], max_drop: Optional[float], as_json: bool, quiet: bool, jobs: int = 1, metric: Optional[str] = None, min_snr: Optional[float] = None,
) -> None:
    """The shared life of a transforming command (one step) and of pipeline/run (several): load,
    run the steps in memory, validate the graph exactly as it will be written, write the pair.
    Every refusal happens before anything is written."""
    _check_finite(max_drop=max_drop, min_snr=min_snr)
    gauge = Metric.parse(metric)
    if max_drop is not None and validate is None:
        raise ModelSqueezeError("--max-drop needs --validate DATA.npz")
    if max_drop is not None and max_drop < 0:
        raise ModelSqueezeError(f"--max-drop {max_drop}: must be 0 or more")
    if (metric is not None or min_snr is not None) and validate is None:
        raise ModelSqueezeError(f"{'--metric' if metric is not None else '--min-snr'} needs --validate DATA.npz")
    if min_snr is not None and gauge.kind != "snr":
        raise ModelSqueezeError("--min-snr needs --metric snr")
    if max_drop is not None and gauge.kind == "snr":
        raise ModelSqueezeError("--metric snr is measured against the input model (infinite SNR before), so there is "
                                "no drop to bound: gate it with --min-snr DB")
    pair = load_pair(model)
    if output.suffix == SIDECAR_SUFFIX:
        raise ModelSqueezeError(f"{output}: the output model must not end in {SIDECAR_SUFFIX}")
    check_not_read_from(pair.model, output)  # first: an input's file is refused even with --force
    check_outputs(output, force, [model])
    arrays = load_npz(validate) if validate is not None else None
    summary: dict = {"command": command, "input": str(model), "output": str(output), "sidecar": str(sidecar_path(output))}
    measure = None
    if arrays is not None:
        # The metric of the input, and of the graph exactly as it will be written (native forms
        # and all) after each step; agreement and snr are measured against the input's outputs.
        scorer = Scorer(gauge, arrays, None if gauge.kind == "top1" else pair.runnable(), str(validate))
        summary["metric"] = gauge.text
        with progress_bar(f"running {model}", sample_count_hint(arrays), quiet) as advance:
            first = scorer(pair.runnable() if gauge.kind == "top1" else scorer.reference, str(model), advance)
        if gauge.kind != "snr":
            summary["accuracy_before"] = first
        measure = lambda graph: scorer(graph, str(output))  # noqa: E731
    # What the summary needs of the input, kept small; the input model itself is let go as soon
    # as the first step has made its own (a pipeline holds one model at a time).
    before = {w.key: w for w in find_weights(pair.model)}
    before_rows = {key: (list(w.shape), _zero_fraction(w.array())) for key, w in before.items()}
    before_size = packed_size(pair)
    runnable_before = model_file_bytes(pair.path) if pair.runs else None
    # Weights also listed among the graph inputs (old exporters list every initializer there).
    mirrored = {v.name for v in pair.model.graph.input} & {t.name for t in pair.model.graph.initializer}
    inputs = {"model": pair.model, "records": pair.records}
    del pair, before
    with step_progress(f"{command} {model.name}", len(steps), quiet) as (on_step, on_tensor), watching(on_tensor), \
            parallel(jobs):
        final, records, outcomes = run_steps(inputs.pop("model"), inputs.pop("records"), steps, on_step, measure,
                                             size_last=False, release=True,
                                             name_steps=command in ("pipeline", "run"))
    if arrays is not None and gauge.kind == "snr":
        summary["snr_db_after"] = after = outcomes[-1].accuracy
        if min_snr is not None and after < min_snr:
            raise CheckFailed(f"SNR {gauge.show(after)} against {model.name} is below --min-snr {min_snr:g} dB; nothing written")
    elif arrays is not None:
        before, after = summary["accuracy_before"], outcomes[-1].accuracy
        summary.update(accuracy_after=after, drop_pp=100 * (before - after))
        what = "accuracy" if gauge.kind == "top1" else f"top-1 agreement with {model.name}"
        if max_drop is not None and summary["drop_pp"] > max_drop:
            raise CheckFailed(
                f"{what} fell {summary['drop_pp']:.2f} pp ({100 * before:.2f}% -> {100 * after:.2f}%), "
                f"more than --max-drop {max_drop:g}; nothing written"
            )
    record_bytes: dict[str, int] = {}
    write_pair(final, list(records.values()), output, force, inputs=[model], record_bytes=record_bytes)
    # The summary describes the pair as written from the model and records just written (not a
    # reload: that would hold every decoded record of a huge model at once).
    changed = list(dict.fromkeys(key for o in outcomes for key in o.changed))
    notes = [n for o in outcomes for n in o.notes]
    if dropped := sorted(mirrored & set(records)):
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        notes.append(f"{shown}: also listed among the graph inputs (an overridable default value, as older exporters "
                     f"list every weight); stored compressed, {'it is' if len(dropped) == 1 else 'they are'} "
                     f"no longer an input of the output")
    summary.update(
        tensors=_step_rows(before_rows, final, record_bytes, changed), notes=notes,
        packed_bytes_before=before_size,
        packed_bytes_after=(skeleton_size(final, records.values()) + sidecar_path(output).stat().st_size
                            if records else model_file_bytes(output)),
        runnable_bytes_before=runnable_before, runnable_bytes_after=model_file_bytes(output),
        sidecar_bytes=sidecar_path(output).stat().st_size if records else 0,
    )
    if not records:
        summary["sidecar"] = None
    del final, records
    if len(steps) > 1 or command in ("pipeline", "run"):
        summary["steps"] = [
            {"command": o.step.command, "options": step_options(o.step), "changed": len(o.changed),
             "packed_bytes": o.packed_bytes if o.packed_bytes is not None else summary["packed_bytes_after"],
             **({("snr_db" if summary.get("metric", "").startswith("snr") else "accuracy"): o.accuracy}
                if o.accuracy is not None else {})}
            for o in outcomes
        ]
    if as_json:
        _print_json(summary)
        return
    _print_step(summary, quiet)


def _given(**options) -> dict:
    """The options a command was given (None means 'not given': the config's default applies)."""
    return {k: v for k, v in options.items() if v is not None}


def _calibration(calibration: Optional[Path], sequential: bool, damp: float) -> dict:
    _check_finite(damp=damp)
    return {"calibration": str(calibration) if calibration is not None else None, "sequential": sequential, "damp": damp}


def _selection(layers: list[str], exclude: list[str], min_params: int | None) -> dict:
    """The selection options as given (no --min-params: the default rule)."""
    given = {"layers": list(layers), "exclude": list(exclude)}
    return given if min_params is None else {**given, "min_params": min_params}


def _zero_fraction(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0


def _step_rows(before: dict[str, tuple[list[int], float]], after: onnx.ModelProto, record_bytes: dict[str, int],
               changed: list[str]) -> list[dict]:
    """Per changed tensor: shape and sparsity before (from `before`: key -> (shape, zero fraction))
    and after (in the logical model `after`), distinct values and stored bytes (`record_bytes`:
    each sidecar record's bytes), one tensor at a time."""
    new = {w.key: w for w in find_weights(after)}
    rows = []
    for key in changed:
        a, b = before.get(key), new.get(key)
        if b is None:  # a tensor the pass replaced (svd: by its factors), listed under its new names
            continue
        new_array = b.array()
        rows.append({
            "name": key,
            "shape_before": a[0] if a else None, "shape_after": list(b.shape),
            "sparsity_before": a[1] if a else 0.0,
            "sparsity_after": _zero_fraction(new_array),
            "unique_values": int(np.unique(new_array).size),
            "stored_bytes": int(record_bytes.get(key, new_array.nbytes)),
            "bits_per_weight": 8.0 * record_bytes.get(key, new_array.nbytes) / max(new_array.size, 1),
        })
    return rows


def _print_step(summary: dict, quiet: bool) -> None:
    table = Table(box=box.SIMPLE_HEAD, title=escape(f"{summary['command']} {summary['input']} → {summary['output']}"), title_justify="left")
    for col in ("tensor", "shape", "sparsity", "unique", "stored bytes", "bits/w"):
        table.add_column(col, justify="left" if col in ("tensor", "shape") else "right", no_wrap=True)
    for row in summary["tensors"]:
        shape = "×".join(map(str, row["shape_after"]))
        if row["shape_before"] and row["shape_before"] != row["shape_after"]:
            shape = "×".join(map(str, row["shape_before"])) + " → " + shape
        table.add_row(Text(row["name"]), shape, f"{100 * row['sparsity_before']:.1f}% → {100 * row['sparsity_after']:.1f}%", f"{row['unique_values']:,}",
                      f"{row['stored_bytes']:,}", f"{row['bits_per_weight']:.2f}")
    out.print(table)
    if "steps" in summary:
        steps = Table(box=box.SIMPLE_HEAD, title="steps", title_justify="left")
        for col in ("#", "step", "options", "tensors", "packed bytes", "ratio", "accuracy"):
            steps.add_column(col, justify="left" if col in ("step", "options") else "right")
        for i, row in enumerate(summary["steps"], 1):
            options = " ".join(f"{k}={json.dumps(v)}" for k, v in row["options"].items())
            accuracy = (f"{100 * row['accuracy']:.2f}%" if "accuracy" in row
                        else Metric("snr").show(row["snr_db"]) if "snr_db" in row else "")
            steps.add_row(str(i), row["command"], Text(options), str(row["changed"]), f"{row['packed_bytes']:,}",
                          f"{summary['packed_bytes_before'] / row['packed_bytes']:.2f}x", accuracy)
        out.print(steps)
    before, after = summary["packed_bytes_before"], summary["packed_bytes_after"]
    runs_before, runs_after = summary["runnable_bytes_before"], summary["runnable_bytes_after"]
    change = f"{runs_before:,} B → {runs_after:,} B ({runs_before / runs_after:.2f}x)" if runs_before else f"{runs_after:,} B"
    side = f", sidecar {summary['sidecar_bytes']:,} B" if summary["sidecar_bytes"] else ""
    out.print(f"runnable {summary['output']} (runs as it is) {change}{side}", highlight=False)
    out.print(f"packed size {before:,} B → {after:,} B ({before / after:.2f}x): skeleton + sidecar, "
              f"the bytes `modelsqueeze pack` writes", highlight=False)
    if "accuracy_before" in summary:
        what = "accuracy" if summary["metric"].startswith("top1") else f"top-1 agreement ({summary['metric']})"
        out.print(f"{what} {100 * summary['accuracy_before']:.2f}% → {100 * summary['accuracy_after']:.2f}% "
                  f"({-summary['drop_pp']:+.2f} pp)", highlight=False)
    if "snr_db_after" in summary:
        out.print(f"SNR ({summary['metric']}) against the input: {Metric('snr').show(summary['snr_db_after'])}", highlight=False)
    if not quiet:
        for note in summary["notes"]:
            err.print(f"note: {note}", markup=False, highlight=False)


@app.command(epilog="Examples:  modelsqueeze prune lenet300.onnx -o pruned.onnx --sparsity 0.9   |   "
             "modelsqueeze prune m.onnx -o p.onnx --sparsity 'fc1*=0.95,0.8' --scope global   |   "
             "modelsqueeze prune m.onnx -o p.onnx --structured rows --sparsity 0.5 --shrink   |   "
             "modelsqueeze prune m.onnx -o p.onnx --nm 2:4 --validate test.npz --max-drop 1")
@handles_errors
def prune(
    model: ModelArg,
    output: OutputOpt,
    sparsity: Annotated[Optional[str], typer.Option("--sparsity", "-s", help="Fraction of weights to zero, e.g. 0.9, or per layer 'fc1*=0.95,conv*=0.6,0.8' (last bare value: everything else).")] = None,
    threshold: Annotated[Optional[str], typer.Option("--threshold", help="Zero weights with |w| below this (per-layer syntax as --sparsity).")] = None,
    std_scale: Annotated[Optional[str], typer.Option("--std-scale", help="Threshold = this × the layer's standard deviation (Han et al.).")] = None,
    scope: Annotated[str, typer.Option("--scope", help="layer: each tensor on its own; global: one ranking / threshold across all selected tensors.")] = "layer",
    structured: Annotated[Optional[str], typer.Option("--structured", help="rows|channels: remove whole output neurons / filters (fraction = --sparsity), ranked by --norm.")] = None,
    norm: Annotated[str, typer.Option("--norm", help="l1|l2 norm for --structured.")] = "l2",
    shrink: Annotated[bool, typer.Option("--shrink", help="With --structured: delete the removed channels from the graph (and the next layer's inputs).")] = False,
    nm: Annotated[Optional[str], typer.Option("--nm", help="N:M sparsity, e.g. 2:4: keep the N largest of every M consecutive weights along the input axis.")] = None,
    calibration: CalibrationOpt = None,
    sequential: SequentialOpt = False,
    damp: DampOpt = 0.01,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Zero weights: magnitude (per layer or global), structured channels, or N:M; store survivors sparsely."""
    step = make_step("prune", _given(sparsity=sparsity, threshold=threshold, std_scale=std_scale, nm=nm, scope=scope,
                                     structured=structured, norm=norm, shrink=shrink, **_calibration(calibration, sequential, damp),
                                     **_selection(layers, exclude, min_params)))
    _transform(model, output, force, [step], "prune", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


@app.command(epilog="Examples:  modelsqueeze cluster pruned.onnx -o shared.onnx --bits 5   |   "
             "modelsqueeze cluster m.onnx -o c.onnx --bits 'fc3*=6,4' --init density   |   "
             "modelsqueeze cluster m.onnx -o c.onnx --clusters 16 --scope shared --validate test.npz")
@handles_errors
def cluster(
    model: ModelArg,
    output: OutputOpt,
    bits: Annotated[Optional[str], typer.Option("--bits", "-b", help="Index bits: 2^B shared values per tensor, e.g. 5, or per layer 'fc3*=6,4'.")] = None,
    clusters: Annotated[Optional[str], typer.Option("--clusters", "-k", help="Number of shared values K instead of --bits (same per-layer syntax).")] = None,
    init: Annotated[str, typer.Option("--init", help="auto (near-optimal: exact DP on a histogram, then Lloyd) | linear (Han et al.) | density | kmeans++ | cube-root | binned-dp.")] = "auto",
    method: Annotated[str, typer.Option("--method", help="lloyd (fast) | optimal (exact 1-D dynamic programming, small tensors).")] = "lloyd",
    scope: Annotated[str, typer.Option("--scope", help="layer: a codebook per tensor; shared: one codebook for all selected tensors.")] = "layer",
    seed: Annotated[int, typer.Option("--seed", help="Seed for kmeans++ initialisation.")] = 0,
    calibration: CalibrationOpt = None,
    sequential: SequentialOpt = False,
    damp: DampOpt = 0.01,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """k-means weight sharing: a codebook of K values per tensor and bit-packed indices; zeros stay zero."""
    step = make_step("cluster", _given(bits=bits, clusters=clusters, init=init, method=method, scope=scope, seed=seed,
                                       **_calibration(calibration, sequential, damp), **_selection(layers, exclude, min_params)))
    _transform(model, output, force, [step], "cluster", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


@app.command(epilog="Examples:  modelsqueeze quantize m.onnx -o q8.onnx   (int8, per channel, symmetric)   |   "
             "modelsqueeze quantize m.onnx -o q4.onnx --bits 4 --granularity block --block-size 32   |   "
             "modelsqueeze quantize m.onnx -o q.onnx --bits 4 --unsigned --affine --range mse --validate test.npz")
@handles_errors
def quantize(
    model: ModelArg,
    output: OutputOpt,
    bits: Annotated[str, typer.Option("--bits", "-b", help="2..8 bits per weight (8 and 4 map to ONNX int8/int4 DequantizeLinear), or per layer 'fc3*=8,4'.")] = "8",
    signed: Annotated[bool, typer.Option("--signed/--unsigned", help="Signed (int8/int4) or unsigned (uint8/uint4) codes.")] = True,
    symmetric: Annotated[bool, typer.Option("--symmetric/--affine", help="Zero point at the grid's middle, or fitted to each group's min..max.")] = True,
    granularity: Annotated[str, typer.Option("--granularity", "-g", help="tensor | channel (per output channel of each consumer) | block (along the input axis).")] = "channel",
    block_size: Annotated[int, typer.Option("--block-size", help="Weights per block for --granularity block (32, 64, 128, ...).")] = 32,
    range_method: Annotated[str, typer.Option("--range", help="minmax | mse (clipping that minimises squared error) | percentile.")] = "minmax",
    percentile: Annotated[float, typer.Option("--percentile", help="With --range percentile: clip |w| at this percentile.")] = 99.99,
    calibration: CalibrationOpt = None,
    sequential: SequentialOpt = False,
    damp: DampOpt = 0.01,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Linear weight quantization to int8/int4 (or 2..8 bits): per tensor, channel or block; zeros stay zero."""
    _check_finite(percentile=percentile)
    step = make_step("quantize", _given(bits=bits, signed=signed, symmetric=symmetric, granularity=granularity,
                                        block_size=block_size, range=range_method, percentile=percentile,
                                        **_calibration(calibration, sequential, damp), **_selection(layers, exclude, min_params)))
    _transform(model, output, force, [step], "quantize", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


@app.command(epilog="Examples:  modelsqueeze huffman shared.onnx -o coded.onnx   |   "
             "modelsqueeze huffman q4.onnx -o q4h.onnx --layers 'fc*'")
@handles_errors
def huffman(
    model: ModelArg,
    output: OutputOpt,
    max_unique: Annotated[int, typer.Option("--max-unique", help="Plain weights with at most this many distinct values are coded losslessly.")] = 256,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Canonical Huffman coding of the sidecar's index, code and position streams (lossless)."""
    step = make_step("huffman", _given(max_unique=max_unique, **_selection(layers, exclude, min_params)))
    _transform(model, output, force, [step], "huffman", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


@app.command(epilog="Examples:  modelsqueeze svd lenet300.onnx -o low.onnx --energy 0.9   |   "
             "modelsqueeze svd m.onnx -o l.onnx --rank 'fc1*=64,32'   |   "
             "modelsqueeze svd m.onnx -o l.onnx --target-params 100000 --validate test.npz --max-drop 1")
@handles_errors
def svd(
    model: ModelArg,
    output: OutputOpt,
    rank: Annotated[Optional[str], typer.Option("--rank", "-r", help="Rank of each factored layer, e.g. 32, or per layer 'fc1*=64,32'.")] = None,
    energy: Annotated[Optional[str], typer.Option("--energy", "-e", help="Keep this fraction of each layer's squared singular values, e.g. 0.9.")] = None,
    ratio: Annotated[Optional[str], typer.Option("--ratio", help="Each layer's factors hold at most this fraction of its parameters, e.g. 0.25.")] = None,
    max_error: Annotated[Optional[str], typer.Option("--max-error", help="Smallest rank whose relative Frobenius error is at most this, e.g. 0.2.")] = None,
    target_params: Annotated[Optional[int], typer.Option("--target-params", help="Choose ranks across layers so the model has at most this many parameters.")] = None,
    calibration: CalibrationOpt = None,
    sequential: SequentialOpt = False,
    damp: DampOpt = 0.01,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Low-rank factorization of MatMul/Gemm weights (two MatMuls) and Conv weights (k×k conv to r channels + 1×1 conv)."""
    step = make_step("svd", _given(rank=rank, energy=energy, ratio=ratio, max_error=max_error, target_params=target_params,
                                   **_calibration(calibration, sequential, damp), **_selection(layers, exclude, min_params)))
    _transform(model, output, force, [step], "svd", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


# ---------------------------------------------------------------------------------------------
# Several steps in one call: from flags (pipeline) or from a TOML recipe (run).

def _save_recipe(recipe: Recipe, path: Path, force: bool, comment: str) -> None:
    check_output(path, force)
    atomic_write_bytes(path, dump_recipe(recipe, path.parent, comment).encode())


def _check_recipe_target(path: Optional[Path], force: bool, model: Path, output: Path, validate: Optional[Path]) -> None:
    """--save-recipe must not land on any file the command reads or writes."""
    if path is None:
        return
    if path.suffix != ".toml":
        raise ModelSqueezeError(f"{path}: a recipe file should end in .toml")
    taken = [output, sidecar_path(output), model, sidecar_path(model)] + ([validate] if validate else [])
    if any(path.resolve() == Path(other).resolve() for other in taken):
        raise ModelSqueezeError(f"{path}: the recipe would overwrite a model, sidecar or data file of this command")
    check_output(path, force)


@app.command(epilog="Examples:  modelsqueeze pipeline lenet300.onnx -o small.onnx --prune 0.9 --bits 5 --huffman   |   "
             "modelsqueeze pipeline m.onnx -o s.onnx --prune 'fc1*=0.95,0.8' --prune-scope layer --bits 4 --huffman "
             "--validate test.npz --max-drop 1 --save-recipe small.toml   |   "
             "modelsqueeze pipeline m.onnx -o q.onnx --svd-energy 0.9 --quantize 4 --huffman --dry-run")
@handles_errors
def pipeline(
    model: ModelArg,
    output: OutputOpt,
    svd_energy: Annotated[Optional[str], typer.Option("--svd-energy", help="Step 1, svd: keep this fraction of each layer's squared singular values (per-layer syntax allowed).")] = None,
    svd_rank: Annotated[Optional[str], typer.Option("--svd-rank", help="Step 1, svd: factor rank per layer instead of --svd-energy.")] = None,
    prune_sparsity: Annotated[Optional[str], typer.Option("--prune", help="Step 2, prune: fraction of weights to zero, e.g. 0.9 or 'fc1*=0.95,0.8'.")] = None,
    prune_scope: Annotated[Optional[str], typer.Option("--prune-scope", help="layer (default) | global ranking for --prune.")] = None,
    bits: Annotated[Optional[str], typer.Option("--bits", "-b", help="Step 3, cluster: index bits per tensor (2^B shared values), e.g. 5 or 'fc3*=6,4'.")] = None,
    quantize_bits: Annotated[Optional[str], typer.Option("--quantize", help="Step 3, quantize instead of cluster: linear bits per weight, e.g. 8 or 4.")] = None,
    granularity: Annotated[Optional[str], typer.Option("--granularity", "-g", help="With --quantize: tensor | channel (default) | block.")] = None,
    huffman_coding: Annotated[bool, typer.Option("--huffman", help="Step 4: Huffman-code the sidecar's streams.")] = False,
    calibration: CalibrationOpt = None,
    sequential: SequentialOpt = False,
    damp: DampOpt = 0.01,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    save_recipe: Annotated[Optional[Path], typer.Option("--save-recipe", help="Also write these steps as a TOML recipe (for `modelsqueeze run`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the recipe these flags make and stop (nothing is read or written).")] = False,
    validate: ValidateOpt = None,
    max_drop: MaxDropOpt = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Several steps in one call, in Deep Compression's order: svd → prune → cluster (or quantize) → huffman.
    The files written are byte-identical to running the same steps one command at a time."""
    if bits is not None and quantize_bits is not None:
        raise ModelSqueezeError("give --bits (cluster) or --quantize (linear), not both")
    if prune_scope is not None and prune_sparsity is None:
        raise ModelSqueezeError("--prune-scope needs --prune")
    if granularity is not None and quantize_bits is None:
        raise ModelSqueezeError("--granularity needs --quantize")
    if prune_scope is not None and prune_scope not in ("layer", "global"):
        raise ModelSqueezeError(f"--prune-scope {prune_scope!r}: expected layer or global")
    selection = _selection(layers, exclude, min_params)
    fit = _given(**_calibration(calibration, sequential, damp))  # every data-aware step gets the calibration
    steps = []
    if svd_energy is not None or svd_rank is not None:
        steps.append(make_step("svd", _given(energy=svd_energy, rank=svd_rank, **fit, **selection)))
    if prune_sparsity is not None:
        steps.append(make_step("prune", _given(sparsity=prune_sparsity, scope=prune_scope, **fit, **selection)))
    if bits is not None:
        steps.append(make_step("cluster", _given(bits=bits, **fit, **selection)))
    if quantize_bits is not None:
        steps.append(make_step("quantize", _given(bits=quantize_bits, granularity=granularity, **fit, **selection)))
    if huffman_coding:
        steps.append(make_step("huffman", selection))
    if not steps:
        raise ModelSqueezeError("no steps: give at least one of --svd-energy/--svd-rank, --prune, --bits, --quantize, --huffman")
    recipe = Recipe(tuple(steps), model, output, validate, max_drop, metric=metric, min_snr=min_snr)
    if dry_run:
        print(dump_recipe(recipe, Path.cwd(), "modelsqueeze recipe (paths relative to this file's folder)"), end="")
        return
    _check_recipe_target(save_recipe, force, model, output, validate)
    _transform(model, output, force, steps, "pipeline", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)
    if save_recipe is not None:
        _save_recipe(recipe, save_recipe, force, "written by `modelsqueeze pipeline --save-recipe`; run it with `modelsqueeze run`")


@app.command("run", epilog="Examples:  modelsqueeze run recipes/lenet300.toml   |   "
             "modelsqueeze run deep.toml --input other.onnx -o other_small.onnx --force   |   "
             "modelsqueeze run deep.toml --validate test.npz --max-drop 0.5")
@handles_errors
def run_recipe(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="A TOML recipe: ordered [[step]] tables (see `modelsqueeze pipeline --dry-run`).", show_default=False)],
    input_path: Annotated[Optional[Path], typer.Option("--input", "-i", help="The model to compress (overrides the recipe's `input`).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output model (overrides the recipe's `output`).")] = None,
    validate: Annotated[Optional[Path], typer.Option("--validate", help="Labelled .npz (overrides the recipe's `validate`).")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Exit 1, writing nothing, if accuracy falls by more than PP points (overrides the recipe's `max_drop`).")] = None,
    jobs: JobsOpt = 1,
    force: ForceOpt = False,
    metric: MetricOpt = None,
    min_snr: MinSnrOpt = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a TOML recipe: its steps in order, with per-layer overrides, validation and --max-drop.
    Paths in the recipe are relative to the recipe file; options given here win."""
    recipe = load_recipe(recipe_path)
    model = input_path or recipe.input
    out_path = output or recipe.output
    if model is None:
        raise ModelSqueezeError(f"{recipe_path}: no `input` in the recipe; give --input MODEL.onnx")
    if out_path is None:
        raise ModelSqueezeError(f"{recipe_path}: no `output` in the recipe; give --output OUT.onnx")
    if recipe_path.resolve() in (Path(out_path).resolve(), sidecar_path(out_path).resolve()):
        raise ModelSqueezeError(f"{out_path}: would overwrite the recipe {recipe_path}")
    folder = recipe_path.resolve().parent
    if output is None and not quiet and not Path(out_path).resolve().is_relative_to(folder):
        # Allowed (a recipe may keep its outputs elsewhere), but a recipe from someone else should not write there unseen.
        err.print(f"note: {escape(str(recipe_path))}: writes {escape(str(out_path))}, outside the recipe's folder "
                  f"{escape(str(folder))} (-o overrides)", highlight=False)
    validate = validate or recipe.validate
    max_drop = max_drop if max_drop is not None else recipe.max_drop
    if max_drop is not None and validate is None and recipe.max_drop is not None:
        raise ModelSqueezeError(f"{recipe_path}: `max_drop` needs `validate` (or --validate DATA.npz)")
    metric = metric if metric is not None else recipe.metric
    min_snr = min_snr if min_snr is not None else recipe.min_snr
    _transform(model, out_path, force, list(recipe.steps), "run", validate, max_drop, as_json, quiet, jobs, metric=metric, min_snr=min_snr)


@app.command(epilog="Example:  modelsqueeze unpack small.onnx -o small_dense.onnx")
@handles_errors
def unpack(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plain dense model.", show_default=False)],
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rebuild a plain dense ONNX model (no sidecar) from a compressed model or its skeleton + sidecar."""
    path = unpack_pair(model, output, force)
    if not quiet:
        err.print(f"wrote {path}", markup=False, highlight=False)


@app.command(epilog="Example:  modelsqueeze pack small.onnx -o ship/small.onnx   (writes ship/small.onnx + ship/small.msq)")
@handles_errors
def pack(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the pack's skeleton; its sidecar goes beside it (.msq).", show_default=False)],
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the shipping artifact, skeleton + sidecar: its bytes are every printed "packed" size.

    The skeleton is the graph without the weights the sidecar holds (and without their decoding
    nodes): the smallest tier. `modelsqueeze unpack` (or any command) reads the pack back; the
    compressed OUT.onnx runs in onnxruntime as it is."""
    pair = load_pair(model)
    files = write_pack(pair, output, force)
    sizes = {str(path): path.stat().st_size for path in files}
    total = sum(sizes.values())
    if as_json:
        out.print_json(json.dumps({"files": sizes, "packed_bytes": total}))
    elif not quiet:
        if len(files) > 1:
            line = " + ".join(f"{path} {size:,} B" for path, size in sizes.items()) + f" = {total:,} B"
        else:
            line = f"{files[0]} {total:,} B (no sidecar: the model file itself is the pack)"
        err.print(f"wrote {line}", markup=False, highlight=False)


from modelsqueeze import cli_sensitivity  # noqa: E402,F401  (registers the sensitivity command)


def main() -> None:
    import signal

    if hasattr(signal, "SIGPIPE"):  # `modelsqueeze report m.onnx | head -1`: end quietly, as Unix tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _return_freed_memory()
    app(prog_name="modelsqueeze")


def _return_freed_memory() -> None:
    """Tensors of 1 MiB or more get their own memory map from glibc's malloc, so freeing one gives
    it back to the system at once. (glibc otherwise raises that limit to the largest block freed so
    far, up to 32 MiB, and per-tensor temporaries then stay in the heap after use: ~10% more peak
    memory on a 25M-parameter pipeline.) Other C libraries: nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main()
