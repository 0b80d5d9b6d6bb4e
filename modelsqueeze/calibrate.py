"""Calibration data for data-aware compression: a canonical matrix view of each MatMul / Gemm / Conv
layer (y = x @ W per input row x), the rows x it sees (im2col for Conv), and the input Gram matrix
H = XᵀX accumulated over onnxruntime batches with bounded memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import WeightInfo, node_name
from modelsqueeze.validate import BATCH_SIZE, Runner, Samples, load_npz, non_finite_count, split_data

# Largest block of rows (rows x K elements) materialised at once when accumulating; im2col of a
# big Conv batch would otherwise be many times the activation itself.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LayerView:
    """One weight layer as a matrix product: for every input row x (length K) the layer computes
    alpha * x @ W with W = to_matrix(weight) of shape (K, N) (alpha is 1 except for a Gemm's alpha).
    Conv rows are the (c, i, j)-ordered patches of the padded input, one per output position."""

    key: str  # the weight's WeightInfo.key
    op: str  # "MatMul", "Gemm" or "Conv"
    node_name: str
    activation: str  # the tensor the weight multiplies: MatMul's input 0, Gemm's A, Conv's X
    weight_shape: tuple[int, ...]
    trans_a: bool = False  # Gemm only
    trans_b: bool = False  # Gemm only
    alpha: float = 1.0  # Gemm only
    kernel_shape: tuple[int, ...] = ()  # Conv only: spatial kernel, then per spatial axis:
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...] = ()

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(K, N): input features per row, outputs per row."""
        shape = self.weight_shape
        if self.op == "Conv":
            return int(np.prod(shape[1:], dtype=np.int64)), shape[0]
        if self.op == "Gemm" and self.trans_b:
            return shape[1], shape[0]
        return shape[0], shape[1]

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        """The stored weight as a fresh C-ordered (K, N) matrix."""
        array = np.asarray(array)
        if array.shape != self.weight_shape:
            raise ValueError(f"{self.key}: weight of shape {array.shape}, the layer has {self.weight_shape}")
        if self.op == "Conv":
            matrix = array.reshape(array.shape[0], -1).T
        elif self.op == "Gemm" and self.trans_b:
            matrix = array.T
        else:
            matrix = array
        return np.array(matrix, order="C", copy=True)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """The exact inverse of to_matrix: a (K, N) matrix back in the stored layout (a fresh array)."""
        matrix = np.asarray(matrix)
        if matrix.shape != self.matrix_shape:
            raise ValueError(f"{self.key}: matrix of shape {matrix.shape}, the layer's is {self.matrix_shape}")
        if self.op == "Conv":
            array = matrix.T.reshape(self.weight_shape)
        elif self.op == "Gemm" and self.trans_b:
            array = matrix.T
        else:
            array = matrix
        return np.array(array, order="C", copy=True)

    def _row_signature(self) -> tuple:
        """Views with equal signatures see identical rows (e.g. q/k/v projections of one input)."""
        if self.op == "Conv":
            return (self.activation, "Conv", self.weight_shape[1:], self.strides, self.pads, self.dilations)
        return (self.activation, "T" if self.trans_a else "", self.matrix_shape[0])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def layer_view(model: onnx.ModelProto, info: WeightInfo) -> LayerView | str:
    """The layer view of a weight, or why the weight cannot be calibrated (a short reason; the
    caller says what happens instead)."""
    if info.graph:
        return "lives in a subgraph"
    if len(info.consumers) != 1:
        return f"is read by {len(info.consumers)} nodes (shared weight)"
    consumer = info.consumers[0]
    if consumer.via:
        return f"reaches its {consumer.op} through {consumer.via}"
    if consumer.op not in ("MatMul", "Gemm", "Conv"):
        return f"is a {consumer.op} input; calibration covers MatMul, Gemm and Conv weights only"
    if consumer.input_index == 0 and consumer.op in ("MatMul", "Gemm"):
        return f"is the left operand of its {consumer.op} (W @ x)"
    if consumer.input_index != 1:
        return f"is input {consumer.input_index} of its {consumer.op}, not the weight input"
    if info.dtype != "float32":
        return f"is {info.dtype}, not float32"
    found = [(i, n) for i, n in enumerate(model.graph.node) if node_name(n, i) == consumer.node]
    if len(found) != 1:
        return f"its consumer {consumer.node!r} is not a single node of the main graph"
    node = found[0][1]
    activation = node.input[0]
    constants = {t.name for t in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    if activation in constants:
        return f"multiplies a constant ({activation!r}), no data flows through it"
    shape, attrs = tuple(info.shape), _attrs(node)
    common = dict(key=info.key, op=node.op_type, node_name=consumer.node, activation=activation, weight_shape=shape)
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return f"is a {len(shape)}-D MatMul weight; only 2-D weights are calibrated"
        return LayerView(**common)
    if node.op_type == "Gemm":
        return LayerView(**common, trans_a=bool(attrs.get("transA", 0)), trans_b=bool(attrs.get("transB", 0)),
                         alpha=float(attrs.get("alpha", 1.0)))
    if attrs.get("group", 1) != 1:
        return f"feeds a grouped Conv (group={attrs['group']})"
    if len(shape) < 3:
        return f"is a {len(shape)}-D Conv weight"
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        return f"feeds a Conv with auto_pad={auto_pad} (padding depends on the input size)"
    spatial = len(shape) - 2
    kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))
    if kernel != shape[2:]:
        return f"feeds a Conv whose kernel_shape {list(kernel)} differs from its weight {list(shape)}"
    pads = (0,) * (2 * spatial) if auto_pad == "VALID" else tuple(int(p) for p in attrs.get("pads", (0,) * (2 * spatial)))
    return LayerView(**common, kernel_shape=kernel,
                     strides=tuple(int(s) for s in attrs.get("strides", (1,) * spatial)),
                     pads=pads, dilations=tuple(int(d) for d in attrs.get("dilations", (1,) * spatial)))


# ----------------------------------------------------------------------------------------------
# Input rows


def rows(view: LayerView, activation: np.ndarray) -> np.ndarray:
    """The (R, K) input rows of the layer for one activation array: MatMul's [..., K] as rows, Gemm's
    A (or Aᵀ), Conv's im2col patches (every output position of every sample, columns (c, i, j))."""
    activation = np.asarray(activation)
    k = view.matrix_shape[0]
    if view.op == "Conv":
        return _im2col(view, activation)
    if view.op == "Gemm":
        if activation.ndim != 2:
            raise ModelSqueezeError(f"{view.key}: Gemm input {view.activation!r} has shape {activation.shape}, expected 2-D")
        activation = activation.T if view.trans_a else activation
    if activation.ndim < 1 or activation.shape[-1] != k:
        raise ModelSqueezeError(f"{view.key}: input {view.activation!r} has shape {activation.shape}, "
                                f"expected {k} features on its last axis")
    return activation.reshape(-1, k)


def _im2col(view: LayerView, x: np.ndarray) -> np.ndarray:
    spatial = len(view.kernel_shape)
    channels = view.weight_shape[1]
    if x.ndim != 2 + spatial or x.shape[1] != channels:
        raise ModelSqueezeError(f"{view.key}: Conv input {view.activation!r} has shape {x.shape}, "
                                f"expected [N, {channels}, {spatial} spatial axes]")
    begins, ends = view.pads[:spatial], view.pads[spatial:]
    if any(view.pads):
        x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begins, ends)))
    spans = tuple(d * (k - 1) + 1 for k, d in zip(view.kernel_shape, view.dilations))
    axes = tuple(range(2, 2 + spatial))
    if any(x.shape[a] < s for a, s in zip(axes, spans)):
        raise ModelSqueezeError(f"{view.key}: Conv input {view.activation!r} (padded {x.shape[2:]}) is smaller "
                                f"than the dilated kernel {spans}")
    windows = np.lib.stride_tricks.sliding_window_view(x, spans, axis=axes)  # N, C, P..., span...
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in view.strides)
                      + tuple(slice(None, None, d) for d in view.dilations)]  # N, C, O..., k...
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))  # N, O..., C, k...
    return windows.transpose(order).reshape(-1, view.matrix_shape[0])


def _row_chunks(view: LayerView, activation: np.ndarray) -> Iterator[np.ndarray]:
    """rows(view, activation) in blocks of at most ~CHUNK_ELEMENTS elements, in row order."""
    k = view.matrix_shape[0]
    if view.op == "Conv":
        spatial = len(view.kernel_shape)
        if activation.ndim != 2 + spatial:
            yield rows(view, activation)  # raises: not an N, C, spatial... array
            return
        n = activation.shape[0]
        padded = np.add(activation.shape[2:], np.add(view.pads[:spatial], view.pads[spatial:]))
        spans = np.multiply(view.dilations, np.subtract(view.kernel_shape, 1)) + 1
        per_sample = int(np.prod(np.maximum((padded - spans) // view.strides + 1, 1)))
        step = max(1, CHUNK_ELEMENTS // (per_sample * k))
        for start in range(0, n, step):
            yield rows(view, activation[start:start + step])
        return
    matrix = rows(view, activation)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, matrix.shape[0], step):
        yield matrix[start:start + step]


# ----------------------------------------------------------------------------------------------
# Capture


@dataclass(eq=False)
class LayerStats:
    """What calibration saw at one layer's input. H = Σ x xᵀ over all `rows` input rows (float64,
    K x K); C = Σ x_current x_referenceᵀ (capture_pair only); `sample`: at most max_rows of the
    rows, drawn uniformly without replacement (fixed seed), in the order they were seen."""

    H: np.ndarray
    rows: int
    C: np.ndarray | None = None
    sample: np.ndarray | None = None


class _Reservoir:
    """A uniform sample of at most `size` rows from a stream: each row gets a random key and the
    rows with the smallest keys are kept. Keys are drawn in row order from one generator, so the
    sample does not depend on how the stream is cut into batches."""

    def __init__(self, size: int, k: int, seed: Sequence[int]):
        self.size = size
        self.rng = np.random.default_rng(list(seed))
        self.data = np.empty((size, k), np.float32)
        self.keys = np.empty(size, np.float64)
        self.index = np.empty(size, np.int64)
        self.filled = 0
        self.seen = 0

    def add(self, block: np.ndarray) -> None:
        n = block.shape[0]
        keys = self.rng.random(n)
        index = np.arange(self.seen, self.seen + n)
        self.seen += n
        take = min(self.size - self.filled, n)
        if take:
            at = slice(self.filled, self.filled + take)
            self.data[at], self.keys[at], self.index[at] = block[:take], keys[:take], index[:take]
            self.filled += take
            block, keys, index = block[take:], keys[take:], index[take:]
        if not len(keys):
            return
        better = keys < self.keys.max()
        if not better.any():
            return
        keys, index = keys[better], index[better]
        kept = np.argpartition(np.concatenate([self.keys, keys]), self.size - 1)[:self.size]
        new = kept[kept >= self.size] - self.size
        stays = np.zeros(self.size, bool)
        stays[kept[kept < self.size]] = True
        free = np.flatnonzero(~stays)
        self.data[free] = block[np.flatnonzero(better)[new]]
        self.keys[free], self.index[free] = keys[new], index[new]

    def result(self) -> np.ndarray:
        order = np.argsort(self.index[:self.filled], kind="stable")
        return self.data[:self.filled][order]


class _Accumulator:
    """H (and C, paired) for one row signature; `add` takes one batch's activations."""

    def __init__(self, view: LayerView, paired: bool, max_rows: int, seed: Sequence[int]):
        k = view.matrix_shape[0]
        self.view = view
        self.H = np.zeros((k, k), np.float64)
        self.C = np.zeros((k, k), np.float64) if paired else None
        self.count = 0
        self.reservoir = _Reservoir(max_rows, k, seed) if max_rows > 0 else None

    def add(self, current: np.ndarray, reference: np.ndarray | None = None) -> None:
        if reference is not None and reference.shape != current.shape:
            raise ModelSqueezeError(f"{self.view.key}: input {self.view.activation!r} has shape {current.shape} in "
                                    f"the current model but {reference.shape} in the reference")
        chunks = _row_chunks(self.view, current)
        ref_chunks = _row_chunks(self.view, reference) if reference is not None else None
        for block in chunks:
            wide = block.astype(np.float64)
            # activations that overflowed float32 make H non-finite: the layer is then left
            # data-free with a note (Calibrator), not warned about
            with np.errstate(over="ignore", invalid="ignore"):
                self.H += wide.T @ wide
                if ref_chunks is not None:
                    self.C += wide.T @ next(ref_chunks).astype(np.float64)
            self.count += block.shape[0]
            if self.reservoir is not None:
                self.reservoir.add(block)

    def stats(self, copy: bool) -> LayerStats:
        sample = self.reservoir.result() if self.reservoir is not None else None
        own = (lambda a: None if a is None else a.copy()) if copy else (lambda a: a)
        return LayerStats(H=own(self.H), rows=self.count, C=own(self.C), sample=own(sample))


def _activation_model(model: onnx.ModelProto, names: list[str], label: str) -> onnx.ModelProto:
    """A copy of `model` whose outputs are exactly `names` (intermediate float tensors)."""
    produced = {out for node in model.graph.node for out in node.output if out}
    missing = [name for name in names if name not in produced]
    if missing:
        raise ModelSqueezeError(f"{label}: no node of the main graph produces {missing[0]!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    # Element type only: onnxruntime accepts outputs without a shape.
    out.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return out


class _Source:
    """Runs one model over the batches and hands back each batch's activations by name."""

    def __init__(self, model: onnx.ModelProto, activations: list[str], label: str):
        graph_inputs = {i.name for i in model.graph.input}
        self.from_feeds = [a for a in activations if a in graph_inputs]
        computed = [a for a in activations if a not in graph_inputs]
        # With nothing to compute the model still runs (on its own outputs) so bad data fails the same way.
        self.runner = Runner(_activation_model(model, computed, label) if computed else model, label)
        self.computed = computed

    def run(self, batch: Samples) -> dict[str, np.ndarray]:
        outputs = self.runner.run(batch)
        found = dict(zip(self.runner.output_names, outputs)) if self.computed else {}
        for name in self.from_feeds:
            found[name] = np.asarray(batch.feeds[name], np.float32)
        return found


def _step(runner: Runner, batch_size: int, samples: Samples) -> int:
    """Samples per run: batch_size where the model's sample axes are dynamic (or fixed at 1, which
    Runner feeds one by one); all at once where a model fixes one at some other size."""
    if batch_size < 1:
        raise ModelSqueezeError(f"batch size {batch_size}: need at least 1")
    return batch_size if runner._step(samples) in (1, BATCH_SIZE) else samples.n


def _feeds(arrays: Mapping[str, np.ndarray], runner: Runner, source: str) -> Samples:
    samples = split_data(arrays, runner, source, labels=False)
    if samples.n == 0:
        raise ModelSqueezeError(f"{source}: no samples")
    return samples


def _capture(models: list[onnx.ModelProto], arrays: Mapping[str, np.ndarray], views: Iterable[LayerView],
             max_rows: int, seed: int, batch_size: int, progress: Callable[[int], None] | None,
             source: str) -> dict[str, LayerStats]:
    views = list(views)
    keys = [view.key for view in views]
    if len(set(keys)) != len(keys):
        raise ModelSqueezeError(f"capture: layer {next(k for k in keys if keys.count(k) > 1)!r} given twice")
    if not views:
        return {}
    # One accumulator per distinct row signature; the paired run samples only the current rows.
    groups: dict[tuple, _Accumulator] = {}
    for view in views:
        signature = view._row_signature()
        if signature not in groups:
            groups[signature] = _Accumulator(view, paired=len(models) == 2, max_rows=max_rows,
                                             seed=(seed, len(groups)))
    activations = list(dict.fromkeys(view.activation for view in views))
    labels = ["calibration (current model)", "calibration (reference model)"] if len(models) == 2 else ["calibration"]
    sources = [_Source(model, activations, label) for model, label in zip(models, labels)]
    samples = _feeds(arrays, sources[0].runner, source)
    n = samples.n
    step = _step(sources[0].runner, batch_size, samples)
    for start in range(0, n, step):
        batch = samples.part(start, start + step)
        found = [src.run(batch) for src in sources]
        for signature, acc in groups.items():
            name = signature[0]
            acc.add(found[0][name], found[1][name] if len(found) == 2 else None)
        del found
        if progress:
            progress(min(step, n - start))
    result = {}
    handed: set[tuple] = set()
    for view in views:
        signature = view._row_signature()
        # Layers sharing rows get their own copies: a pass may damp or factor H in place.
        result[view.key] = groups[signature].stats(copy=signature in handed)
        handed.add(signature)
    return result


def capture(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], views: Iterable[LayerView],
            max_rows: int = 20000, seed: int = 0, batch_size: int = 256,
            progress: Callable[[int], None] | None = None, source: str = "calibration data") -> dict[str, LayerStats]:
    """Run `model` over the calibration `arrays` (inputs by name or `x`; `y` ignored) in batches of
    `batch_size` samples and return, per view key, the exact input Gram matrix H over every row and a
    uniform sample of at most `max_rows` rows (none when max_rows is 0). Only one batch of
    activations is held at a time. `progress` is called with the samples done per batch."""
    return _capture([model], arrays, views, max_rows, seed, batch_size, progress, source)


def capture_pair(reference_model: onnx.ModelProto, current_model: onnx.ModelProto,
                 arrays: Mapping[str, np.ndarray], views: Iterable[LayerView], batch_size: int = 256,
                 progress: Callable[[int], None] | None = None, source: str = "calibration data") -> dict[str, LayerStats]:
    """Run both models on the same batches; per view, H = XqᵀXq over the current model's input rows
    Xq and C = XqᵀX against the reference model's rows X (same activation names in both), so that
    the re-fit min ||Xq W' - X W||² is W' = H⁻¹ C W. No sample is kept."""
    return _capture([current_model, reference_model], arrays, views, 0, 0, batch_size, progress, source)


def load_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """The input arrays of a calibration .npz (labels `y`, if any, dropped)."""
    arrays = load_npz(path)
    arrays.pop("y", None)  # labels are not needed (an array the model does not read is ignored with a note)
    if not arrays:
        raise ModelSqueezeError(f"{path}: no input arrays (calibration data needs the model's inputs, by name or `x`)")
    for name, array in arrays.items():
        if bad := non_finite_count(array):
            raise ModelSqueezeError(f"{path}: array {name!r} has {bad:,} NaN or infinite values; calibration needs finite inputs")
    return arrays
