"""Per-layer sensitivity and size-targeted search: how much accuracy each layer loses to one
compression method at each setting, and which per-layer settings reach a packed size with the
smallest measured accuracy drop. Every number is measured: accuracy with onnxruntime on the graph
as it would be written, bytes as skeleton + sidecar of the pair that would be written.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import WeightInfo, find_weights, model_to_bytes
from modelsqueeze.pack import packed_bytes, rendered
from modelsqueeze.passes import Selection, nothing_selected, tensor_names
from modelsqueeze import store
from modelsqueeze.pipeline import run_steps
from modelsqueeze.recipe import Recipe, Step, make_step
from modelsqueeze.tensor import CompressedTensor
from modelsqueeze.validate import Metric, Scorer, label_key

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Method:
    """The one setting sensitivity varies for a compression command, and its default grid ordered
    gentle -> aggressive."""

    command: str
    setting: str
    grid: tuple[float, ...]
    larger_is_aggressive: bool
    # Options that would fight the per-layer setting, with what to say instead.
    conflicts: dict[str, str] = field(default_factory=dict)

    def order(self, values: Sequence[float]) -> list[float]:
        """Distinct values sorted gentle -> aggressive."""
        return sorted(set(values), reverse=not self.larger_is_aggressive)


METHODS: dict[str, Method] = {
    "prune": Method("prune", "sparsity", (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95), True, {
        "threshold": "sensitivity varies --sparsity", "std_scale": "sensitivity varies --sparsity",
        "nm": "sensitivity varies --sparsity; N:M has no per-layer notches"}),
    "cluster": Method("cluster", "bits", (8, 7, 6, 5, 4, 3, 2), False, {
        "clusters": "sensitivity varies --bits"}),
    "quantize": Method("quantize", "bits", (8, 7, 6, 5, 4, 3, 2), False),
    "svd": Method("svd", "energy", (0.999, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5), False, {
        "rank": "sensitivity varies --energy", "ratio": "sensitivity varies --energy",
        "max_error": "sensitivity varies --energy", "target_params": "sensitivity varies --energy"}),
}
SELECTION_OPTIONS = ("layers", "exclude", "min_params")
# With more layers than this, the single-layer table ranks the moves and only this many are measured per step.
DEFAULT_CANDIDATES = 4


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ModelSqueezeError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def _plain(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() else value


def check_options(method: Method, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fixed options of `method` (CLI names, either spelling) with everything that would fight
    a per-layer sweep refused: the setting itself, other criteria, a non-layer scope, a selection."""
    options = dict(options or {})
    for name, value in options.items():
        key = name.replace("-", "_")
        flag = "--option " + name
        if key == method.setting:
            raise ModelSqueezeError(f"{flag}: {method.setting} is what sensitivity varies; give --values instead")
        if key in method.conflicts:
            raise ModelSqueezeError(f"{flag}: {method.conflicts[key]}")
        if key in SELECTION_OPTIONS:
            raise ModelSqueezeError(f"{flag}: use --{key.replace('_', '-')} to choose the layers")
        if key == "scope" and value != "layer":
            raise ModelSqueezeError(f"{flag}={value}: sensitivity is per layer, so scope must stay 'layer'")
    # make_step names unknown options and bad values
    make_step(method.command, {**options, method.setting: method.grid[0]})
    return options


def grid_values(method: Method, values: Sequence[float] | None, base_options: Mapping[str, Any] | None = None) -> list[int | float]:
    """The values to sweep: `values` (each validated as the method's setting) or the default grid,
    distinct, ordered gentle -> aggressive."""
    if values is None:
        return [_plain(v) for v in method.grid]
    values = list(values)
    if not values:
        raise ModelSqueezeError("--values: no value given")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelSqueezeError(f"--values {value!r}: expected finite numbers")
        try:
            make_step(method.command, {**(base_options or {}), method.setting: value})
        except ModelSqueezeError as exc:
            raise ModelSqueezeError(f"--values {value:g}: {exc}") from None
    return [_plain(v) for v in method.order(values)]


def exact_glob(key: str) -> str:
    """A --layers glob that matches exactly `key` (fnmatch specials escaped; a tensor literally named
    'default' is spelled so a recipe table does not read it as the default)."""
    escaped = re.sub(r"([*?\[])", r"[\1]", key)
    return "[d]efault" if escaped == "default" else escaped


def layers_to_vary(model: onnx.ModelProto, selection: Selection) -> list[WeightInfo]:
    """The selected weights, each of which an exact glob addresses alone (globs also match the
    names of consuming nodes, so a node named like another tensor would make one ambiguous)."""
    infos = selection.pick(model)
    if not infos:
        raise nothing_selected(model)
    every = find_weights(model)
    for info in infos:
        glob = exact_glob(info.key)
        others = sorted({o.key for o in every if o.key != info.key
                         and any(fnmatch.fnmatchcase(n, glob) for n in tensor_names(o))})
        if others:
            raise ModelSqueezeError(f"layer {info.key!r}: {', '.join(others)} (or a node consuming it) has the same name, "
                                    f"so no --layers glob picks the layer alone; --exclude one of them")
    return infos


def snr_score(db: float) -> float:
    """The score sensitivity and its search compare for `--metric snr`: 1 − noise/signal power
    (1.0: identical outputs), so higher is better like accuracy, a "drop" in points is the noise
    power in percent of the signal's, and the drops of layers compressed together roughly add
    (independent noises do). Monotone in the SNR: a floor in dB is a budget of drop exactly."""
    return 1.0 if db == math.inf else 1.0 - 10.0 ** (-db / 10.0)


def score_snr(score: float) -> float:
    """The SNR in dB that `snr_score` maps to `score`."""
    return math.inf if score >= 1.0 else -10.0 * math.log10(1.0 - score)


def snr_budget_pp(min_snr_db: float) -> float:
    """The drop (in the points of `snr_score`) that keeps the SNR at `min_snr_db` or above."""
    return 100.0 * (1.0 - snr_score(min_snr_db))


class Evaluator(Scorer):
    """The score of candidate graphs on one data set (validate.Scorer): top-1 accuracy on the
    labels by default; data without labels is scored by top-1 agreement with the `reference`
    graph (the original model), so a search can run on unlabelled calibration data instead of the
    test set; `metric` asks for agreement (on a named output) outright, or the output's SNR
    against the reference (as `snr_score`). Scores are fractions, higher is better."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str = "data", reference: onnx.ModelProto | None = None,
                 metric: Metric | None = None):
        metric = metric or Metric()
        self.agreement = metric.kind == "agreement" or (metric.kind == "top1" and label_key() not in arrays)
        if self.agreement and metric.kind == "top1":
            metric = Metric("agreement", metric.output)
        super().__init__(metric, arrays, reference, source)

    def __call__(self, graph: onnx.ModelProto, label: str = "candidate", progress=None) -> float:
        value = super().__call__(graph, label, progress)
        return snr_score(value) if self.metric.kind == "snr" else value


def _size(model: onnx.ModelProto, records: Mapping[str, CompressedTensor]) -> int:
    """Packed size of a pair; a model without records ships as its plain file."""
    return packed_bytes(model, list(records.values())) if records else len(model_to_bytes(model))


# --- per-layer sensitivity ---------------------------------------------------------------------

@dataclass
class SensitivityResult:
    """Accuracy (fraction) and packed bytes with the method applied to one layer at a time."""

    method: str
    setting: str
    values: list[int | float]  # gentle -> aggressive
    layers: list[tuple[str, int]]  # (key, n_params)
    baseline_accuracy: float
    baseline_bytes: int
    accuracy: dict[str, dict[float, float]]
    bytes: dict[str, dict[float, int]]
    base_options: dict[str, Any] = field(default_factory=dict)

    def drop_pp(self, layer: str, value: float) -> float:
        return 100.0 * (self.baseline_accuracy - self.accuracy[layer][value])

    def to_dict(self) -> dict:
        return {
            "method": self.method, "setting": self.setting, "values": self.values,
            "options": self.base_options,
            "baseline_accuracy": self.baseline_accuracy, "baseline_bytes": self.baseline_bytes,
            "layers": [
                {"name": key, "params": n, "points": [
                    {"value": v, "accuracy": self.accuracy[key][v], "drop_pp": self.drop_pp(key, v),
                     "packed_bytes": self.bytes[key][v]} for v in self.values]}
                for key, n in self.layers
            ],
        }


def single_layer_step(method: Method, key: str, value: float, base_options: Mapping[str, Any] | None = None) -> Step:
    glob = exact_glob(key)
    return make_step(method.command, {**(base_options or {}), method.setting: value, "layers": [glob]})


def sensitivity(
    model: onnx.ModelProto,
    records: Mapping[str, CompressedTensor],
    arrays: Mapping[str, np.ndarray],
    method: str,
    values: Sequence[float] | None = None,
    base_options: Mapping[str, Any] | None = None,
    selection: Selection = Selection(),
    progress: Progress | None = None,
    source: str = "data",
    evaluator: Evaluator | None = None,
    baseline_bytes: int | None = None,
    metric: Metric | None = None,
) -> SensitivityResult:
    """For each selected layer and each value: apply `method` at that value to that layer alone,
    measure top-1 accuracy of the graph as written and the packed bytes of the pair. `progress(1)`
    is called per measurement; `baseline_bytes` (default: the pair's packed size as it would be
    written now) is what the input weighs."""
    spec = method_of(method)
    base = check_options(spec, base_options)
    grid = grid_values(spec, values, base)
    infos = layers_to_vary(model, selection)
    records = dict(records)
    evaluate = evaluator or Evaluator(arrays, source, reference=rendered(model, records.values()), metric=metric)
    baseline_accuracy = evaluate(rendered(model, records.values()), "baseline")
    acc: dict[str, dict[float, float]] = {}
    size: dict[str, dict[float, int]] = {}
    for info in infos:
        acc[info.key], size[info.key] = {}, {}
        for value in grid:
            with store.released():  # the candidate's values go with it
                # as the command would write it: a tensor that would not get smaller stays as it was
                final, new_records, _ = run_steps(model, records, [single_layer_step(spec, info.key, value, base)],
                                                  size_last=False)
                size[info.key][value] = packed_bytes(final, list(new_records.values()))
                acc[info.key][value] = evaluate(rendered(final, new_records.values()),
                                                f"{info.key} {spec.setting}={value}")
                del final, new_records
            if progress:
                progress(1)
    return SensitivityResult(
        method=spec.command, setting=spec.setting, values=grid, layers=[(i.key, i.n_params) for i in infos],
        baseline_accuracy=baseline_accuracy, accuracy=acc, bytes=size,
        baseline_bytes=baseline_bytes if baseline_bytes is not None else _size(model, records),
        base_options=base,
    )


def best_settings(result: SensitivityResult, max_drop_pp: float) -> dict[str, int | float]:
    """Per layer, the most aggressive value whose drop (on its own) is at most `max_drop_pp` and
    that makes the pair smaller than the input; a layer with no such value is left out (left
    alone): svd on a layer it cannot factor, or pruning a tiny bias, only adds sidecar bytes."""
    chosen = {}
    for key, _ in result.layers:
        passing = [v for v in result.values if result.drop_pp(key, v) <= max_drop_pp + 1e-9
                   and result.bytes[key][v] < result.baseline_bytes]
        if passing:
            chosen[key] = passing[-1]
    return chosen


# --- recipes -------------------------------------------------------------------------------------

def method_step(method: str, settings: Mapping[str, float], base_options: Mapping[str, Any] | None = None) -> Step | None:
    """One step of `method` with a per-layer table of exact globs and no default (every other
    layer is left alone); None when `settings` is empty."""
    if not settings:
        return None
    spec = method_of(method)
    table = {exact_glob(key): _plain(value) for key, value in settings.items()}
    return make_step(spec.command, {**(base_options or {}), spec.setting: table, "layers": list(table)})


def recipe_for(
    method: str,
    settings: Mapping[str, float],
    base_options: Mapping[str, Any] | None = None,
    then_steps: Sequence[Step] = (),
    input: Path | None = None,
    output: Path | None = None,
    validate: Path | None = None,
    max_drop: float | None = None,
    metric: str | None = None,
    min_snr: float | None = None,
) -> Recipe:
    """The recipe: `method` with the per-layer `settings`, then `then_steps`."""
    first = method_step(method, settings, base_options)
    steps = ([first] if first is not None else []) + list(then_steps)
    if not steps:
        raise ModelSqueezeError("no layer has a setting and there are no --then steps: nothing to put in a recipe")
    return Recipe(tuple(steps), input, output, validate, max_drop, metric=metric, min_snr=min_snr)


# --- size-targeted search ------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One configuration: the value per layer, what the pair would weigh and its accuracy."""

    settings: dict[str, int | float]
    packed_bytes: int
    accuracy: float

    def to_dict(self, baseline_bytes: int, baseline_accuracy: float) -> dict:
        return {"settings": self.settings, "packed_bytes": self.packed_bytes,
                "ratio": baseline_bytes / self.packed_bytes, "accuracy": self.accuracy,
                "drop_pp": 100.0 * (baseline_accuracy - self.accuracy)}


@dataclass
class SearchResult:
    method: str
    setting: str
    values: list[int | float]
    target_bytes: int
    baseline_bytes: int
    baseline_accuracy: float
    frontier: list[Point]  # every accepted configuration, gentlest first
    chosen: Point | None  # the first frontier point within the target
    evaluations: int
    then: list[Step] = field(default_factory=list)
    base_options: dict[str, Any] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict:
        b, a = self.baseline_bytes, self.baseline_accuracy
        return {
            "method": self.method, "setting": self.setting, "values": self.values, "options": self.base_options,
            "target_bytes": self.target_bytes, "baseline_bytes": b, "baseline_accuracy": a,
            "reached": self.reached, "evaluations": self.evaluations,
            "frontier": [p.to_dict(b, a) for p in self.frontier],
            "chosen": self.chosen.to_dict(b, a) if self.chosen else None,
        }


class _Configurations:
    """Measured configurations, by the notch index of each layer (each one measured once)."""

    def __init__(self, model, records, arrays, spec: Method, keys: list[str], grid: list, base: dict,
                 then: Sequence[Step], evaluate: Evaluator, progress: Progress | None):
        self.model, self.records = model, dict(records)
        self.spec, self.keys, self.grid, self.base, self.then = spec, keys, grid, base, list(then)
        self.evaluate, self.progress = evaluate, progress
        self.cache: dict[tuple[int, ...], Point] = {}
        # (layer, its notch) -> notches that, measured from there, did not make the pair smaller
        self.futile: dict[tuple[int, int], set[int]] = {}

    def settings(self, notches: tuple[int, ...]) -> dict[str, int | float]:
        return {key: self.grid[n] for key, n in zip(self.keys, notches)}

    def steps(self, notches: tuple[int, ...]) -> list[Step]:
        return [method_step(self.spec.command, self.settings(notches), self.base)] + self.then

    def measure(self, notches: tuple[int, ...]) -> Point:
        if notches not in self.cache:
            with store.released():  # the candidate's values go with it
                final, records, _ = run_steps(self.model, self.records, self.steps(notches), size_last=False)
                size = packed_bytes(final, list(records.values()))
                acc = self.evaluate(rendered(final, records.values()), "candidate")
                del final, records
            self.cache[notches] = Point(self.settings(notches), size, acc)
            if self.progress:
                self.progress(1)
        return self.cache[notches]


def search(
    model: onnx.ModelProto,
    records: Mapping[str, CompressedTensor],
    arrays: Mapping[str, np.ndarray],
    method: str,
    target_bytes: int,
    values: Sequence[float] | None = None,
    base_options: Mapping[str, Any] | None = None,
    then: Sequence[Step] = (),
    selection: Selection = Selection(),
    progress: Progress | None = None,
    source: str = "data",
    candidates: int = DEFAULT_CANDIDATES,
    table: SensitivityResult | None = None,
    baseline_bytes: int | None = None,
    on_accept: Callable[[Point], None] | None = None,
    evaluator: Evaluator | None = None,
    metric: Metric | None = None,
) -> SearchResult:
    """Per-layer settings of `method` (followed by `then`) whose pair packs into `target_bytes` with
    the smallest accuracy drop, greedily: start with every layer at the gentlest value; at each
    step measure, for real, moving single layers one notch further (to the next notch that saves
    bytes) and accept the move losing the least accuracy per byte saved. Every accepted point is on
    the frontier; the search stops at the first point within the target, or when no move saves
    bytes (target unreachable: the last point is the most aggressive one found).

    With more layers than `candidates`, only the `candidates` moves that look best in the
    single-layer sensitivity `table` (measured first when not given) are measured each step."""
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 1:
        raise ModelSqueezeError(f"target {target_bytes!r} bytes: must be a positive whole number")
    if candidates < 1:
        raise ModelSqueezeError(f"candidates {candidates}: must be 1 or more")
    spec = method_of(method)
    base = check_options(spec, base_options)
    grid = grid_values(spec, values, base)
    infos = layers_to_vary(model, selection)
    keys = [info.key for info in infos]
    records = dict(records)
    evaluate = evaluator or Evaluator(arrays, source, reference=rendered(model, records.values()), metric=metric)
    baseline_accuracy = evaluate(rendered(model, records.values()), "baseline")
    if baseline_bytes is None:
        baseline_bytes = _size(model, records)
    if len(keys) > candidates and table is None:
        table = sensitivity(model, records, arrays, method, grid, base, selection, progress, source, evaluate,
                            baseline_bytes)
    configs = _Configurations(model, records, arrays, spec, keys, grid, base, then, evaluate, progress)

    current = tuple(0 for _ in keys)
    point = configs.measure(current)
    frontier = [point]
    if on_accept:
        on_accept(point)
    last = len(grid) - 1
    while point.packed_bytes > target_bytes:
        moves = [i for i, n in enumerate(current) if n < last]
        if not moves:
            break  # every layer at its most aggressive value
        if table is not None:  # most promising first, measured `candidates` at a time
            moves.sort(key=lambda i: _estimate(table, keys[i], grid, current[i]) + (i,))
        best: tuple[tuple, tuple[int, ...], Point] | None = None
        chunk = candidates if table is not None else len(moves)
        for start in range(0, len(moves), chunk):
            for i in moves[start:start + chunk]:
                found = _next_saving(configs, current, i, point.packed_bytes, table, keys[i])
                if found is None:
                    continue
                notches, candidate = found
                saved = point.packed_bytes - candidate.packed_bytes
                score = ((point.accuracy - candidate.accuracy) / saved, -saved, i)
                if best is None or score < best[0]:
                    best = (score, notches, candidate)
            if best is not None:
                break
        if best is None:
            break  # no single-layer move saves bytes any more
        _, current, point = best
        frontier.append(point)
        if on_accept:
            on_accept(point)
    chosen = next((p for p in frontier if p.packed_bytes <= target_bytes), None)
    return SearchResult(
        method=spec.command, setting=spec.setting, values=grid, target_bytes=target_bytes,
        baseline_bytes=baseline_bytes, baseline_accuracy=baseline_accuracy, frontier=frontier,
        chosen=chosen, evaluations=evaluate.evaluations, then=list(then), base_options=base,
    )


def _estimate(table: SensitivityResult, key: str, grid: list, notch: int) -> tuple[float, float]:
    """(loss per byte saved, -bytes saved) of moving `key` on its own to its next notch that saves
    bytes, from the single-layer table; a layer no notch of which saves anything sorts last."""
    here = grid[notch]
    for there in grid[notch + 1:]:
        saved = table.bytes[key][here] - table.bytes[key][there]
        if saved > 0:
            return (table.accuracy[key][here] - table.accuracy[key][there]) / saved, -saved
    return math.inf, 0.0


def _next_saving(configs: _Configurations, current: tuple[int, ...], i: int, current_bytes: int,
                 table: SensitivityResult | None, key: str) -> tuple[tuple[int, ...], Point] | None:
    """Layer `i` moved to its next notch that makes the pair smaller (None: no notch does). Notches
    that did not save bytes when measured from this layer's current notch before (other layers
    elsewhere: sizes add up tensor by tensor), or that the single-layer table says change nothing,
    are skipped without measuring again."""
    grid = configs.grid
    futile = configs.futile.setdefault((i, current[i]), set())
    for notch in range(current[i] + 1, len(grid)):
        if notch in futile:
            continue
        if table is not None and notch + 1 < len(grid) and table.bytes[key][grid[notch]] >= table.bytes[key][grid[current[i]]]:
            continue  # same size as now on its own: measure the next notch instead
        notches = current[:i] + (notch,) + current[i + 1:]
        candidate = configs.measure(notches)
        if candidate.packed_bytes < current_bytes:
            return notches, candidate
        futile.add(notch)
    return None


# --- per-tensor output sensitivity -----------------------------------------------------------

def sensitivity_infos(model: onnx.ModelProto) -> list[WeightInfo]:
    """The tensors `output_sensitivity` measures: every layer weight, tiny ones and fixed bases
    included (those are what it is there to show)."""
    return Selection(layers=("*",), min_params=0).pick(model)


def output_sensitivity(model: onnx.ModelProto, records: Mapping[str, CompressedTensor], arrays: Mapping[str, np.ndarray],
                       source: str = "data", progress: Progress | None = None,
                       infos: list[WeightInfo] | None = None) -> list[dict]:
    """Per compressible tensor: the output SNR and top-1 agreement of the model with that tensor
    alone quantized the default way (int8 per channel), against the model as it is. Fixed bases
    (an STFT basis fed to a Conv) and sensitive heads are what show up first; ordered by SNR."""
    from modelsqueeze.validate import Runner, fidelity, headline_output, split_data

    reference = rendered(model, records.values())
    runner = Runner(reference, "reference")
    samples = split_data(arrays, runner, source, labels=False)
    index = headline_output(runner)
    want = runner.run(samples)[index]
    rows = []
    for info in sensitivity_infos(model) if infos is None else infos:
        step = make_step("quantize", {"layers": [exact_glob(info.key)], "min_params": 0})
        row = {"name": info.key, "params": info.n_params, "output": runner.output_names[index]}
        try:
            with store.released():
                final, new_records, outcomes = run_steps(model, records, [step], size_last=False)
                changed = bool(outcomes[-1].changed)
                got = Runner(rendered(final, new_records.values()), info.key).run(samples)[index] if changed else want
        except ModelSqueezeError as exc:
            row.update(snr_db=None, top1_agreement=None, note=str(exc))
        else:
            fid = fidelity(got, want)
            row.update(snr_db=float("inf") if fid["snr_db"] is None and fid["max_abs_error"] == 0 else fid["snr_db"],
                       top1_agreement=fid["top1_agreement"], note="" if changed else "left as it was (int8 would not be smaller)")
        rows.append(row)
        if progress:
            progress(1)
    return sorted(rows, key=lambda r: (r["snr_db"] is None, r["snr_db"] if r["snr_db"] is not None else 0.0))
