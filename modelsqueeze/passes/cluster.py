"""The cluster pass: k-means weight sharing. Each selected tensor's non-zero weights are replaced by
the nearest of K centroids (per tensor, or one codebook shared by all); zeros stay exactly zero."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels.kmeans1d import INITS, METHODS, assign, fit_centroids
from modelsqueeze.pack import put_record
from modelsqueeze.model import WeightInfo
from modelsqueeze.passes import LayerRule, PassResult, Selection, finite_only, parallel_map, track
from modelsqueeze.passes.calibration import Calibrator
from modelsqueeze.sidecar import record_size
from modelsqueeze.tensor import CompressedTensor, share_arrays

SCOPES = ("layer", "shared")
MAX_CLUSTERS = 2**16


@dataclass(frozen=True)
class ClusterConfig:
    """Options of `modelsqueeze cluster`: exactly one of `bits` (2^bits centroids) or `clusters`."""

    bits: LayerRule | None = None
    clusters: LayerRule | None = None
    init: str = "auto"
    method: str = "lloyd"
    scope: str = "layer"
    seed: int = 0
    calibration: str | None = None  # inputs (.npz, no labels needed): re-fit each codebook to the layer's outputs
    sequential: bool = False  # with calibration: fit each layer to the inputs the clustered layers before it give
    damp: float = 0.01  # ridge of the codebook fit, relative to the mean of diag(XᵀX)
    selection: Selection = field(default_factory=Selection)
    version: int = 1

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.clusters is None):
            raise ModelSqueezeError("cluster needs exactly one of --bits or --clusters")
        if self.bits is not None and any(v != int(v) or not 1 <= v <= 16 for v in self.bits.values()):
            raise ModelSqueezeError("--bits must be whole numbers from 1 to 16")
        if self.clusters is not None and any(v != int(v) or not 1 <= v <= MAX_CLUSTERS for v in self.clusters.values()):
            raise ModelSqueezeError(f"--clusters must be whole numbers from 1 to {MAX_CLUSTERS}")
        for value, options, flag in ((self.init, INITS, "--init"), (self.method, METHODS, "--method"),
                                     (self.scope, SCOPES, "--scope")):
            if value not in options:
                raise ModelSqueezeError(f"{flag} {value!r}: expected one of {', '.join(options)}")
        if self.scope == "shared" and (self.rule.overrides or self.rule.default is None):
            raise ModelSqueezeError("--scope shared uses one codebook: give one --bits/--clusters value, no per-layer ones")
        if self.sequential and self.calibration is None:
            raise ModelSqueezeError("--sequential needs --calibration DATA.npz")

    @property
    def rule(self) -> LayerRule:
        return self.bits if self.bits is not None else self.clusters

    def n_clusters(self, value: float) -> int:
        return 2 ** int(value) if self.bits is not None else int(value)


def index_bits(n_codes: int) -> int:
    """Bits an index into `n_codes` centroids needs (at least 1)."""
    return max(1, math.ceil(math.log2(n_codes))) if n_codes > 1 else 1


def _codes(values: np.ndarray, k: int, config: ClusterConfig) -> np.ndarray:
    """The centroids for 1-D values (in their own dtype: k-means widens its distinct values
    itself); no values -> no centroids."""
    if values.size == 0:
        return np.zeros(0)
    try:
        return fit_centroids(values, k, init=config.init, method=config.method, seed=config.seed)
    except ValueError as exc:
        raise ModelSqueezeError(str(exc)) from None


ASSIGN_CHUNK = 1 << 20  # values labelled at a time (the labels go straight into 1-2 byte codes)


def _code_of(values: np.ndarray, centroids: np.ndarray, n_codes: int, shift: int = 0) -> np.ndarray:
    """Each value's nearest centroid plus `shift`, in the smallest unsigned type for `n_codes`."""
    out = np.empty(values.size, np.uint8 if n_codes <= 256 else np.uint16)
    if not centroids.size:
        out[:] = shift
        return out
    for lo in range(0, values.size, ASSIGN_CHUNK):
        out[lo:lo + ASSIGN_CHUNK] = assign(values[lo:lo + ASSIGN_CHUNK], centroids) + shift
    return out


def encode(name: str, array: np.ndarray, k: int, config: ClusterConfig,
           shared: np.ndarray | None = None) -> CompressedTensor:
    """The smaller of two records sharing `k` codes: the non-zeros' codes plus their positions, or
    a code for every element with zero as a code of its own (k - 1 centroids for the non-zeros).
    With `shared` centroids, both variants use that codebook instead of their own."""
    flat = array.reshape(-1)
    has_zero = np.count_nonzero(flat) < flat.size
    positions = np.flatnonzero(flat) if has_zero else None
    nonzero = flat[positions] if has_zero else flat  # no float64 copy: k-means works on distinct values
    candidates = []
    for sparse in ((True, False) if has_zero else (False,)):
        if shared is not None:
            centroids = shared
        else:
            budget = max(k - 1, 1) if has_zero and not sparse else k
            centroids = _codes(nonzero, budget, config)
        codebook = centroids.astype(array.dtype)
        if sparse:
            kept = positions
            indices = _code_of(nonzero, centroids, codebook.size)
        else:
            kept = None
            # Zero is code 0 when the tensor has zeros; the others shift up by one.
            codebook = np.concatenate([np.zeros(1, array.dtype), codebook]) if has_zero else codebook
            if has_zero:
                indices = np.zeros(flat.size, np.uint8 if codebook.size <= 256 else np.uint16)  # 1-2 bytes a weight
                indices[positions] = _code_of(nonzero, centroids, codebook.size, shift=1)
            else:
                indices = _code_of(flat, centroids, codebook.size)
        if codebook.size == 0:  # an all-zero tensor: one code, 0.0
            codebook, indices = np.zeros(1, array.dtype), np.zeros(0 if sparse else flat.size, np.int64)
        n_codes = codebook.size
        dtype = np.uint8 if n_codes <= 256 else np.uint16
        candidates.append(CompressedTensor(
            name, array.shape, array.dtype.name, codebook=codebook, indices=indices.astype(dtype, copy=False),
            index_bits=index_bits(n_codes), positions=kept,
        ))
    return min(candidates, key=record_size)


def _nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return assign(values, centroids) if centroids.size else np.zeros(values.size, np.intp)


def _labels(record: CompressedTensor, array: np.ndarray) -> np.ndarray:
    """Each element's code in the tensor's shape; -1 where the weight is (and stays) exactly zero."""
    labels = np.full(array.size, -1, np.int64)
    stored = np.arange(array.size) if record.positions is None else record.positions
    labels[stored] = record.indices
    labels[array.reshape(-1) == 0] = -1
    return labels.reshape(array.shape)


def _refit(cal: Calibrator, info: WeightInfo, array: np.ndarray, record: CompressedTensor,
           current: onnx.ModelProto, notes: list[str]) -> CompressedTensor:
    """The record with its codebook values fitted in closed form to the layer's original outputs
    (the assignments stay; zeros stay zero)."""
    from modelsqueeze.kernels.calibrated import refit_codebook

    data = cal.layer(info.key, current)
    view = data.view
    w = view.to_matrix(array).astype(np.float64)
    labels = view.to_matrix(_labels(record, array))
    codebook = refit_codebook(w, labels, record.codebook.size, data.H, cal.damp, C=data.C,
                              initial=record.codebook.astype(np.float64))
    fitted = dataclasses.replace(record, codebook=codebook.astype(record.codebook.dtype))
    notes.append(cal.note(info.key, data, w, view.to_matrix(record.decode()).astype(np.float64),
                          view.to_matrix(fitted.decode()).astype(np.float64)))
    return fitted


def cluster(model: onnx.ModelProto, records: dict[str, CompressedTensor], config: ClusterConfig) -> PassResult:
    """Apply `config` to a copy of the logical `model`; pruned zeros stay zero."""
    notes: list[str] = []
    out, selected = config.selection.start(model, notes)
    selected = finite_only(selected, notes)
    notes += config.rule.unused_notes(selected, "--bits")
    chosen = []  # (info, k); each tensor's values are read when it is clustered, not all at once
    for info in selected:
        value, _ = config.rule.lookup(info)
        if value is not None:
            chosen.append((info, config.n_clusters(value)))
    shared = None
    if config.scope == "shared" and chosen:
        values = np.concatenate([a[a != 0].astype(np.float64) for a in (info.array() for info, _ in chosen)])
        shared = _codes(values, chosen[0][1], config)
    new_records = dict(records)
    changed = []
    cal = Calibrator.create(config, model, [info for info, _ in chosen], notes)
    if cal is not None and config.scope == "shared":
        notes.append("--scope shared: the shared codebook is not re-fitted (calibration fits per-layer codebooks)")
        cal = None
    # k-means of independent tensors in parallel (--jobs); fits that read the model as it is being
    # rewritten (--sequential) and all graph edits stay in order.
    fitted_notes: dict[str, list[str]] = {}

    def work(item) -> CompressedTensor:
        info, k = item
        array = info.array()
        record = encode(info.key, array, k, config, shared)
        if cal is not None and not cal.sequential and cal.covers(info.key):
            fitted_notes[info.key] = []
            record = _refit(cal, info, array, record, out, fitted_notes[info.key])
        return record

    parallel_ok = cal is None or not cal.sequential
    done = dict(zip((info.key for info, _ in chosen), parallel_map(work, chosen))) if parallel_ok else {}
    # --sequential rewrites the graph between tensors: every value is read before the first edit
    values = {} if parallel_ok else {info.key: info.array() for info, _ in chosen}
    for info, k in (chosen if parallel_ok else track(chosen)):
        if parallel_ok:
            record = done.pop(info.key)
            notes.extend(fitted_notes.get(info.key, []))
        else:
            array = values.pop(info.key)
            record = encode(info.key, array, k, config, shared)
            if cal.covers(info.key):
                record = _refit(cal, info, array, record, out, notes)
        record = share_arrays(record, records.get(info.key))  # e.g. a pruned tensor's positions, held once
        new_records[info.key] = record
        put_record(out, info.key, record)
        changed.append(info.key)
        if record.codebook.size < k and info.n_params >= k:
            notes.append(f"{info.key}: {record.codebook.size} codes used of {k} (fewer distinct values)")
    return PassResult(model=out, records=new_records, changed=changed, notes=notes)
