"""onnxruntime sessions: top-1 accuracy on labelled data, fidelity against a reference model, and
inputs generated from a model's signature."""

from __future__ import annotations

import tempfile
import zipfile
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

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


@dataclass(frozen=True)
class DataOptions:
    """How data arrays meet a model's inputs: `batch_axes` gives an input's sample axis (None: the
    array is fed whole to every batch), overriding what the model's dims say; `labels` names the
    label array (default `y`)."""

    batch_axes: Mapping[str, int | None] = field(default_factory=dict)
    labels: str | None = None

    @property
    def label_key(self) -> str:
        return self.labels or "y"


_options: ContextVar[DataOptions] = ContextVar("modelsqueeze_data_options", default=DataOptions())
_listener: ContextVar[Callable[[str], None] | None] = ContextVar("modelsqueeze_data_notes", default=None)


@contextmanager
def data_options(batch_axes: Mapping[str, int | None] | None = None, labels: str | None = None) -> Iterator[None]:
    """Data read inside this call uses these sample axes and this label array (--batch-axis, --labels)."""
    token = _options.set(DataOptions(dict(batch_axes or {}), labels))
    try:
        yield
    finally:
        _options.reset(token)


@contextmanager
def data_notes(callback: Callable[[str], None]) -> Iterator[None]:
    """What the data reader notices (arrays ignored, inputs fed whole) goes to `callback`, each once."""
    told: set[str] = set()

    def once(note: str) -> None:
        if note not in told:
            told.add(note)
            callback(note)

    token = _listener.set(once)
    try:
        yield
    finally:
        _listener.reset(token)


def label_key() -> str:
    """The name of the label array in data read now (`y`, or what --labels gave)."""
    return _options.get().label_key


def _tell(note: str) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(note)


def parse_batch_axes(items: list[str]) -> dict[str, int | None]:
    """--batch-axis INPUT=AXIS items (AXIS a whole number, or `none`: fed whole to every batch)."""
    axes: dict[str, int | None] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        value = value.strip().lower()
        if not sep or not name.strip() or not (value == "none" or value.isdigit()):
            raise ModelSqueezeError(f"--batch-axis {item!r}: expected INPUT=AXIS (a whole number, or none)")
        axes[name.strip()] = None if value == "none" else int(value)
    return axes


@dataclass
class Samples:
    """Data split for a model: each input's array with its sample axis (None: fed whole to every
    batch, e.g. a 0-d sample rate), the number of samples and the labels (if any)."""

    feeds: dict[str, np.ndarray]
    axes: dict[str, int | None]
    n: int
    labels: np.ndarray | None = None

    def part(self, start: int, stop: int) -> "Samples":
        """Samples start..stop (the labels are not carried)."""
        feeds = {name: array if self.axes[name] is None else array[(slice(None),) * self.axes[name] + (slice(start, stop),)]
                 for name, array in self.feeds.items()}
        return Samples(feeds, dict(self.axes), max(0, min(stop, self.n) - start))


def _batch_symbol(specs: list["InputSpec"]) -> str | None:
    """The dim name most inputs have first ("batch", "N"): the sample axis wherever it appears."""
    counts = Counter(s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str) and s.shape[0])
    return counts.most_common(1)[0][0] if counts else None


def sample_axes(specs: list["InputSpec"], feeds: Mapping[str, np.ndarray], label: str = "data") -> tuple[dict[str, int | None], int]:
    """Each input's sample axis and the number of samples. From the data and the model, not from
    "axis 0 of everything": a 0-d array is fed whole; an input whose dims hold the batch dim name
    ([2, batch, 128] state) is sampled along it; a dynamic leading dim is the sample axis; an input
    of fixed shape whose data has exactly that shape, while the others have another number of
    samples, is fed whole. --batch-axis INPUT=AXIS overrides."""
    given = _options.get().batch_axes
    unknown = sorted(set(given) - {spec.name for spec in specs})
    if unknown:
        raise ModelSqueezeError(f"--batch-axis {unknown[0]}: the model has no input of that name "
                                f"(inputs: {', '.join(s.name for s in specs)})")
    symbol = _batch_symbol(specs)
    axes: dict[str, int | None] = {}
    fixed: list[InputSpec] = []
    for spec in specs:
        array = np.asarray(feeds[spec.name])
        if spec.name in given:
            axis = given[spec.name]
            if axis is not None and axis >= array.ndim:
                raise ModelSqueezeError(f"--batch-axis {spec.name}={axis}: its data has {array.ndim} dimension(s) {tuple(array.shape)}")
            axes[spec.name] = axis
        elif array.ndim == 0:
            axes[spec.name] = None
        elif symbol is not None and symbol in spec.shape and len(spec.shape) == array.ndim:
            axes[spec.name] = list(spec.shape).index(symbol)
        elif not spec.shape or not isinstance(spec.shape[0], int):
            axes[spec.name] = 0
        else:
            axes[spec.name] = 0
            fixed.append(spec)
    counted = {np.asarray(feeds[name]).shape[axis] for name, axis in axes.items()
               if axis is not None and name not in {f.name for f in fixed}}
    if len(counted) == 1:
        n = counted.pop()
        for spec in fixed:
            array = np.asarray(feeds[spec.name])
            if tuple(array.shape) == tuple(spec.shape) and array.shape[0] != n:
                axes[spec.name] = None
                _tell(f"{label}: input {spec.name!r} {tuple(array.shape)} has the model's fixed shape, not {n} samples; "
                      f"fed whole to every batch")
    sizes = {name: np.asarray(feeds[name]).shape[axis] for name, axis in axes.items() if axis is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {sizes[name]} (axis {axes[name]})" for name in sizes)
        raise ModelSqueezeError(f"{label}: inputs have different numbers of samples: {listed}; "
                                f"give an input's sample axis with --batch-axis INPUT=AXIS (or INPUT=none)")
    return axes, (next(iter(sizes.values())) if sizes else 1)


class Runner:
    """One onnxruntime session over a model, run in batches along each input's sample axis."""

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
        self.output_types = [o.type for o in self.session.get_outputs()]
        self.output_shapes = [tuple(o.shape) for o in self.session.get_outputs()]

    def samples(self, feeds: Mapping[str, np.ndarray] | Samples) -> Samples:
        if isinstance(feeds, Samples):
            return feeds
        missing = [spec.name for spec in self.inputs if spec.name not in feeds]
        if missing:
            raise ModelSqueezeError(f"{self.label}: no data for input {missing[0]!r}")
        axes, n = sample_axes(self.inputs, feeds, self.label)
        return Samples({spec.name: np.asarray(feeds[spec.name]) for spec in self.inputs}, axes, n)

    def _step(self, samples: Samples) -> int:
        """Samples per run: BATCH_SIZE where every sample axis is dynamic, one at a time where the
        model fixes it at 1, all at once where it fixes it at another size."""
        dims = [spec.shape[samples.axes[spec.name]] for spec in self.inputs
                if samples.axes.get(spec.name) is not None and samples.axes[spec.name] < len(spec.shape)]
        if all(not isinstance(d, int) for d in dims):
            return BATCH_SIZE
        if all(not isinstance(d, int) or d == 1 for d in dims):
            return 1
        return samples.n

    def _output_axes(self, chunks: list[list[np.ndarray]], sizes: list[int]) -> list[int | None]:
        """Each output's sample axis: the batch dim name's axis where the model declares it, else
        axis 0, else the one axis whose size is every batch's sample count (a time-major
        [steps, batch, ...] output); None where no axis is."""
        symbol = _batch_symbol(self.inputs)
        found: list[int | None] = []
        for i, shape in enumerate(self.output_shapes):
            fits = [axis for axis in range(min(c[i].ndim for c in chunks))
                    if all(c[i].shape[axis] == size for c, size in zip(chunks, sizes))]
            named = list(shape).index(symbol) if symbol is not None and symbol in shape else None
            found.append(named if named in fits else 0 if 0 in fits else fits[0] if len(fits) == 1 else None)
        return found

    def run(self, feeds: Mapping[str, np.ndarray] | Samples, progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """All outputs for all samples, run in batches along each input's sample axis (inputs
        without one are fed whole to every batch); outputs are joined along theirs (the batch dim
        name's axis, else axis 0), or computed in one run when an output has no such axis."""
        samples = self._conform(self.samples(feeds))
        n = samples.n
        step = max(1, self._step(samples))
        chunks: list[list[np.ndarray]] = []
        sizes: list[int] = []
        for start in range(0, n, step):
            batch = samples.part(start, start + step)
            chunks.append(self._session_run(batch.feeds))
            sizes.append(batch.n)
            if progress:
                progress(batch.n)
        if not chunks:
            raise ModelSqueezeError(f"{self.label}: no samples to run")
        if len(chunks) == 1:
            return chunks[0]
        axes = self._output_axes(chunks, sizes)
        joinable = all(axis is not None for axis in axes) and all(
            np.delete(c[i].shape, axes[i]).tolist() == np.delete(chunks[0][i].shape, axes[i]).tolist()
            for c in chunks for i in range(len(axes)))
        if not joinable:  # an output without a sample axis: run everything at once
            return self._session_run(samples.feeds)
        return [np.concatenate([c[i] for c in chunks], axis=axes[i]) for i in range(len(self.output_names))]

    def _session_run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, dict(feeds))
        except Exception as exc:
            raise ModelSqueezeError(f"{self.label}: onnxruntime failed to run: {_first_line(exc)}") from None

    def _conform(self, samples: Samples) -> Samples:
        out = {}
        for spec in self.inputs:
            array = samples.feeds[spec.name]
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
            sample_axis = samples.axes.get(spec.name)
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                fed_singly = axis == sample_axis and want == 1
                if isinstance(want, int) and want != got and not fed_singly:
                    raise ModelSqueezeError(
                        f"{self.label}: input {spec.name!r} wants shape {_shape_str(spec.shape)}, data has {tuple(array.shape)}"
                    )
            out[spec.name] = array
        return Samples(out, dict(samples.axes), samples.n, samples.labels)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# A member that inflates more than this many times, to more than NPZ_BOMB_BYTES, is a zip bomb:
# real arrays (images, audio, tokens) deflate 2-20x; only near-constant filler gets near
# deflate's 1032x ceiling, and there is nothing to calibrate or evaluate in it.
NPZ_BOMB_RATIO = 100
NPZ_BOMB_BYTES = 64 << 20


def _check_members(handle, path: Path) -> None:
    """Refuse, from the archive's directory and each member's .npy header (a few hundred bytes
    each), an .npz whose arrays would not fit in memory, a member that inflates like a zip bomb,
    or a header declaring more bytes than its member holds. Not a zip archive: np.load says so."""
    from modelsqueeze.files import memory_bytes

    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    with archive:
        members = archive.infolist()
        total = sum(m.file_size for m in members)
        if total > memory_bytes():
            raise ModelSqueezeError(f"{path}: its arrays inflate to {total:,} bytes, more than this machine's "
                                    f"{memory_bytes():,} bytes of memory")
        for member in members:
            key = member.filename.removesuffix(".npy")
            if member.file_size > NPZ_BOMB_BYTES and member.file_size > NPZ_BOMB_RATIO * max(member.compress_size, 1):
                raise ModelSqueezeError(f"{path}: member {key!r} inflates {member.compress_size:,} bytes to "
                                        f"{member.file_size:,} (over {NPZ_BOMB_RATIO}x): refused as a zip bomb")
            if not member.filename.endswith(".npy"):
                continue
            try:
                with archive.open(member) as npy:
                    version = np.lib.format.read_magic(npy)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(npy)
            except Exception:  # not an .npy member: np.load gives the error
                continue
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > member.file_size:
                raise ModelSqueezeError(f"{path}: member {key!r} declares a {tuple(shape)} {dtype} array of "
                                        f"{declared:,} bytes in {member.file_size:,} bytes")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory, expected a .npz file")
    handle = open_input(path, "a .npz file")  # a named pipe or device is refused, never waited on
    try:
        _check_members(handle, path)
        handle.seek(0)
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
    return arrays


def sample_count_hint(arrays: Mapping[str, np.ndarray]) -> int:
    """A progress bar's total: the most samples any array holds along its first axis."""
    return max((a.shape[0] for a in arrays.values() if a.ndim), default=1)


def non_finite_count(array: np.ndarray) -> int:
    """How many NaN or infinite values a float array holds (0 for any other dtype)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def split_data(data: Mapping[str, np.ndarray], runner: Runner, source: str, labels: bool = True) -> Samples:
    """The model's feeds (by input name, or `x` for a single-input model) with their sample axes,
    and the labels (`y`, or the array --labels names). Arrays the model does not read are ignored
    with a note."""
    label_key = _options.get().label_key
    explicit = _options.get().labels is not None
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
    used = set(feeds) | ({"x"} if len(runner.inputs) == 1 and runner.inputs[0].name not in data else set())
    if labels and explicit and label_key not in data:
        raise ModelSqueezeError(f"{source}: no array {label_key!r} for --labels (arrays: {', '.join(sorted(data)) or 'none'})")
    found = data.get(label_key) if labels and label_key not in feeds else None
    ignored = sorted(set(data) - used - ({label_key} if found is not None else set()) - ({"y"} if not labels else set()))
    if ignored:
        _tell(f"{source}: array(s) {', '.join(ignored)} ignored (no input of the model has that name"
              + (f"; labels are {label_key!r}" if labels else "") + ")")
    for name, array in feeds.items():
        if bad := non_finite_count(array):
            _tell(f"{source}: array {name!r} has {bad:,} NaN or infinite values of {array.size:,}; "
                  f"the model is run on them as they are")
    samples = runner._conform(runner.samples(feeds))  # a wrong rank or type is found before the labels
    if found is not None:
        if found.ndim == 0:
            raise ModelSqueezeError(f"{source}: labels {label_key!r} are a single value; expected one per sample")
        if not (np.issubdtype(found.dtype, np.integer) or np.issubdtype(found.dtype, np.bool_)):
            whole = np.issubdtype(found.dtype, np.floating) and np.all(np.isfinite(found)) and np.all(found == np.round(found))
            if not whole:
                raise ModelSqueezeError(f"{source}: labels {label_key!r} must be class indices (whole numbers), "
                                        f"not {found.dtype} values")
            found = found.astype(np.int64)
        samples.labels = found
    return samples


def top1_accuracy(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray], label: str = "model",
                  source: str = "data", progress: Callable[[int], None] | None = None) -> float:
    """Top-1 accuracy of `model` on labelled arrays (inputs by name or `x`, labels `y`)."""
    runner = Runner(model, label)
    samples = split_data(arrays, runner, source)
    if samples.labels is None:
        raise ModelSqueezeError(_no_labels(arrays, samples, source))
    return accuracy(runner.run(samples, progress)[0], samples.labels, source)


def _no_labels(arrays: Mapping[str, np.ndarray], samples: Samples, source: str) -> str:
    """The message for data without its label array, naming the arrays that could be it."""
    others = sorted(set(arrays) - set(samples.feeds) - {"x"})
    hint = f" (other arrays: {', '.join(others)}; --labels KEY names the label array)" if others else ""
    return f"{source}: no `{label_key()}` labels, so no accuracy{hint}"


METRICS = ("top1", "agreement", "snr")


@dataclass(frozen=True)
class Metric:
    """What a gate or a search measures, and on which output. top1: accuracy against the labels
    (a fraction; output 0 unless named); agreement: the share of samples whose top-1 class (or
    integer value) equals the reference model's (a fraction, no labels needed); snr: the output's
    signal-to-noise ratio against the reference model's, in dB (no labels needed). agreement and
    snr read the first float output unless one is named: `snr:probabilities`."""

    kind: str = "top1"
    output: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Metric":
        if text is None:
            return cls()
        kind, _, output = text.partition(":")
        kind = kind.strip().lower()
        if kind not in METRICS:
            raise ModelSqueezeError(f"--metric {text!r}: expected one of {', '.join(METRICS)} (optionally :OUTPUT)")
        if _ and not output.strip():
            raise ModelSqueezeError(f"--metric {text!r}: no output name after ':'")
        return cls(kind, output.strip() or None)

    @property
    def text(self) -> str:
        return self.kind + (f":{self.output}" if self.output else "")

    def output_index(self, runner: Runner) -> int:
        if self.output is not None:
            if self.output not in runner.output_names:
                raise ModelSqueezeError(f"--metric {self.text}: the model has no output {self.output!r} "
                                        f"(outputs: {', '.join(runner.output_names)})")
            return runner.output_names.index(self.output)
        return 0 if self.kind == "top1" else headline_output(runner)

    def show(self, value: float) -> str:
        if self.kind == "snr":
            return "identical" if value == float("inf") else f"{value:.2f} dB"
        return f"{100 * value:.2f}%"


class Scorer:
    """The metric of candidate graphs on one data set: the data is split once, the reference
    graph's outputs computed once (agreement, snr), each candidate gets its own session."""

    def __init__(self, metric: Metric, arrays: Mapping[str, np.ndarray], reference: onnx.ModelProto | None,
                 source: str = "data"):
        self.metric, self.arrays, self.reference, self.source = metric, arrays, reference, source
        self._samples: dict[tuple[str, ...], Samples] = {}
        self._reference_outputs: dict[tuple[str, ...], list[np.ndarray]] = {}
        self.evaluations = 0

    def __call__(self, graph: onnx.ModelProto, label: str = "candidate",
                 progress: Callable[[int], None] | None = None) -> float:
        runner = Runner(graph, label)
        names = tuple(spec.name for spec in runner.inputs)
        if names not in self._samples:
            self._samples[names] = split_data(self.arrays, runner, self.source, labels=self.metric.kind == "top1")
        samples = self._samples[names]
        index = self.metric.output_index(runner)
        self.evaluations += 1
        if self.metric.kind == "top1":
            if samples.labels is None:
                raise ModelSqueezeError(_no_labels(self.arrays, samples, self.source) + "; --metric agreement or snr needs none")
            return accuracy(runner.run(samples, progress)[index], samples.labels, self.source)
        if self.reference is None:
            raise ModelSqueezeError(f"--metric {self.metric.text} needs a reference model")
        if names not in self._reference_outputs:  # the reference itself is run once, not twice
            self._reference_outputs[names] = (runner if graph is self.reference else Runner(self.reference, "reference")).run(
                samples, progress if graph is self.reference else None)
        want = self._reference_outputs[names][index]
        got = want if graph is self.reference else runner.run(samples, progress)[index]
        return metric_value(self.metric, fidelity(got, want), runner.output_names[index], got.shape)


def metric_value(metric: Metric, fid: dict, name: str, shape: tuple[int, ...]) -> float:
    """The agreement or SNR figure of `fidelity(...)` result `fid` (inf: identical outputs), or one
    error line where it is undefined for output `name`."""
    if metric.kind == "agreement":
        if fid["top1_agreement"] is None:
            raise ModelSqueezeError(f"--metric agreement: output {name!r} {tuple(shape)} has no class axis "
                                    f"(one score per sample); use --metric snr")
        return fid["top1_agreement"]
    if fid["snr_db"] is None:
        if fid["max_abs_error"] == 0:
            return float("inf")
        raise ModelSqueezeError(f"--metric snr: the reference's output {name!r} is all zeros; its SNR is undefined")
    return fid["snr_db"]


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
    if np.issubdtype(output.dtype, np.floating) and output.ndim >= 2 and labels.size:
        classes = output.shape[-1]  # predictions are argmax indices over the last axis
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ModelSqueezeError(
                f"{source}: labels run from {low} to {high}, but the model's scores have {classes} "
                f"class{'es' if classes != 1 else ''} (indices 0..{classes - 1}); a label outside them can never match"
            )
    return float(np.mean(pred == labels)) if labels.size else float("nan")


_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def headline_output(runner: Runner) -> int:
    """The output fidelity is headlined on: the first float output (scores, not an int64 label)."""
    return next((i for i, t in enumerate(runner.output_types) if t in _FLOAT_OUTPUTS), 0)


def fidelity(output: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """How closely `output` follows `reference` (same shape): top-1 agreement (None for a float
    output without a class axis), absolute errors, cosine similarity and signal-to-noise ratio
    (None when the outputs are identical)."""
    if output.shape != reference.shape:
        raise ModelSqueezeError(f"outputs differ in shape: {output.shape} vs reference {reference.shape}")
    out = output.astype(np.float64).reshape(output.shape[0] if output.ndim else 1, -1)
    ref = reference.astype(np.float64).reshape(out.shape)
    diff = out - ref
    noise = float(np.sum(diff * diff))
    signal = float(np.sum(ref * ref))
    norms = float(np.linalg.norm(out) * np.linalg.norm(ref))
    if not np.issubdtype(output.dtype, np.floating):  # labels, token ids: the share of equal values
        agreement = float(np.mean(output == reference)) if output.size else 1.0
    elif output.ndim >= 2 and output.shape[-1] > 1:  # scores over classes: the same top-1 class
        agreement = float(np.mean(predictions(output) == predictions(reference)))
    else:  # a regression output (a score per sample) has no top-1
        agreement = None
    return {
        "top1_agreement": agreement,
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
