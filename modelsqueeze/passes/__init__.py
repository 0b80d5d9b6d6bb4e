"""What every compression pass shares: the tensor selection, per-layer rules, and the result type.

A pass takes a model (already holding every tensor's current dense value) and the records carried
by its sidecar, and returns the rewritten model with the records of its output; it never writes.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import onnx

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import COMPRESSIBLE_ROLES, WeightInfo, find_weights, fixed_basis, iter_graphs, select_weights
from modelsqueeze.tensor import CompressedTensor


T = TypeVar("T")
R = TypeVar("R")
# Who hears about each tensor a pass finishes: (done, total). Set by the CLI for its progress view.
_watcher: ContextVar[Callable[[int, int], None] | None] = ContextVar("modelsqueeze_progress", default=None)


@contextmanager
def watching(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Passes run inside this call `callback(done, total)` after each tensor of their main loop."""
    token = _watcher.set(callback)
    try:
        yield
    finally:
        _watcher.reset(token)


_jobs: ContextVar[int] = ContextVar("modelsqueeze_jobs", default=1)


@contextmanager
def parallel(jobs: int) -> Iterator[None]:
    """Passes run inside this call spread independent per-tensor work over `jobs` threads."""
    if jobs < 1:
        raise ModelSqueezeError(f"--jobs {jobs}: must be 1 or more")
    token = _jobs.set(jobs)
    try:
        yield
    finally:
        _jobs.reset(token)


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], computed on up to `parallel(jobs)` threads (numpy and the
    codecs release the GIL in their heavy loops); results in input order, so the output does not
    depend on the number of jobs. `fn` must not touch shared state (the graph): passes mutate the
    model afterwards, in order. Progress is reported as items finish."""
    jobs = min(_jobs.get(), len(items))
    if jobs <= 1:
        return [fn(item) for item in track(items)]
    from concurrent.futures import ThreadPoolExecutor, as_completed

    watcher = _watcher.get()
    results: list = [None] * len(items)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if watcher is not None:
                watcher(done, len(items))
    return results


def track(items: Sequence[T]) -> Iterator[T]:
    """Iterate a pass's per-tensor work, telling the current watcher (if any) as each is done."""
    watcher = _watcher.get()
    for done, item in enumerate(items, 1):
        yield item
        if watcher is not None:
            watcher(done, len(items))


# By default (no --min-params) a tensor is left alone when it is tiny both absolutely and against
# the model: it weighs next to nothing, and a final classifier, an SE gate or a depthwise filter of
# that size is where small errors show (issue 16, class 6).
AUTO_MIN_PARAMS = 1024
AUTO_MIN_SHARE = 0.001


@dataclass(frozen=True)
class Selection:
    """The shared --layers / --exclude / --min-params filter. `min_params` None is the default
    rule: leave alone tensors of fewer than AUTO_MIN_PARAMS parameters that are also under
    AUTO_MIN_SHARE of the model's float parameters; a number (0 included) is a plain threshold."""

    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int | None = None

    def __post_init__(self) -> None:
        if self.min_params is not None and self.min_params < 0:
            raise ModelSqueezeError(f"--min-params {self.min_params}: must be 0 or more")

    def pick(self, model: onnx.ModelProto, notes: list[str] | None = None) -> list[WeightInfo]:
        every = find_weights(model)
        chosen = select_weights(every, self.layers, self.exclude, self.min_params or 0)
        if not self.layers:  # a fixed basis (an STFT fed to a Conv) is compressed only when named
            bases = {info.key: why for info in chosen if (why := fixed_basis(info))}
            if bases and notes is not None:
                notes.extend(f"{key}: {why}; left alone (name it in --layers to compress it)" for key, why in bases.items())
            chosen = [info for info in chosen if info.key not in bases]
        if self.min_params is not None:
            return chosen
        total = sum(info.n_params for info in every)
        tiny = [info for info in chosen if info.n_params < AUTO_MIN_PARAMS and info.n_params < AUTO_MIN_SHARE * total]
        if tiny and notes is not None:
            names = ", ".join(f"{info.key} ({info.n_params})" for info in tiny[:4]) + (", ..." if len(tiny) > 4 else "")
            notes.append(f"{len(tiny)} tensor(s) of fewer than {AUTO_MIN_PARAMS:,} parameters and under "
                         f"{AUTO_MIN_SHARE:.1%} of the model left alone by default: {names}; --min-params 0 "
                         f"compresses them")
        return [info for info in chosen if info not in tiny] if tiny else chosen

    def start(self, model: onnx.ModelProto, notes: list[str] | None = None) -> tuple[onnx.ModelProto, list[WeightInfo]]:
        """Every pass's first step: a copy of the model to change, and the tensors selected in it
        (none is a usage error)."""
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        selected = self.pick(copy, notes)
        if not selected:
            raise nothing_selected(copy)
        return copy, selected


def nothing_selected(model: onnx.ModelProto) -> ModelSqueezeError:
    """The error for an empty selection, saying why when the model has no float weights at all
    (already quantized: its weights are integers read by DequantizeLinear)."""
    if not [w for w in find_weights(model) if w.role in COMPRESSIBLE_ROLES]:
        dequantized = sum(n.op_type in ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearConv",
                                        "QLinearMatMul", "ConvInteger", "MatMulNBits")
                          for _, graph in iter_graphs(model.graph) for n in graph.node)
        if dequantized:
            return ModelSqueezeError(f"the model has no float weights to compress: it is already quantized "
                                     f"({dequantized} DequantizeLinear / integer-kernel nodes read integer weights)")
        return ModelSqueezeError("the model has no float weight tensors read by a layer (MatMul, Gemm, Conv, "
                                 "recurrent, Gather); nothing to compress")
    return ModelSqueezeError("no weight tensors match the selection (check --layers/--exclude/--min-params)")


def finite_only(selected: list[WeightInfo], notes: list[str]) -> list[WeightInfo]:
    """The selected tensors without those holding NaN or infinite values: they are left exactly as
    they are, with a note (no codebook, grid or factorization can represent them)."""
    kept = []
    for info in selected:
        array = info.array()
        bad = array.size - int(np.count_nonzero(np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
        if bad:
            notes.append(f"{info.key}: {bad:,} NaN or infinite values; left as it is")
        else:
            kept.append(info)
    return kept


def tensor_names(info: WeightInfo) -> list[str]:
    """The names a glob may match: the tensor, its subgraph key, and its consumers' node names."""
    names = [info.name, info.key]
    for consumer in info.consumers:
        names += [consumer.node, consumer.node.rsplit("/", 1)[-1]]
    return names


def finite_number(value: str, where: str) -> float:
    """`value` as a finite float; otherwise a ModelSqueezeError starting with `where`."""
    try:
        number = float(value)
    except ValueError:
        raise ModelSqueezeError(f"{where}: {value!r} is not a number") from None
    if not np.isfinite(number):
        raise ModelSqueezeError(f"{where}: {value!r} is not a finite number")
    return number


@dataclass(frozen=True)
class LayerRule:
    """A value per tensor: a default and `glob=value` overrides, the first matching glob winning.
    Parsed from text such as `0.9` or `fc1*=0.95,conv*=0.6,0.8`."""

    default: float | None = None
    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str, option: str) -> "LayerRule":
        default, overrides = None, []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            glob, sep, value = item.rpartition("=")
            number = finite_number(value, f"{option} {text!r}")
            if sep:
                if not glob:
                    raise ModelSqueezeError(f"{option} {text!r}: missing layer name before '='")
                overrides.append((glob, number))
            elif default is not None:
                raise ModelSqueezeError(f"{option} {text!r}: more than one default value")
            else:
                default = number
        if default is None and not overrides:
            raise ModelSqueezeError(f"{option} {text!r}: no value given")
        return cls(default, tuple(overrides))

    def values(self) -> list[float]:
        return ([] if self.default is None else [self.default]) + [v for _, v in self.overrides]

    def lookup(self, info: WeightInfo) -> tuple[float | None, bool]:
        """(value, whether an override gave it) for this tensor; None means leave it alone."""
        names = tensor_names(info)
        for glob, value in self.overrides:
            if any(fnmatch.fnmatchcase(n, glob) for n in names):
                return value, True
        return self.default, False

    def unused_notes(self, infos: list[WeightInfo], option: str) -> list[str]:
        """A note for each `glob=value` that gives no tensor of `infos` its value: one matching
        none of them (a typo, or a tensor --layers/--exclude left out), or one whose every match
        an earlier glob claims. Without the note such a rule changes nothing in silence."""
        hits = [False] * len(self.overrides)
        wins = [False] * len(self.overrides)
        for info in infos:
            names = tensor_names(info)
            won = False
            for i, (glob, _) in enumerate(self.overrides):
                if any(fnmatch.fnmatchcase(n, glob) for n in names):
                    hits[i] = True
                    wins[i] = wins[i] or not won
                    won = True
        notes = []
        for (glob, value), hit, win in zip(self.overrides, hits, wins):
            if not win:
                why = ("every tensor it matches takes an earlier glob's value" if hit else
                       "it matches no selected tensor or consuming node (`report` lists the names)")
                notes.append(f"{option} '{glob}={value:g}': {why}; it changes nothing")
        return notes


@dataclass
class PassResult:
    """What a pass made: the model, every record of the output pair, and what changed."""

    model: onnx.ModelProto
    records: dict[str, CompressedTensor]
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sparse_record(name: str, array: np.ndarray, previous: CompressedTensor | None = None) -> CompressedTensor:
    """A record storing only the non-zeros of `array` (or every entry, when too few are zero for
    positions to pay: a 1-bit bitmap costs less than the zeros' values only beyond 1 in 32).
    When the tensor was weight-shared before (a codebook record of the same shape), the entries
    keep their codebook indices."""
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    if (flat.size - positions.size) * 32 <= flat.size:
        positions = np.arange(flat.size)
        sparse = False
    else:
        sparse = True
    if previous is not None and previous.codebook is not None and previous.shape == array.shape:
        dense_indices = np.zeros(flat.size, dtype=previous.indices.dtype)
        stored = np.arange(flat.size) if previous.positions is None else previous.positions
        dense_indices[stored] = previous.indices
        return CompressedTensor(
            name, array.shape, array.dtype.name, codebook=previous.codebook,
            indices=dense_indices[positions], index_bits=previous.index_bits,
            positions=positions if sparse else None,
        )
    return CompressedTensor(
        name, array.shape, array.dtype.name, values=flat[positions].copy(), positions=positions if sparse else None
    )
