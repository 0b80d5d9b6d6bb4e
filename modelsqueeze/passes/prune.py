"""The prune pass: choose keep-masks (magnitude, threshold, std scale, structured, N:M; per layer
or global), zero the rest, store survivors sparsely; optionally shrink structured layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels import prune as kernels
from modelsqueeze.model import WeightInfo, find_weights
from modelsqueeze.pack import put_array, put_record
from modelsqueeze.passes import LayerRule, PassResult, Selection, finite_only, sparse_record, track
from modelsqueeze.passes.calibration import Calibrator
from modelsqueeze.passes.shrink import shrink_channels
from modelsqueeze.tensor import CompressedTensor

SCOPES = ("layer", "global")
STRUCTURES = ("rows", "channels")
NORMS = ("l1", "l2")


@dataclass(frozen=True)
class PruneConfig:
    """Options of `modelsqueeze prune`; exactly one criterion among sparsity, threshold,
    std_scale and nm. `structured` removes whole output channels (rows of a MatMul/Gemm weight,
    filters of a Conv) ranked by `norm`, with `sparsity` the fraction of channels."""

    sparsity: LayerRule | None = None
    threshold: LayerRule | None = None
    std_scale: LayerRule | None = None
    nm: tuple[int, int] | None = None
    scope: str = "layer"
    structured: str | None = None
    norm: str = "l2"
    shrink: bool = False
    calibration: str | None = None  # inputs (.npz, no labels needed): rank by output error, re-fit survivors
    sequential: bool = False  # with calibration: each layer fitted to the inputs the pruned layers before it give
    damp: float = 0.01  # ridge of the re-fit, relative to the mean of diag(XᵀX)
    selection: Selection = field(default_factory=Selection)
    version: int = 1

    def __post_init__(self) -> None:
        given = [n for n in ("sparsity", "threshold", "std_scale", "nm") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ModelSqueezeError(
                "prune needs exactly one of --sparsity, --threshold, --std-scale or --nm"
                + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else "")
            )
        if self.scope not in SCOPES:
            raise ModelSqueezeError(f"--scope {self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.norm not in NORMS:
            raise ModelSqueezeError(f"--norm {self.norm!r}: expected one of {', '.join(NORMS)}")
        if self.structured is not None and self.structured not in STRUCTURES:
            raise ModelSqueezeError(f"--structured {self.structured!r}: expected one of {', '.join(STRUCTURES)}")
        if self.structured and self.sparsity is None:
            raise ModelSqueezeError("--structured needs --sparsity (the fraction of channels to remove)")
        if self.structured and self.scope == "global":
            raise ModelSqueezeError("--structured prunes each layer's channels: use --scope layer")
        if self.shrink and not self.structured:
            raise ModelSqueezeError("--shrink needs --structured rows|channels")
        if self.sparsity is not None and any(not 0 <= v <= 1 for v in self.sparsity.values()):
            raise ModelSqueezeError("--sparsity values must lie in [0, 1]")
        for rule, option in ((self.threshold, "--threshold"), (self.std_scale, "--std-scale")):
            if rule is not None and any(v < 0 for v in rule.values()):
                raise ModelSqueezeError(f"{option} values must be 0 or more")
        if self.sequential and self.calibration is None:
            raise ModelSqueezeError("--sequential needs --calibration DATA.npz")
        if self.nm is not None and not (0 < self.nm[0] <= self.nm[1]):
            raise ModelSqueezeError(f"--nm {self.nm[0]}:{self.nm[1]}: need 0 < N <= M")


def parse_nm(text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ModelSqueezeError(f"--nm {text!r}: expected N:M such as 2:4")
    return int(n), int(m)


def _mask_stream(
    config: PruneConfig, infos: list[WeightInfo], load: Callable[[WeightInfo], np.ndarray], notes: list[str]
) -> Iterator[tuple[WeightInfo, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(info, its ranked array, keep-mask, keep-vector over its output channels for structured
    pruning else None) for each tensor the configuration prunes, in order. `load(info)` gives
    the array a tensor is ranked by; one tensor is loaded at a time (a global criterion first
    streams over the tensors it covers)."""
    rule, option = next(((r, o) for r, o in ((config.sparsity, "--sparsity"), (config.threshold, "--threshold"),
                                             (config.std_scale, "--std-scale")) if r is not None), (None, ""))
    if config.nm is None:
        notes += rule.unused_notes(infos, option)
    plan: list[tuple[WeightInfo, float | None, bool]] = []  # (tensor, its value, under one global criterion)
    for info in infos:
        value, overridden = (None, False) if config.nm is not None else rule.lookup(info)
        if config.nm is None and value is None:
            continue
        plan.append((info, value, config.nm is None and not config.structured and config.scope == "global"
                     and not overridden and config.threshold is None))
    shared = [info for info, _, is_shared in plan if is_shared]
    if shared and config.sparsity is not None:
        chooser = kernels.GlobalMagnitude([lambda info=info: load(info) for info in shared], rule.default)
        order = {info.key: i for i, info in enumerate(shared)}
        global_mask = lambda info, array: chooser.mask(order[info.key], array)  # noqa: E731
    elif shared:
        limit = kernels.std_threshold([load(info) for info in shared], rule.default)
        global_mask = lambda info, array: kernels.threshold_mask(array, limit)  # noqa: E731
    for info, value, is_shared in track(plan):
        array = load(info)
        keep = None
        if config.nm is not None:
            if info.reduction_axis is None:
                notes.append(f"{info.key}: no reduction axis for its consumer ({info.ops}), N:M skipped")
                continue
            mask = kernels.nm_mask(array, *config.nm, info.reduction_axis)
        elif config.structured:
            if info.channel_axis is None:
                notes.append(f"{info.key}: no single output-channel axis ({info.ops}), structured pruning skipped")
                continue
            keep = kernels.structured_keep(array, info.channel_axis, value, config.norm)
            mask = kernels.expand_channel_keep(keep, array.shape, info.channel_axis)
        elif is_shared:
            mask = global_mask(info, array)
        elif config.sparsity is not None:
            mask = kernels.magnitude_mask(array, value)
        elif config.threshold is not None:
            mask = kernels.threshold_mask(array, value)
        else:
            mask = kernels.threshold_mask(array, kernels.std_threshold([array], value))
        yield info, array, mask, keep


def _masks(
    config: PruneConfig, weights: list[tuple[WeightInfo, np.ndarray]], notes: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep-mask per tensor key for the tensors the configuration prunes (ranked by the arrays
    given), and for structured pruning also the keep-vector over each tensor's output channels."""
    ranked = {info.key: array for info, array in weights}
    masks: dict[str, np.ndarray] = {}
    channel_keeps: dict[str, np.ndarray] = {}
    for info, _, mask, keep in _mask_stream(config, [info for info, _ in weights], lambda i: ranked[i.key], notes):
        masks[info.key] = mask
        if keep is not None:
            channel_keeps[info.key] = keep
    return masks, channel_keeps


def _importance(cal: Calibrator, info: WeightInfo, array: np.ndarray) -> np.ndarray:
    """What the mask ranks, in the tensor's own shape: |w|·sqrt((XᵀX)ₖₖ / samples), the root of the
    squared output error zeroing w alone causes per calibration sample, summed over every output
    position of a Conv (OBS/Wanda-style). It compares across layers (global scope) and does not
    grow with the amount of data; uncalibrated layers rank by |w| (an input of unit energy)."""
    if not cal.covers(info.key):
        return np.abs(array).astype(np.float64)
    data = cal.reference_layer(info.key)
    energy = np.diag(data.H) / max(cal.samples, 1)
    w = data.view.to_matrix(array).astype(np.float64)
    return data.view.from_matrix(np.abs(w) * np.sqrt(energy)[:, None])


def _refit(cal: Calibrator, info: WeightInfo, array: np.ndarray, keep: np.ndarray, current: onnx.ModelProto,
           notes: list[str]) -> np.ndarray:
    """The surviving weights re-fitted by least squares to the layer's original outputs."""
    from modelsqueeze.kernels.calibrated import refit_masked

    data = cal.layer(info.key, current)
    view = data.view
    w = view.to_matrix(array).astype(np.float64)
    fitted = refit_masked(w, view.to_matrix(keep), data.H, cal.damp, C=data.C)
    notes.append(cal.note(info.key, data, w, np.where(view.to_matrix(keep), w, 0.0), fitted.astype(np.float64)))
    return view.from_matrix(fitted.astype(array.dtype))


def _prune_tensorwise(config: PruneConfig, out: onnx.ModelProto, records: dict[str, CompressedTensor],
                      selected: list[WeightInfo], notes: list[str]) -> PassResult:
    """Data-free pruning one tensor at a time: each is read, masked, stored as its record and let go."""
    new_records = dict(records)
    changed = []
    for info, array, mask, _ in _mask_stream(config, selected, WeightInfo.array, notes):
        record = sparse_record(info.key, np.where(mask, array, np.zeros((), array.dtype)), records.get(info.key))
        del array, mask
        put_record(out, info.key, record)
        new_records[info.key] = record
        changed.append(info.key)
    return PassResult(model=out, records=new_records, changed=changed, notes=notes)


def prune(model: onnx.ModelProto, records: dict[str, CompressedTensor], config: PruneConfig) -> PassResult:
    """Apply `config` to a copy of `model` whose tensors hold their current values; `records` are
    the input pair's. Pruned tensors get sparse records; with --shrink, removed channels leave the graph."""
    notes: list[str] = []
    out, selected = config.selection.start(model, notes)
    selected = finite_only(selected, notes)
    cal = Calibrator.create(config, model, selected, notes)
    if cal is None and not config.shrink:
        return _prune_tensorwise(config, out, records, selected, notes)
    weights = [(info, info.array()) for info in selected]
    ranked = weights
    if cal is not None and (config.sparsity is not None or config.nm is not None) and not config.structured:
        ranked = [(info, _importance(cal, info, array)) for info, array in weights]
    masks, channel_keeps = _masks(config, ranked, notes)
    for info, array in weights:
        if info.key in masks:
            put_array(out, info.key, np.where(masks[info.key], array, np.zeros((), array.dtype)))
    changed = [info.key for info, _ in weights if info.key in masks]
    if cal is not None:
        if config.structured:
            notes.append("structured pruning keeps the remaining channels' weights as they are (no re-fit)")
        else:
            for info, array in track(weights):
                if info.key in masks and cal.covers(info.key):
                    put_array(out, info.key, _refit(cal, info, array, masks[info.key], out, notes))
    if config.shrink:
        reshaped = shrink_channels(out, channel_keeps, notes)
        changed += [key for key in sorted(reshaped) if key in records and key not in changed]
    current = {info.key: info for info in find_weights(out)}
    new_records = dict(records)
    for key in track(changed):
        new_records[key] = sparse_record(key, current[key].array(), records.get(key))
    return PassResult(model=out, records=new_records, changed=changed, notes=notes)
