"""onnxruntime sessions: top-1 accuracy on labelled data, fidelity against a reference model, and
inputs generated from a model's signature."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import model_to_bytes

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
        try:
            self.session = ort.InferenceSession(
                model_to_bytes(model), options, providers=["CPUExecutionProvider"]
            )
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
        return [np.concatenate([c[i] for c in chunks]) if step < n else chunks[0][i] for i in range(len(self.output_names))]

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
    if not path.exists():
        raise ModelSqueezeError(f"{path}: no such file")
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory, expected a .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelSqueezeError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None


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
    return feeds, (None if labels is None else np.asarray(labels))


def predictions(output: np.ndarray) -> np.ndarray:
    """Top-1 class per sample: argmax of the last axis of scores, or the output itself for labels."""
    if output.ndim >= 2 and np.issubdtype(output.dtype, np.floating):
        return output.reshape(output.shape[0], -1).argmax(axis=1) if output.ndim == 2 else output.argmax(axis=-1)
    return output.reshape(output.shape[0], -1)[:, 0] if output.ndim > 1 else output


def accuracy(output: np.ndarray, labels: np.ndarray, source: str = "data") -> float:
    pred = predictions(output)
    labels = np.asarray(labels).reshape(-1) if np.asarray(labels).ndim > 1 and pred.ndim == 1 else np.asarray(labels)
    if pred.shape != labels.shape:
        raise ModelSqueezeError(f"{source}: {labels.shape[0]} labels for {pred.shape[0]} predictions")
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
        "snr_db": None if noise == 0 else (float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")),
    }


def parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise ModelSqueezeError(f"--dim {item!r}: expected NAME=VALUE with a positive integer value")
        dims[name.strip()] = int(value)
    return dims


def random_inputs(runner: Runner, model: onnx.ModelProto, n: int, dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """`n` samples shaped by the input signature: floats ~ N(0, 1); integers that index a Gather
    table uniform over its rows, other integers in {0, 1}. The leading dynamic dim is the sample
    count; every other dynamic dim needs `--dim name=value`."""
    if n < 1:
        raise ModelSqueezeError(f"--random {n}: need at least one sample")
    rng = np.random.default_rng(seed)
    table_rows = _gather_table_rows(model)
    feeds = {}
    for spec in runner.inputs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in dims:
                shape.append(dims[dim])
            elif axis == 0:
                shape.append(n)
            else:
                label = dim if dim else f"axis {axis}"
                raise ModelSqueezeError(
                    f"input {spec.name!r} has dynamic dimension {label!r}: give it a size with --dim {dim or 'NAME'}=N"
                )
        if shape and not isinstance(spec.shape[0], int) and spec.shape[0] not in dims:
            shape[0] = n
        elif shape and shape[0] == 1 and n > 1:
            shape[0] = n  # a fixed batch of 1 is fed sample by sample
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype is np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            high = table_rows.get(spec.name, 2)
            feeds[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
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
