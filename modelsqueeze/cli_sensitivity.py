"""`modelsqueeze sensitivity`: per-layer sensitivity tables, recipes from them, and the search for
per-layer settings that reach a target size (see modelsqueeze/sensitivity.py for the engine)."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelsqueeze import sensitivity as engine
from modelsqueeze.cli import (
    ExcludeOpt,
    ForceOpt,
    BatchAxisOpt,
    JsonOpt,
    LabelsOpt,
    LayersOpt,
    MinParamsOpt,
    ModelArg,
    QuietOpt,
    _check_finite,
    _print_json,
    app,
    err,
    handles_errors,
    out,
    parse_size,
    progress_bar,
)
from modelsqueeze.errors import CheckFailed, ModelSqueezeError
from modelsqueeze.model import atomic_write_bytes, check_output
from modelsqueeze.pack import load_pair, packed_bytes, packed_size, rendered
from modelsqueeze.passes import Selection, finite_number
from modelsqueeze import store
from modelsqueeze.pipeline import describe, run_steps
from modelsqueeze.recipe import Recipe, Step, check_path_text, dump_recipe, parse_step_spec
from modelsqueeze.validate import Metric, label_key, load_npz

EPILOG = (
    "Examples:  modelsqueeze sensitivity lenet300.onnx -d test.npz -m prune   |   "
    "modelsqueeze sensitivity m.onnx -d test.npz -m cluster --max-drop 0.5 --then huffman --recipe small.toml --plot cluster.png   |   "
    "modelsqueeze sensitivity m.onnx -d test.npz -m prune --values 0.5,0.8,0.9,0.95 --option structured=rows   |   "
    "modelsqueeze sensitivity lenet300.onnx -d test.npz -m prune --target-ratio 20 --then 'cluster bits=4' --then huffman "
    "--recipe r20.toml --frontier-plot frontier.png   |   "
    "modelsqueeze sensitivity m.onnx -d test.npz -m quantize --target-bytes 120KB --max-drop 1   (CI: exit 1 if out of reach)"
)


@app.command("sensitivity", epilog=EPILOG)
@handles_errors
def sensitivity_command(
    model: ModelArg,
    data: Annotated[Path, typer.Option("--data", "-d", help="Labelled .npz (input arrays by input name or `x`, and `y`); without `y`, accuracy is agreement with the model's own predictions (use unlabelled calibration data to keep the test set for the final check).", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-m", help="prune (varies --sparsity) | cluster (--bits) | quantize (--bits) | svd (--energy).", show_default=False)],
    values: Annotated[Optional[str], typer.Option("--values", help="The settings to try instead of the method's grid, e.g. '0.5,0.7,0.9' (sorted gentle to aggressive).")] = None,
    option: Annotated[list[str], typer.Option("--option", help="A fixed option of the method, KEY=VALUE (repeatable), e.g. init=density, granularity=block.")] = [],
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Accuracy (or agreement) budget in percentage points: per layer for the table's chosen settings; for the searched point with --target-*. Default 1.", show_default=False)] = None,
    min_snr: Annotated[Optional[float], typer.Option("--min-snr", help="With --metric snr: the floor in dB, per layer for the table, for the searched point with --target-*. Default 20.", show_default=False)] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="Write the chosen settings (+ --then steps) as a TOML recipe for `modelsqueeze run`.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the per-layer sensitivity curves (.png, .svg, .pdf; needs matplotlib).")] = None,
    target_ratio: Annotated[Optional[float], typer.Option("--target-ratio", help="Search per-layer settings for a packed size of at most (current size / R).")] = None,
    target_bytes: Annotated[Optional[str], typer.Option("--target-bytes", help="Search per-layer settings for a packed size of at most N bytes (e.g. 120000, 120KB, 1.5MB).")] = None,
    then: Annotated[list[str], typer.Option("--then", help="A step after the method, 'COMMAND key=value ...' (repeatable), e.g. 'cluster bits=5', huffman: counted in sizes, written into the recipe.")] = [],
    frontier_plot: Annotated[Optional[Path], typer.Option("--frontier-plot", help="With --target-*: write the size / accuracy frontier (.png, .svg, .pdf).")] = None,
    layers: LayersOpt = [],
    exclude: ExcludeOpt = [],
    min_params: MinParamsOpt = None,
    force: ForceOpt = False,
    metric: Annotated[Optional[str], typer.Option("--metric", help="top1 (accuracy on the labels; without labels, agreement) | agreement (top-1 agreement with the model's own predictions) | snr (the output's SNR against the model's own, in dB, floor --min-snr); :OUTPUT picks the output, e.g. snr:scores.")] = None,
    batch_axis: BatchAxisOpt = [],
    labels: LabelsOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """How much accuracy each layer loses to one method at each setting, and the per-layer settings
    to use: each selected layer is compressed alone at each value of the grid and measured with
    onnxruntime (accuracy of the graph as written, packed bytes of the pair). --metric agreement or
    snr (with --min-snr DB) measures against the input model instead: no labels needed.

    Without --target-*: prints the table and, per layer, the most aggressive setting whose drop on
    its own is within --max-drop (a layer with none is left alone); --recipe writes them, followed by
    the --then steps. Exit 0.

    With --target-ratio R or --target-bytes N: searches greedily (every layer at its gentlest value,
    then one layer one notch at a time, the move losing least accuracy per byte saved, each measured
    for real with the --then steps) and prints the frontier. Exit 1 (nothing but plots written) when
    the target cannot be reached, or when the point that reaches it loses more than --max-drop;
    otherwise --recipe writes that point's settings. Bad usage or input: exit 2, nothing written."""
    # --- every refusal before any work ---------------------------------------------------------
    _check_finite(max_drop=max_drop, target_ratio=target_ratio, min_snr=min_snr)
    if max_drop is not None and max_drop < 0:
        raise ModelSqueezeError(f"--max-drop {max_drop:g}: must be 0 or more")
    gauge = Metric.parse(metric)
    unit = _Unit.of(gauge, max_drop, min_snr)
    max_drop = unit.budget_pp
    spec = engine.method_of(method)
    if target_ratio is not None and target_bytes is not None:
        raise ModelSqueezeError("give --target-ratio or --target-bytes, not both")
    if target_ratio is not None and target_ratio <= 0:
        raise ModelSqueezeError(f"--target-ratio {target_ratio:g}: must be a positive number (e.g. 20 for 20x smaller)")
    limit = _target_bytes(target_bytes) if target_bytes is not None else None
    searching = target_ratio is not None or limit is not None
    if frontier_plot is not None and not searching:
        raise ModelSqueezeError("--frontier-plot needs --target-ratio or --target-bytes (the frontier comes from the search)")
    base = engine.check_options(spec, _parse_options(option))
    grid = engine.grid_values(spec, _parse_values(values) if values is not None else None, base)
    then_steps = [parse_step_spec(text) for text in then]
    if recipe is not None:
        if recipe.suffix != ".toml":
            raise ModelSqueezeError(f"{recipe}: a recipe file should end in .toml")
        check_output(recipe, force, [model, data])
        for key, path in (("input", model), ("validate", data)):  # what the recipe will name
            check_path_text(str(path), key)
        from modelsqueeze.model import check_writable_folder

        check_writable_folder(recipe)
    plots = [p for p in (plot, frontier_plot) if p is not None]
    if plots and unit.snr:
        raise ModelSqueezeError("--plot and --frontier-plot draw accuracy (%); with --metric snr the SNR of every "
                                "point is in the table and in --json")
    if len(set(p.resolve() for p in plots + ([recipe] if recipe else []))) < len(plots) + (recipe is not None):
        raise ModelSqueezeError("--recipe, --plot and --frontier-plot must be different files")
    if plots:
        from modelsqueeze import plots as plotting

        for path in plots:
            plotting.check_plot_path(path)
            check_output(path, force, [model, data])
        plotting.require_matplotlib()
    arrays = load_npz(data)
    pair = load_pair(model)
    if label_key() not in arrays and gauge.kind == "top1" and not quiet:
        err.print(f"note: {data} has no `{label_key()}` labels: accuracy here is top-1 agreement with {model.name}'s own predictions",
                  markup=False, highlight=False)
    selection = Selection(tuple(layers), tuple(exclude), min_params)
    infos = engine.layers_to_vary(pair.model, selection)
    baseline_bytes = packed_size(pair)

    # --- measure -------------------------------------------------------------------------------
    table = None
    if not searching or plot is not None:
        with progress_bar(f"sensitivity {spec.command} {model.name}", len(infos) * len(grid), quiet) as advance:
            table = engine.sensitivity(pair.model, pair.records, arrays, spec.command, grid, base, selection,
                                       advance, str(data), baseline_bytes=baseline_bytes, metric=gauge)
    if not searching:
        _report_table(table, model, data, recipe, plot, then_steps, unit, baseline_bytes, pair, arrays, as_json, quiet)
        return
    target = limit if limit is not None else max(1, math.floor(baseline_bytes / target_ratio))
    # at most: the gentlest point, a one-layer table when the search ranks moves with it, every notch
    # of every layer measured for each candidate move (the bar ends early when the target is reached)
    ranked = len(infos) > engine.DEFAULT_CANDIDATES and table is None
    budget = 1 + (len(infos) * len(grid) if ranked else 0) + len(infos) * (len(grid) - 1) * min(len(infos), engine.DEFAULT_CANDIDATES)
    with progress_bar(f"search {spec.command} {model.name}", budget, quiet) as advance:
        def accepted(point: engine.Point) -> None:
            advance(0, f"search {spec.command} {model.name}: {point.packed_bytes:,} B of {target:,} B")

        found = engine.search(pair.model, pair.records, arrays, spec.command, target, grid, base, then_steps,
                              selection, advance, str(data), table=table, baseline_bytes=baseline_bytes,
                              on_accept=accepted, metric=gauge)
    _report_search(found, table, model, data, recipe, plot, frontier_plot, unit, as_json, quiet, arrays)


# --- option parsing ----------------------------------------------------------------------------

def _target_bytes(text: str) -> int:
    try:
        n = parse_size(text)
    except ModelSqueezeError:
        raise ModelSqueezeError(f"--target-bytes {text!r}: expected a positive size such as 120000, 120KB or 1.5MB") from None
    if n < 1:
        raise ModelSqueezeError(f"--target-bytes {text!r}: must be a positive number of bytes")
    return n


def _parse_values(text: str) -> list[float]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ModelSqueezeError(f"--values {text!r}: expected numbers separated by commas, e.g. 0.5,0.7,0.9")
    return [finite_number(item, f"--values {text!r}") for item in items]


def _parse_options(items: list[str]) -> dict[str, Any]:
    """--option KEY=VALUE items; VALUE in TOML syntax, a bare word that is not TOML is a string."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelSqueezeError(f"--option {item!r}: expected KEY=VALUE, e.g. init=density")
        if key.replace("-", "_") in (k.replace("-", "_") for k in options):
            raise ModelSqueezeError(f"--option {item!r}: {key} is given twice")
        try:
            options[key] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = value.strip()
    return options


# --- output ------------------------------------------------------------------------------------

def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


@dataclass(frozen=True)
class _Unit:
    """How the scores of one metric are budgeted and shown: accuracy or agreement as percentages
    with a budget in points; SNR in dB with a floor, its scores being `engine.snr_score`."""

    metric: Metric
    budget_pp: float  # the drop allowed, in points of the score
    min_snr: float | None = None

    @classmethod
    def of(cls, metric: Metric, max_drop: float | None, min_snr: float | None) -> "_Unit":
        if metric.kind == "snr":
            if max_drop is not None:
                raise ModelSqueezeError("--max-drop is in points of accuracy or agreement; with --metric snr give "
                                        "the floor in dB, --min-snr DB")
            floor = DEFAULT_MIN_SNR if min_snr is None else min_snr
            return cls(metric, engine.snr_budget_pp(floor), floor)
        if min_snr is not None:
            raise ModelSqueezeError("--min-snr needs --metric snr (accuracy and agreement take --max-drop PP)")
        return cls(metric, 1.0 if max_drop is None else max_drop)

    @property
    def snr(self) -> bool:
        return self.metric.kind == "snr"

    def db(self, score: float) -> float:
        return engine.score_snr(score)

    def show(self, score: float) -> str:
        return Metric("snr").show(self.db(score)) if self.snr else _pct(score)

    def cell(self, score: float) -> str:
        if self.snr:
            db = self.db(score)
            return "same" if db == math.inf else f"{db:.1f}"
        return f"{100 * score:.1f}"

    def change(self, baseline: float, score: float) -> str:
        """A point's score against the baseline: points for fractions; the SNR itself for snr
        (the baseline, the input against itself, is identical)."""
        return self.show(score) if self.snr else _change(100 * (baseline - score))

    @property
    def what(self) -> str:
        return f"SNR (dB) of output {self.metric.output} against the input" if self.snr and self.metric.output else \
            "output SNR (dB) against the input" if self.snr else "top-1 accuracy (%)"

    @property
    def budget(self) -> str:
        return f"keeping ≥ {self.min_snr:g} dB SNR" if self.snr else f"losing ≤ {self.budget_pp:g} pp"

    @property
    def flag(self) -> str:
        return f"--min-snr {self.min_snr:g}" if self.snr else f"--max-drop {self.budget_pp:g}"

    def json(self, data: Any) -> Any:
        """--json output: with snr, every score also as `snr_db` (null: identical outputs)."""
        if not self.snr:
            return data
        if isinstance(data, list):
            return [self.json(item) for item in data]
        if not isinstance(data, dict):
            return data
        out = {key: self.json(value) for key, value in data.items()}
        for key, name in (("accuracy", "snr_db"), ("baseline_accuracy", "baseline_snr_db")):
            if isinstance(data.get(key), float):
                db = self.db(data[key])
                out[name] = None if db == math.inf else db
        return out


# --metric snr without --min-snr: the floor the tests hold int8 to on every corpus model.
DEFAULT_MIN_SNR = 20.0


def _exceeds(drop_pp: float, max_drop: float) -> bool:
    """A drop beyond the budget (1000 samples give steps of 0.1 pp: no float dust may fail a tie)."""
    return drop_pp > max_drop + 1e-9


def _drop_style(drop_pp: float, max_drop: float) -> str:
    if drop_pp <= 1e-9:
        return "green"
    return "red" if _exceeds(drop_pp, max_drop) else "yellow"


def _change(drop_pp: float) -> str:
    """Accuracy change in signed percentage points (never '-0.00')."""
    return f"{round(-drop_pp, 2) + 0.0:+.2f} pp"


def _value(value: float) -> str:
    return f"{value:g}"


def _settings_text(settings: dict, setting: str) -> str:
    return " ".join(f"{key}={_value(v)}" for key, v in settings.items())


def _write_recipe(path: Path, recipe: Recipe, comment: str) -> None:
    text = dump_recipe(recipe, path.parent, comment)
    try:
        atomic_write_bytes(path, text.encode())
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot write the recipe ({exc.strerror or exc})") from None


def _draw(path: Path, plot_function, *args) -> None:
    """Draw a plot to `path`; a file system that refuses it (full disk, ...) is one error line, exit 2."""
    try:
        plot_function(*args)
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None


def _validation(arrays: dict, data: Path, unit: "_Unit") -> dict:
    """What the recipe's `validate`/`max_drop` should be: the data when it is labelled; unlabelled
    calibration data cannot validate a `run` on accuracy (give the test set with --validate
    there). With snr the data validates against the input, and the floor goes with it."""
    if unit.snr:
        return {"validate": data, "metric": unit.metric.text, "min_snr": unit.min_snr}
    if unit.metric.kind == "agreement":
        return {"validate": data, "max_drop": unit.budget_pp, "metric": unit.metric.text}
    return {"validate": data, "max_drop": unit.budget_pp} if label_key() in arrays else {}


def _measure_steps(pair, arrays, steps: list[Step], source: str, metric: Metric | None = None) -> tuple[int, float]:
    """(packed bytes, accuracy) of the pair the steps would write."""
    with store.released():  # nothing of the measured pair is kept
        final, records, _ = run_steps(pair.model, pair.records, steps, size_last=False)
        evaluate = engine.Evaluator(arrays, source, reference=pair.runnable(), metric=metric)
        return packed_bytes(final, list(records.values())), evaluate(rendered(final, records.values()), "recipe")


def _sensitivity_table(result: engine.SensitivityResult, chosen: dict | None, unit: _Unit, title: str) -> Table:
    """One row per layer, a column per value (accuracy %, coloured by drop); with `chosen`, the
    setting picked per layer and the bytes it saves on its own."""
    table = Table(box=box.SIMPLE_HEAD, title=escape(title), title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("params", justify="right")
    for value in result.values:
        table.add_column(_value(value), justify="right")
    if chosen is not None:
        table.add_column("chosen", justify="right")
        table.add_column("saves", justify="right")
    for key, n_params in result.layers:
        cells = []
        for value in result.values:
            drop = result.drop_pp(key, value)
            style = _drop_style(drop, unit.budget_pp) + (" bold underline" if chosen and chosen.get(key) == value else "")
            cells.append(Text(unit.cell(result.accuracy[key][value]), style=style))
        if chosen is None:
            table.add_row(Text(key), f"{n_params:,}", *cells)
        elif key in chosen:
            saved = result.baseline_bytes - result.bytes[key][chosen[key]]
            table.add_row(Text(key), f"{n_params:,}", *cells, _value(chosen[key]), f"{saved:,} B")
        else:
            table.add_row(Text(key), f"{n_params:,}", *cells, Text("left alone", style="dim"), "")
    return table


def _report_table(result, model, data, recipe_path, plot, then_steps, unit: _Unit, baseline_bytes, pair, arrays,
                  as_json, quiet) -> None:
    max_drop = unit.budget_pp
    chosen = engine.best_settings(result, max_drop)
    recipe = None
    combined = None
    if chosen or then_steps:
        recipe = engine.recipe_for(result.method, chosen, result.base_options, then_steps, input=model,
                                   **_validation(arrays, data, unit))
        size, acc = _measure_steps(pair, arrays, list(recipe.steps), str(data), unit.metric)
        combined = {"packed_bytes": size, "ratio": baseline_bytes / size, "accuracy": acc,
                    "drop_pp": 100 * (result.baseline_accuracy - acc), "steps": describe(recipe.steps)}
    if recipe_path is not None:
        if recipe is None:
            raise ModelSqueezeError(f"no layer stays within {unit.flag} at any {result.setting} and there "
                                    f"are no --then steps: nothing to put in {recipe_path}")
        _write_recipe(recipe_path, recipe, f"written by `modelsqueeze sensitivity --method {result.method}`: per layer the most "
                      f"aggressive {result.setting} {unit.budget} on its own; run it with "
                      f"`modelsqueeze run {recipe_path.name} -o SMALL.onnx`")
    if plot is not None:
        from modelsqueeze import plots

        curves = {key: [(v, result.accuracy[key][v]) for v in result.values] for key, _ in result.layers}
        _draw(plot, plots.plot_sensitivity, curves, result.setting, plot, result.baseline_accuracy, max_drop,
                               f"{model.name}: per-layer sensitivity to {result.method} {result.setting}")
    if as_json:
        _print_json(unit.json({"model": str(model), "data": str(data), **result.to_dict(), "metric": unit.metric.text,
                               "max_drop_pp": max_drop, **({"min_snr_db": unit.min_snr} if unit.snr else {}),
                               "chosen": chosen, "combined": combined,
                               "recipe": str(recipe_path) if recipe_path else None, "plot": str(plot) if plot else None}))
        return
    out.print(_sensitivity_table(result, chosen, unit,
                                 f"{unit.what} of {model.name} with one layer at a time at each {result.method} "
                                 f"{result.setting} (baseline {unit.show(result.baseline_accuracy)})"))
    out.print(f"chosen: per layer the most aggressive {result.setting} {unit.budget} on its own "
              f"(green: no loss, yellow: within, red: beyond)", highlight=False)
    if combined is not None:
        style = "red" if _exceeds(combined["drop_pp"], max_drop) else "green"
        out.print(f"together ({escape(combined['steps'])}): {combined['packed_bytes']:,} B ({combined['ratio']:.2f}x of "
                  f"{baseline_bytes:,} B), {'SNR' if unit.snr else 'accuracy'} {unit.show(combined['accuracy'])} "
                  + ("" if unit.snr else f"[{style}]({_change(combined['drop_pp'])})[/]"), highlight=False)
        if _exceeds(combined["drop_pp"], max_drop) and not quiet:
            err.print(f"note: the layers' drops add up: together they go beyond {unit.flag}; "
                      f"try --target-ratio/--target-bytes to search settings measured together", markup=False, highlight=False)
    if not quiet:
        for path, what in ((recipe_path, "recipe"), (plot, "plot")):
            if path is not None:
                err.print(f"wrote {what} {path}", markup=False, highlight=False)


# Up to this many layers the frontier shows a column per layer; beyond, the changed layers as text.
MAX_LAYER_COLUMNS = 8


def _frontier_table(found: engine.SearchResult, unit: _Unit, title: str) -> Table:
    max_drop = unit.budget_pp
    table = Table(box=box.SIMPLE_HEAD, title=escape(title), title_justify="left")
    for col in ("#", "packed bytes", "ratio", "SNR" if unit.snr else "accuracy", *(() if unit.snr else ("change",))):
        table.add_column(col, justify="right", no_wrap=True)
    keys = list(found.frontier[0].settings)
    gentlest = found.values[0]
    by_column = len(keys) <= MAX_LAYER_COLUMNS
    if by_column:
        for key in keys:
            table.add_column(Text(key), justify="right")
    else:
        table.add_column(f"{found.setting} (others {_value(gentlest)})")
    b, a = found.baseline_bytes, found.baseline_accuracy
    table.add_row("base", f"{b:,}", "1.00x", unit.show(a), *(() if unit.snr else ("",)),
                  *([""] * len(keys) if by_column else [Text("the input", style="dim")]))
    previous: dict = {}
    for i, point in enumerate(found.frontier, 1):
        drop = 100 * (a - point.accuracy)
        style = "bold" if point is found.chosen else ""
        row = [Text(f"{i}*" if point is found.chosen else str(i), style=style), Text(f"{point.packed_bytes:,}", style=style),
               f"{b / point.packed_bytes:.2f}x"]
        shown = Text(unit.show(point.accuracy), style=_drop_style(drop, max_drop) if unit.snr else "")
        row += [shown] if unit.snr else [shown, Text(_change(drop), style=_drop_style(drop, max_drop))]
        if by_column:  # the value that moved on this step stands out
            row += [Text(_value(v), style="bold cyan" if previous and previous[k] != v else "") for k, v in point.settings.items()]
        else:
            moved = {k: v for k, v in point.settings.items() if v != gentlest}
            row.append(Text(_settings_text(moved, found.setting) if moved else "all at the gentlest value"))
        previous = point.settings
        table.add_row(*row)
    return table


def _report_search(found: engine.SearchResult, table, model, data, recipe_path, plot, frontier_plot, unit: _Unit,
                   as_json, quiet, arrays) -> None:
    max_drop = unit.budget_pp
    b, a = found.baseline_bytes, found.baseline_accuracy
    chosen = found.chosen
    failure = None
    if chosen is None:
        last = found.frontier[-1]
        failure = (f"target {found.target_bytes:,} B ({b / found.target_bytes:.2f}x) cannot be reached with "
                   f"{found.method} {found.setting} on the selected layers" + (f" then {describe(found.then)}" if found.then else "")
                   + f": the most aggressive point found is {last.packed_bytes:,} B ({b / last.packed_bytes:.2f}x) at "
                   f"{unit.show(last.accuracy)}; no recipe written")
    elif _exceeds(100 * (a - chosen.accuracy), max_drop):
        fell = (f"SNR is {unit.show(chosen.accuracy)}, below {unit.flag} dB" if unit.snr else
                f"accuracy fell {100 * (a - chosen.accuracy):.2f} pp ({_pct(a)} -> {_pct(chosen.accuracy)}), more than {unit.flag}")
        failure = (f"target {found.target_bytes:,} B reached at {chosen.packed_bytes:,} B ({b / chosen.packed_bytes:.2f}x) but "
                   f"{fell}; no recipe written")
    if recipe_path is not None and failure is None:
        recipe = engine.recipe_for(found.method, chosen.settings, found.base_options, found.then, input=model,
                                   **_validation(arrays, data, unit))
        measured = ("output SNR against the original" if unit.snr else "accuracy" if label_key() in arrays
                    and unit.metric.kind == "top1" else "top-1 agreement with the original")
        validated = "validate" in _validation(arrays, data, unit)
        _write_recipe(recipe_path, recipe, f"written by `modelsqueeze sensitivity --method {found.method}` searching "
                      f"{found.target_bytes:,} B: {chosen.packed_bytes:,} B ({b / chosen.packed_bytes:.2f}x), "
                      f"{measured} on {data.name} {unit.show(chosen.accuracy)} (baseline {unit.show(a)}); run it with "
                      f"`modelsqueeze run {recipe_path.name} -o SMALL.onnx"
                      + ("`" if validated else " --validate TEST.npz --max-drop PP`"))
    from_plots = []
    if plot is not None and table is not None:
        from modelsqueeze import plots

        curves = {key: [(v, table.accuracy[key][v]) for v in table.values] for key, _ in table.layers}
        _draw(plot, plots.plot_sensitivity, curves, table.setting, plot, table.baseline_accuracy, max_drop,
                               f"{model.name}: per-layer sensitivity to {table.method} {table.setting}")
        from_plots.append((plot, "plot"))
    if frontier_plot is not None:
        from modelsqueeze import plots

        _draw(frontier_plot, plots.plot_frontier, [(p.packed_bytes, p.accuracy) for p in found.frontier], frontier_plot, b, a,
                            (chosen.packed_bytes, chosen.accuracy) if chosen else None, found.target_bytes,
                            f"{model.name}: {found.method} {found.setting} per layer"
                            + (f" then {describe(found.then)}" if found.then else ""))
        from_plots.append((frontier_plot, "frontier plot"))
    if as_json:
        _print_json(unit.json({"model": str(model), "data": str(data), **found.to_dict(), "metric": unit.metric.text,
                     "max_drop_pp": max_drop, **({"min_snr_db": unit.min_snr} if unit.snr else {}),
                     "then": [{"command": s.command, "text": describe([s])} for s in found.then],
                     "ok": failure is None, "message": failure,
                     "sensitivity": table.to_dict() if table is not None else None,
                     "recipe": str(recipe_path) if recipe_path is not None and failure is None else None}))
    else:
        if table is not None:
            out.print(_sensitivity_table(table, None, unit, f"{unit.what} of {model.name} with one layer "
                                         f"at a time at each {table.method} {table.setting} (baseline {unit.show(table.baseline_accuracy)})"))
        title = (f"frontier of {model.name}: {found.method} {found.setting} per layer"
                 + (f" then {describe(found.then)}" if found.then else "") + f", target {found.target_bytes:,} B")
        out.print(_frontier_table(found, unit, title))
        if failure is None:
            score = f"SNR {unit.show(chosen.accuracy)}" if unit.snr else \
                f"accuracy {_pct(chosen.accuracy)} ({_change(100 * (a - chosen.accuracy))})"
            out.print(f"chosen (*): {chosen.packed_bytes:,} B ({b / chosen.packed_bytes:.2f}x of {b:,} B), {score}, "
                      f"{found.evaluations} evaluations", highlight=False)
    if not quiet and not as_json:
        for path, what in from_plots + ([(recipe_path, "recipe")] if recipe_path is not None and failure is None else []):
            err.print(f"wrote {what} {path}", markup=False, highlight=False)
    if failure is not None:
        raise CheckFailed(failure)

