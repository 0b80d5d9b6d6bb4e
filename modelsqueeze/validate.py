"""onnxruntime sessions: top-1 accuracy on labelled data, fidelity against a reference model, and
inputs generated from a model's signature."""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import open_input
from modelsqueeze import model as _model
from modelsqueeze.model import model_to_bytes, save_model, tensor_bytes

BATCH_SIZE = 256

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: type
    shape: tuple[int | str | None, ...]  # ints are fixed, str/None are dynamic


class Runner:
    """One onnxruntime session over a model, run in batches along the leading dimension."""

    def __init__(self, model: onnx.ModelProto, label: str = "model"):
        self.label = label
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 2
        source: bytes | str
        if tensor_bytes(model) < _model.PROTOBUF_LIMIT_BYTES:
            source = model_to_bytes(model)
        else:  # too big for one protobuf: hand onnxruntime a file with external data
            self._tmp = tempfile.TemporaryDirectory(prefix="modelsqueeze-")
            source = str(Path(self._tmp.name) / "model.onnx")
            save_model(model, Path(source))
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelSqueezeError(f"{label}: onnxruntime cannot load the model: {_first_line(exc)}") from None
        self.inputs = []
        for arg in self.session.get_inputs():
            if arg.type not in _ORT_TO_NUMPY:
                raise ModelSqueezeError(f"{label}: input {arg.name!r} has type {arg.type}, which eval cannot feed")
            self.inputs.append(InputSpec(arg.name, _ORT_TO_NUMPY[arg.type], tuple(arg.shape)))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def batchable(self) -> bool:
        return all(spec.shape and not isinstance(spec.shape[0], int) for spec in self.inputs)

    def run(self, feeds: Mapping[str, np.ndarray], progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """All outputs for all samples. Samples are split along axis 0 into batches when the model's
        leading dimension is dynamic, and fed one at a time when it is fixed at 1."""
        feeds = self._conform(feeds)
        n = _n_samples(feeds)
        if self.batchable():
            step = BATCH_SIZE
        elif all(spec.shape and spec.shape[0] == 1 for spec in self.inputs):
            step = 1
        else:
            step = n
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, step):
            batch = {k: v[start:start + step] for k, v in feeds.items()}
            try:
                chunks.append(self.session.run(self.output_names, batch))
            except Exception as exc:
                raise ModelSqueezeError(f"{self.label}: onnxruntime failed to run: {_first_line(exc)}") from None
            if progress:
                progress(min(step, n - start))
        if not chunks:
            raise ModelSqueezeError(f"{self.label}: no samples to run")
        if len(chunks) == 1:
            return chunks[0]
        batch_major = all(c[i].ndim and c[i].shape[0] == min(step, n - j * step)
                          for j, c in enumerate(chunks) for i in range(len(self.output_names)))
        if not batch_major:  # an output without a leading sample axis: run everything at once
            try:
                return self.session.run(self.output_names, feeds)
            except Exception as exc:
                raise ModelSqueezeError(f"{self.label}: onnxruntime failed to run: {_first_line(exc)}") from None
        return [np.concatenate([c[i] for c in chunks]) for i in range(len(self.output_names))]

    def _conform(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise ModelSqueezeError(f"{self.label}: no data for input {spec.name!r}")
            array = np.asarray(feeds[spec.name])
            if array.dtype != spec.dtype:
                if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                    raise ModelSqueezeError(
                        f"{self.label}: input {spec.name!r} wants {np.dtype(spec.dtype).name}, data is {array.dtype.name}"
                    )
                array = array.astype(spec.dtype)
            if array.ndim != len(spec.shape):
                raise ModelSqueezeError(
                    f"{self.label}: input {spec.name!r} has {len(spec.shape)} dimensions {_shape_str(spec.shape)}, "
                    f"data has {array.ndim} {tuple(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                fixed_batch = axis == 0 and want == 1
                if isinstance(want, int) and want != got and not fixed_batch:
                    raise ModelSqueezeError(
                        f"{self.label}: input {spec.name!r} wants shape {_shape_str(spec.shape)}, data has {tuple(array.shape)}"
                    )
            out[spec.name] = array
        _n_samples(out)
        return out


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _n_samples(feeds: Mapping[str, np.ndarray]) -> int:
    sizes = {v.shape[0] if v.ndim else 1 for v in feeds.values()}
    if len(sizes) != 1:
        raise ModelSqueezeError(f"inputs have different numbers of samples: {sorted(sizes)}")
    return sizes.pop()


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory, expected a .npz file")
    handle = open_input(path, "a .npz file")  # a named pipe or device is refused, never waited on
    try:
        loaded = np.load(handle, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ModelSqueezeError(f"{path}: a single .npy array; expected a .npz archive of named arrays")
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ModelSqueezeError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, AttributeError, TypeError, KeyError) as exc:
        raise ModelSqueezeError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    finally:
        handle.close()
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise ModelSqueezeError(f"{path}: member {key!r} is not a numpy array")
        if array.ndim == 0:
            raise ModelSqueezeError(f"{path}: array {key!r} is a scalar; expected one row per sample")
    return arrays


def split_data(data: Mapping[str, np.ndarray], runner: Runner, source: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The model's feeds (by input name, or `x` for a single-input model) and the `y` labels."""
    feeds = {}
    for spec in runner.inputs:
        if spec.name in data:
            feeds[spec.name] = data[spec.name]
        elif len(runner.inputs) == 1 and "x" in data:
            feeds[spec.name] = data["x"]
        else:
            raise ModelSqueezeError(
                f"{source}: no array for input {spec.name!r} (arrays: {', '.join(sorted(data)) or 'none'})"
            )
    labels = data.get("y")
    if labels is not None and not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        whole = np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))
        if not whole:
            raise ModelSqueezeError(f"{source}: labels `y` must be class indices (whole numbers), not {labels.dtype} values")
        labels = labels.astype(np.int64)
    return feeds, labels


def top1_accuracy(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], label: str = "model",
                  source: str = "data", progress: Callable[[int], None] | None = None) -> float:
    """Top-1 accuracy of `model` on labelled arrays (inputs by name or `x`, labels `y`)."""
    runner = Runner(model, label)
    feeds, labels = split_data(arrays, runner, source)
    if labels is None:
        raise ModelSqueezeError(f"{source}: no `y` labels, so no accuracy")
    return accuracy(runner.run(feeds, progress)[0], labels, source)


def predictions(output: np.ndarray, label_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Top-1 class per sample: argmax over the class axis of scores (the last axis, after dropping
    singleton axes unless the labels keep them), or the output itself when it holds labels."""
    if not np.issubdtype(output.dtype, np.floating):
        return output.reshape(output.shape[0], -1)[:, 0] if output.ndim > 1 else output
    if output.ndim < 2:
        return output
    if label_shape is not None and tuple(label_shape) == output.shape[:-1]:
        return output.argmax(axis=-1)  # per-position labels, e.g. [batch, seq]
    squeezed = output.reshape(output.shape[0], -1) if all(d == 1 for d in output.shape[1:-1]) else output
    return squeezed.argmax(axis=-1)


def accuracy(output: np.ndarray, labels: np.ndarray, source: str = "data") -> float:
    labels = np.asarray(labels)
    pred = predictions(output, labels.shape)
    if pred.shape != labels.shape:
        labels = labels.reshape(pred.shape) if labels.size == pred.size else labels
    if pred.shape != labels.shape:
        raise ModelSqueezeError(
            f"{source}: labels of shape {labels.shape} do not match predictions of shape {pred.shape}"
        )
    return float(np.mean(pred == labels)) if labels.size else float("nan")


def fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """How closely `output` follows `reference` (same shape): top-1 agreement, absolute errors,
    cosine similarity and signal-to-noise ratio (None when the outputs are identical)."""
    if output.shape != reference.shape:
        raise ModelSqueezeError(f"outputs differ in shape: {output.shape} vs reference {reference.shape}")
    out = output.astype(np.float64).reshape(output.shape[0] if output.ndim else 1, -1)
    ref = reference.astype(np.float64).reshape(out.shape)
    diff = out - ref
    noise = float(np.sum(diff * diff))
    signal = float(np.sum(ref * ref))
    norms = float(np.linalg.norm(out) * np.linalg.norm(ref))
    return {
        "top1_agreement": float(np.mean(predictions(output) == predictions(reference))) if output.ndim else 1.0,
        "max_abs_error": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs_error": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "cosine_similarity": float(np.sum(out * ref) / norms) if norms > 0 else (1.0 if noise == 0 else 0.0),
        # None where the ratio is undefined: identical outputs (no noise) or an all-zero reference.
        "snr_db": float(10 * np.log10(signal / noise)) if noise > 0 and signal > 0 else None,
    }


def parse_dims(items: list[str]) -> dict[str, int]:
    """--dim NAME=VALUE items: NAME is a symbolic dimension, or INPUT:AXIS for an unnamed one."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ModelSqueezeError(f"--dim {item!r}: expected NAME=VALUE (or INPUT:AXIS=VALUE) with a positive integer")
        dims[name.strip()] = int(value)
    return dims


def random_inputs(runner: Runner, model: onnx.ModelProto, n: int, dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """`n` samples shaped by the input signature: floats ~ N(0, 1); integers that index a Gather
    table uniform over its rows, other integers in {0, 1}. The leading dimension is the sample
    count (fixed 1 is fed sample by sample); every other dynamic dimension needs a --dim."""
    if n < 1:
        raise ModelSqueezeError(f"--random {n}: need at least one sample")
    rng = np.random.default_rng(seed)
    table_rows = _gather_table_rows(model)
    used = set()
    feeds = {}
    for spec in runner.inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            keys = [k for k in (dim if isinstance(dim, str) and dim else None, f"{spec.name}:{axis}") if k in dims]
            if axis == 0 and (not isinstance(dim, int) or dim == 1):
                if keys:
                    raise ModelSqueezeError(
                        f"--dim {keys[0]}: the leading dimension of {spec.name!r} is the sample count, set by --random"
                    )
                shape.append(n)
            elif isinstance(dim, int):
                shape.append(dim)
            elif keys:
                used.update(keys)
                shape.append(dims[keys[0]])
            else:
                hint = f"{dim}=N" if isinstance(dim, str) and dim else f"{spec.name}:{axis}=N"
                raise ModelSqueezeError(f"input {spec.name!r} axis {axis} is dynamic: give its size with --dim {hint}")
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype is np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            high = table_rows.get(spec.name, 2)
            feeds[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
    unknown = sorted(set(dims) - used)
    if unknown:
        raise ModelSqueezeError(f"--dim {unknown[0]}: no dynamic input dimension has that name")
    return feeds


def _gather_table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """For graph inputs that feed Gather indices directly: the number of rows they index."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    rows = {}
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in inputs:
            dims = shapes.get(node.input[0])
            if dims:
                rows[node.input[1]] = min(rows.get(node.input[1], dims[0]), dims[0])
    return rows
