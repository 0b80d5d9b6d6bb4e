"""The Typer app: one thin function per command (parse options, show progress, print results)."""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelsqueeze import __version__
from modelsqueeze.errors import CheckFailed, ModelSqueezeError
from modelsqueeze.pack import load_pair, unpack as unpack_pair
from modelsqueeze.report import build_report, check_thresholds, markdown, rich_table, summary_table
from modelsqueeze.validate import (
    Runner,
    accuracy,
    fidelity,
    load_npz,
    parse_dims,
    random_inputs,
    split_data,
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
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]


def handles_errors(command: Callable) -> Callable:
    """Turn our errors into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CheckFailed as exc:
            err.print(f"[bold red]check failed:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except ModelSqueezeError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


@contextmanager
def progress_bar(description: str, total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; `advance(n)` moves it. Silent when quiet."""
    if quiet:
        yield lambda n: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


def _run(runner: Runner, feeds: dict, label: str, quiet: bool) -> list:
    n = next(iter(feeds.values())).shape[0] if feeds else 0
    with progress_bar(f"running {label}", n, quiet) as advance:
        return runner.run(feeds, advance)


def _labelled_accuracy(model, label: str, arrays: dict, source: str, quiet: bool) -> float:
    """Top-1 accuracy of `model` on labelled arrays (the shared path of report and --validate)."""
    runner = Runner(model, label)
    feeds, labels = split_data(arrays, runner, source)
    if labels is None:
        raise ModelSqueezeError(f"{source}: no `y` labels, so no accuracy")
    return accuracy(_run(runner, feeds, label, quiet)[0], labels, source)


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
    if unit not in units or value < 0:
        raise ModelSqueezeError(f"--max-bytes {text!r}: expected a size such as 1500000, 1.5MB or 200KiB")
    return int(value * units[unit])


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, allow_nan=False, default=str))


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
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Top-1 accuracy on labelled data, and fidelity against a reference model."""
    if data is None and reference is None:
        raise ModelSqueezeError("give --data DATA.npz (accuracy) and/or --reference ORIGINAL.onnx (fidelity)")
    if data is not None and random is not None:
        raise ModelSqueezeError("give either --data or --random, not both")
    pair = load_pair(model)
    runner = Runner(pair.model, str(model))
    ref_runner = Runner(load_pair(reference).model, str(reference)) if reference else None
    labels = None
    if data is not None:
        feeds, labels = split_data(load_npz(data), runner, str(data))
        source = str(data)
    else:
        n = 100 if random is None else random
        feeds = random_inputs(runner, pair.model, n, parse_dims(dim), seed)
        source = f"{n} random inputs (seed {seed})"
    result: dict = {"model": str(model), "data": source, "samples": int(next(iter(feeds.values())).shape[0])}
    outputs = _run(runner, feeds, str(model), quiet)
    if labels is not None:
        result["accuracy"] = accuracy(outputs[0], labels, source)
    if ref_runner is not None:
        ref_outputs = _run(ref_runner, feeds, str(reference), quiet)
        result["reference"] = str(reference)
        if labels is not None:
            result["reference_accuracy"] = accuracy(ref_outputs[0], labels, source)
        result["fidelity"] = fidelity(outputs[0], ref_outputs[0])
    if as_json:
        _print_json(result)
        return
    out.print(f"[bold]eval[/] {model} on {source}", highlight=False)
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("samples", str(result["samples"]))
    if "accuracy" in result:
        table.add_row("top-1 accuracy", f"{100 * result['accuracy']:.2f}%")
    if "reference_accuracy" in result:
        table.add_row("reference accuracy", f"{100 * result['reference_accuracy']:.2f}%")
    if "fidelity" in result:
        fid = result["fidelity"]
        snr = "identical" if fid["snr_db"] is None else f"{fid['snr_db']:.2f} dB"
        table.add_row("top-1 agreement", f"{100 * fid['top1_agreement']:.2f}%")
        table.add_row("max abs error", f"{fid['max_abs_error']:.6g}")
        table.add_row("mean abs error", f"{fid['mean_abs_error']:.6g}")
        table.add_row("cosine similarity", f"{fid['cosine_similarity']:.6f}")
        table.add_row("SNR", snr)
    out.print(table)


@app.command(epilog="Examples:  modelsqueeze report small.onnx --baseline sample_models/lenet300.onnx   |   "
             "modelsqueeze report small.onnx --baseline big.onnx --data test.npz --max-drop 1 --min-ratio 10 --max-bytes 100KB")
@handles_errors
def report(
    model: ModelArg,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", "-b", help="The original model: ratio and accuracy drop against it.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Labelled .npz: report top-1 accuracy (and the baseline's).")] = None,
    as_json: JsonOpt = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (for PR comments, docs).")] = False,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", help="Fail (exit 1) if the packed size exceeds this (e.g. 120000, 1.5MB, 200KiB).")] = None,
    min_ratio: Annotated[Optional[float], typer.Option("--min-ratio", help="Fail (exit 1) if baseline/packed is below this ratio.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Fail (exit 1) if accuracy falls more than PP percentage points below the baseline's (needs --data, --baseline).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-tensor and total sizes, sparsity, unique values, bits per weight, ratio and accuracy; CI gates."""
    if as_json and as_markdown:
        raise ModelSqueezeError("give --json or --markdown, not both")
    limit = parse_size(max_bytes) if max_bytes is not None else None
    if max_drop is not None and (data is None or baseline is None):
        raise ModelSqueezeError("--max-drop needs --data DATA.npz and --baseline ORIGINAL.onnx")
    if min_ratio is not None and baseline is None:
        raise ModelSqueezeError("--min-ratio needs --baseline ORIGINAL.onnx to compute a ratio")
    pair = load_pair(model)
    result = build_report(pair, baseline)
    if data is not None:
        arrays = load_npz(data)
        result.accuracy = _labelled_accuracy(pair.model, str(model), arrays, str(data), quiet)
        if baseline is not None:
            result.baseline_accuracy = _labelled_accuracy(load_pair(baseline).model, str(baseline), arrays, str(data), quiet)
    failures = check_thresholds(result, limit, min_ratio, max_drop)
    if as_json:
        _print_json(result.to_dict())
    elif as_markdown:
        print(markdown(result), end="")
    else:
        out.print(rich_table(result))
        out.print(summary_table(result))
    if failures:
        raise CheckFailed("; ".join(failures))


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
        err.print(f"wrote {path}")


def main() -> None:
    app(prog_name="modelsqueeze")


if __name__ == "__main__":
    main()
