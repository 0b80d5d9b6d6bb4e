"""The output pair: render a model's compressed records into OUT.onnx + OUT.msq, read a pair back
as a logical model (every weight a dense initializer holding its decoded value), unpack it.

The pack (`write_pack`) is the skeleton, the logical graph with every sidecar-backed initializer
deleted, beside the same sidecar bound to it; `load_pair` reads either the pair or the pack.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from modelsqueeze import forms, store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import memory_bytes, open_input, writing
from modelsqueeze.model import (
    _umask,
    check_model,
    check_data_file,
    check_model_path,
    check_output,
    graph_hash,
    holds_subgraph,
    iter_graphs,
    load_model,
    model_file_bytes,
    model_to_bytes,
    pin_labels,
    save_model,
    unpin_labels,
)
from modelsqueeze.sidecar import Sidecar, read_sidecar, rebind_sidecar, round_trip_record, sidecar_size, write_sidecar
from modelsqueeze.tensor import FLOAT_DTYPES, CompressedTensor, share_arrays

SIDECAR_SUFFIX = ".msq"


def sidecar_path(model_path: str | Path) -> Path:
    if not Path(model_path).name:  # '' (typer gives Path('.')) or a folder such as '/'
        raise ModelSqueezeError(f"{str(model_path)!r}: not a model file name; give a file name such as out.onnx")
    return Path(model_path).with_suffix(SIDECAR_SUFFIX)


@dataclass
class Pair:
    """A model as a command sees it: the logical model (sidecar-backed tensors as dense
    initializers of their decoded values) plus, when there is one, its sidecar."""

    path: Path
    model: onnx.ModelProto
    sidecar: Sidecar | None = None
    sidecar_path: Path | None = None
    runs: bool = True  # the file runs on its own (False: a pack's skeleton, which needs its sidecar)

    @property
    def records(self) -> dict[str, CompressedTensor]:
        return dict(self.sidecar.records) if self.sidecar else {}

    def runnable(self) -> onnx.ModelProto:
        """The graph as written (records in their native forms): what onnxruntime should run."""
        return rendered(self.model, self.records.values()) if self.sidecar else self.model


def _graph_for_key(model: onnx.ModelProto, key: str) -> tuple[onnx.GraphProto, str]:
    """The graph a record key lives in and the tensor's own name (the deepest subgraph wins)."""
    best = (model.graph, key)
    best_len = -1
    for path, graph in iter_graphs(model.graph):
        if path and key.startswith(path + "/") and len(path) > best_len:
            best, best_len = (graph, key[len(path) + 1:]), len(path)
    return best


def put_array(model: onnx.ModelProto, key: str, array: np.ndarray) -> None:
    """Make a plain dense `array` the value of `key` in its graph (replacing any form of it). A big
    value is held out of the protobuf (a copy, so later edits of `array` do not reach it)."""
    graph, name = _graph_for_key(model, key)
    array = np.array(array, order="C", copy=True)
    forms.emit(graph, name, CompressedTensor.raw(name, array), forms.opset(model), dense=True)


def put_record(model: onnx.ModelProto, key: str, record: CompressedTensor) -> None:
    """Make `record`'s decoded value the value of `key`: held as the record itself (compact),
    decoded whenever it is read."""
    graph, name = _graph_for_key(model, key)
    forms.emit(graph, name, record, forms.opset(model), dense=True)


def render(model: onnx.ModelProto, records: Iterable[CompressedTensor], dense: bool = False) -> None:
    """Put each record into the graph: in its smallest native form, or as a dense initializer."""
    version = forms.opset(model)
    for record in records:
        graph, name = _graph_for_key(model, record.name)
        forms.emit(graph, name, record, version, dense)


def rendered(model: onnx.ModelProto, records: Iterable[CompressedTensor]) -> onnx.ModelProto:
    """A copy of the logical `model` with every record in its native form (the file's graph)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    render(copy, records)
    return copy


def skeleton(model: onnx.ModelProto, records: Iterable[CompressedTensor]) -> onnx.ModelProto:
    """The logical `model` with every sidecar-backed initializer deleted, labels unpinned as in
    any file this tool writes: the graph of the pack (`write_pack`), and of every packed size."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for record in records:
        graph, name = _graph_for_key(bare, record.name)
        owned = forms.owned_initializers(graph, name)
        for dense in [t for t in graph.initializer if t.name in owned]:
            graph.initializer.remove(dense)
    unpin_labels(bare)
    return bare


def skeleton_size(model: onnx.ModelProto, records: Iterable[CompressedTensor]) -> int:
    """len(model_to_bytes(skeleton(model, records))), without copying or resolving the model:
    protobuf sizes are computed (ByteSize), the deleted initializers' entries subtracted and each
    stub counted at the size its data gives it. Graphs with subgraphs (records inside them, labels
    to unpin) fall back to building the skeleton."""
    names = [record.name for record in records]
    if any(holds_subgraph(node) for node in model.graph.node) or store.has_stubs_below(model.graph):
        return len(model_to_bytes(skeleton(model, records)))
    graph = model.graph
    owned = forms.owned_initializers(graph, *names)
    old = graph.ByteSize()
    new = old
    for tensor in graph.initializer:
        n = tensor.ByteSize()
        entry = 1 + store.varint_bytes(n) + n  # GraphProto.initializer is field 5: a 1-byte tag
        if tensor.name in owned:
            new -= entry
        elif store.is_stub(tensor):
            real = store.inline_size(tensor)
            new += 1 + store.varint_bytes(real) + real - entry
    return model.ByteSize() - store.varint_bytes(old) - old + store.varint_bytes(new) + new  # ModelProto.graph: field 7


def packed_size(pair: "Pair") -> int:
    """What a user ships, in bytes: skeleton + sidecar, or the model file (and its external data)."""
    if pair.sidecar is None:
        return model_file_bytes(pair.path)
    return skeleton_size(pair.model, pair.records.values()) + pair.sidecar_path.stat().st_size


def packed_bytes(model: onnx.ModelProto, records: Sequence[CompressedTensor],
                 record_bytes: dict[str, int] | None = None) -> int:
    """`packed_size` of the pair `write_pair(model, records, ...)` would write, without writing it
    (the sidecar's length does not depend on the graph hash it carries; `record_bytes`: records'
    sizes already known, from `round_trip`)."""
    return skeleton_size(model, records) + (sidecar_size(records, record_bytes) if records else 0)


def round_trip(
    model: onnx.ModelProto, records: dict[str, CompressedTensor], source: str = "<pipeline>",
    previous: dict[str, CompressedTensor] | None = None, record_bytes: dict[str, int] | None = None,
) -> tuple[onnx.ModelProto, dict[str, CompressedTensor]]:
    """What `load_pair` would give after `write_pair(model, records)`, in memory: the graph as it
    would be written, the records as the sidecar would give them back, the logical model rebuilt.
    A pipeline passes this between steps, so it computes exactly what one command per step does.
    `record_bytes`, when given, receives each record's bytes in the sidecar."""
    graph = rendered(model, records.values())
    check_model(graph, source, full=True)
    # Record by record, as the sidecar would give them back; arrays equal to the ones they were
    # made from (or to the step's input's: `previous`) are shared, not held twice.
    previous = previous or {}
    decoded = {}
    for name, record in records.items():
        back, size = round_trip_record(record)
        decoded[name] = share_arrays(back, record, previous.get(name))
        if record_bytes is not None:
            record_bytes[name] = size
    render(graph, decoded.values(), dense=True)  # the copy becomes the logical model
    return graph, decoded


def write_pack(pair: Pair, out: str | Path, force: bool = False) -> list[Path]:
    """Write the shipping artifact of `pair`: the skeleton OUT.onnx (the logical graph with every
    sidecar-backed initializer deleted) and the sidecar OUT.msq, copied byte for byte but bound to
    the skeleton. Their bytes are `packed_size(pair)`: the figure every report prints. A model with
    no sidecar is its own artifact, and is copied as it is. Returns the files written."""
    out = Path(out)
    side = sidecar_path(out)
    if out.suffix == SIDECAR_SUFFIX:
        raise ModelSqueezeError(f"{out}: the pack's model must not end in {SIDECAR_SUFFIX}")
    check_not_read_from(pair.model, out)
    inputs = [pair.path] + ([pair.sidecar_path] if pair.sidecar_path else [])
    check_outputs(out, force, inputs)
    with writing(out), tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged, staged_side = Path(tmp) / out.name, Path(tmp) / side.name
        if pair.sidecar is None:
            if model_file_bytes(pair.path) != pair.path.stat().st_size:
                raise ModelSqueezeError(f"{pair.path}: keeps its weights in external data files and has no "
                                        "sidecar: it is its own shipping artifact, nothing to pack")
            with open_input(pair.path, "an .onnx file") as source, open(staged, "wb") as copy:
                shutil.copyfileobj(source, copy)
            os.chmod(staged, 0o666 & ~_umask())
        else:
            bare = skeleton(pair.model, pair.records.values())
            save_model(bare, staged)
            with open(staged_side, "wb") as handle:
                rebind_sidecar(pair.sidecar_path, handle, graph_hash(bare))
            os.chmod(staged_side, 0o666 & ~_umask())
            load_pair(staged)  # what ships must load: the binding, every record against its graph
        install(Path(tmp), out)
    return [out, side] if pair.sidecar is not None else [out]


def check_not_read_from(model: onnx.ModelProto, out: str | Path) -> None:
    """Refuse an output pair (OUT.onnx, OUT.msq, OUT.onnx.data) that would overwrite a file the
    model's weights are still read from (its external data), --force or not."""
    out = Path(out)
    read_from = store.files(model)
    for target in (out, sidecar_path(out)):
        if target.resolve() in read_from:
            raise ModelSqueezeError(f"{target}: refusing to overwrite the input's external data")
    check_data_file(model, out)


def companions(out: str | Path) -> tuple[Path, Path]:
    """The files that belong to the output OUT.onnx: its sidecar OUT.msq and its external data
    OUT.onnx.data (written for models over protobuf's 2 GB limit)."""
    out = Path(out)
    return sidecar_path(out), out.parent / f"{out.name}.data"


def check_outputs(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse, before any work, an output whose model or companions exist (without --force) or
    are inputs: writing OUT.onnx replaces or removes all three."""
    protected = list(inputs) + [sidecar_path(p) for p in inputs]
    for target in (out, *companions(out)):
        check_output(target, force, protected)


def install(staged: Path, out: Path) -> None:
    """Move one output's staged files (OUT.onnx, and OUT.msq / OUT.onnx.data where written) from
    the folder `staged` into place, and remove the companions of an older output that this one
    does not have: an old sidecar beside a new plain model would be read as its weights.

    The order makes every kill safe: the old sidecar goes first and the new one comes last, so a
    model is never beside a sidecar of another write (the graph hash, which leaves weights out,
    could not tell); when external data is involved the old model goes before the data changes,
    so no model reads another write's data. At worst a complete model is left alone (its native
    forms compute its weights) or nothing is there."""
    side, data = companions(out)
    new_side, new_data = staged / side.name, staged / data.name
    side.unlink(missing_ok=True)
    if new_data.exists() or data.exists():
        out.unlink(missing_ok=True)
        if new_data.exists():
            os.replace(new_data, data)
        else:
            data.unlink()
    os.replace(staged / out.name, out)
    if new_side.exists():
        os.replace(new_side, side)


def write_pair(
    model: onnx.ModelProto,
    records: Sequence[CompressedTensor],
    out: str | Path,
    force: bool = False,
    inputs: Iterable[Path] = (),
    record_bytes: dict[str, int] | None = None,
) -> tuple[Path, Path]:
    """Render `records` into a copy of the logical `model` and write OUT.onnx and OUT.msq, both
    atomically (no records: OUT.onnx alone). Both targets are checked before either is written, so a refusal leaves nothing.
    `record_bytes`, when given, receives each record's bytes in the sidecar."""
    out = Path(out)
    side = sidecar_path(out)
    if out.suffix == SIDECAR_SUFFIX:
        raise ModelSqueezeError(f"{out}: the output model must not end in {SIDECAR_SUFFIX}")
    inputs = [Path(p) for p in inputs]
    check_not_read_from(model, out)  # first: an input's file is refused even with --force
    check_outputs(out, force, inputs)
    graph = rendered(model, records)
    unpin_labels(graph)
    check_model(graph, out, full=True)
    binding = graph_hash(graph)
    with writing(out), tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged, staged_side = Path(tmp) / out.name, Path(tmp) / side.name
        save_model(graph, staged)
        if records:  # no record, no sidecar: the model alone is the output (an old OUT.msq goes)
            with open(staged_side, "wb") as handle:
                sizes = write_sidecar(handle, list(records), binding)  # a record at a time
            if record_bytes is not None:
                record_bytes.update(sizes)
            os.chmod(staged_side, 0o666 & ~_umask())
        install(Path(tmp), out)
    return out, side


def load_pair(path: str | Path, sidecar: str | Path | None = None, require_sidecar: bool = False) -> Pair:
    """Load a model and its sidecar (OUT.msq beside OUT.onnx, when present) as a logical model.
    A sidecar that belongs to another graph is refused."""
    path = Path(path)
    check_model_path(path)  # a missing or empty model is the first thing to report
    side = Path(sidecar) if sidecar is not None else sidecar_path(path)
    if sidecar is None and not side.exists():
        model = load_model(path)  # a broken model is reported as such, sidecar or not
        if require_sidecar:
            raise ModelSqueezeError(f"{path}: no sidecar {side.name} beside it")
        pin_labels(model)
        return Pair(path=path, model=model)
    model = load_model(path, check=False)
    car = read_sidecar(side, expect=_expectation(model, side))
    if car.graph_hash != graph_hash(model):
        raise ModelSqueezeError(
            f"{side}: this sidecar belongs to a different graph than {path} (binding hash mismatch)"
        )
    # The graph as written is checked (compact: records in their native forms); rendering the
    # records dense only swaps those forms for initializers of the shapes checked above. A
    # skeleton (sidecar-backed initializers deleted) is only complete once rendered.
    try:
        check_model(model, path)
        complete = True
    except ModelSqueezeError:
        complete = False
    pin_labels(model)  # after the binding check: the file's graph is what the hash binds
    render(model, car.records.values(), dense=True)
    if not complete:
        check_model(model, path)
    return Pair(path=path, model=model, sidecar=car, sidecar_path=side, runs=complete)


# No tensor this tool loads is larger; a record claiming more is corrupt or hostile, and is refused
# before anything is allocated for it.
MAX_TENSOR_BYTES = 2**36


def _input_type(value: onnx.ValueInfoProto) -> tuple[str | None, tuple[int, ...] | None]:
    """(dtype, static shape) a graph input declares; None where it is not a float tensor of fully
    static shape."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return forms.dtype_name(tensor.elem_type), (dims if all(d >= 0 for d in dims) else None)


def _expectation(model: onnx.ModelProto, side: Path):
    """What each record of the sidecar beside `model` must be, checked before its streams are
    decoded (decoding allocates the record's size): a size this machine could hold, and a weight
    of the graph its key names, with the shape and dtype the graph gives it. In a skeleton (whose
    sidecar-backed initializers are deleted) the key must name a tensor that nodes read and
    nothing defines: the slot the record fills."""
    limit = min(MAX_TENSOR_BYTES, memory_bytes())
    facts: dict[int, tuple[dict, set, set, set]] = {}

    def graph_facts(graph: onnx.GraphProto) -> tuple[dict, set, set, set]:
        if id(graph) not in facts:
            read = {i for _, g in iter_graphs(graph) for n in g.node for i in n.input}  # outer-scope reads too
            made = {o for n in graph.node for o in n.output}
            inputs = {v.name: _input_type(v) for v in graph.input}
            facts[id(graph)] = (forms.declared(graph), read, made, inputs)
        return facts[id(graph)]

    def expect(key: str, shape: tuple[int, ...], dtype: str) -> None:
        if dtype not in FLOAT_DTYPES:
            raise ModelSqueezeError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
        n_bytes = math.prod(shape) * np.dtype(dtype).itemsize
        if n_bytes > limit:
            raise ModelSqueezeError(f"claims {n_bytes:,} bytes of weights, more than "
                                    f"this machine's {limit:,} bytes of memory; refused")
        graph, name = _graph_for_key(model, key)
        declared, read, made, inputs = graph_facts(graph)
        if name in declared:
            want_shape, want_dtype = declared[name]
            if want_shape != shape:
                raise ModelSqueezeError(f"shape {shape} differs from the graph's tensor {want_shape}")
            if want_dtype is not None and want_dtype != dtype:
                raise ModelSqueezeError(f"dtype {dtype} differs from the graph's tensor ({want_dtype})")
        elif name in inputs:
            # An initializer listed among the inputs (IR 3 requires it, later exporters still do
            # it) stays an input in the skeleton; a data input (another type, a dynamic dim) is
            # no weight.
            if inputs[name] != (dtype, shape):
                raise ModelSqueezeError("names an input of the graph, not a weight")
        elif name in made:
            raise ModelSqueezeError("names a tensor a node of the graph computes, not a weight")
        elif name not in read:
            raise ModelSqueezeError("names no tensor of the graph (no node reads it)")

    return expect


def unpack(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a plain dense model (no sidecar) computing exactly what the pair computes."""
    pair = load_pair(src, require_sidecar=True)
    out = Path(out)
    if out.suffix == SIDECAR_SUFFIX:
        raise ModelSqueezeError(f"{out}: the output model must not end in {SIDECAR_SUFFIX}")
    check_not_read_from(pair.model, out)
    check_outputs(out, force, [Path(src)])
    unpin_labels(pair.model)
    with writing(out), tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        save_model(pair.model, Path(tmp) / out.name)
        install(Path(tmp), out)  # an older OUT.msq / OUT.onnx.data goes with the old model
    return out
