"""The output pair: render compressed records into OUT.onnx + OUT.msq, read a pair back, unpack it.

The skeleton is OUT.onnx with every sidecar-backed initializer deleted; `load_pair` accepts either
the full graph or the skeleton and always returns the full model, checked against the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import onnx
from onnx import numpy_helper

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.model import (
    atomic_write_bytes,
    check_model,
    check_output,
    graph_hash,
    iter_all_tensors,
    iter_graphs,
    load_model,
    model_to_bytes,
    parse_model,
    read_model_bytes,
    save_model,
    uses_external_data,
)
from modelsqueeze.sidecar import Sidecar, encode_sidecar, read_sidecar
from modelsqueeze.tensor import CompressedTensor

SIDECAR_SUFFIX = ".msq"


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(SIDECAR_SUFFIX)


@dataclass
class Pair:
    """A model as a command sees it: the full graph plus, when there is one, its sidecar."""

    path: Path
    model: onnx.ModelProto
    sidecar: Sidecar | None = None
    sidecar_path: Path | None = None
    restored: list[str] = field(default_factory=list)  # initializers rebuilt from the sidecar

    @property
    def records(self) -> dict[str, CompressedTensor]:
        return dict(self.sidecar.records) if self.sidecar else {}


def _graph_for_key(model: onnx.ModelProto, key: str) -> tuple[onnx.GraphProto, str]:
    """The graph a record key lives in and the tensor's own name (the deepest subgraph wins)."""
    best = (model.graph, key)
    best_len = -1
    for path, graph in iter_graphs(model.graph):
        if path and key.startswith(path + "/") and len(path) > best_len:
            best, best_len = (graph, key[len(path) + 1:]), len(path)
    return best


def materialize(record: CompressedTensor, name: str) -> list[onnx.TensorProto]:
    """The initializers that carry this record in its graph, where the tensor is called `name`
    (now: its decoded dense tensor; native compact forms add theirs here)."""
    return [numpy_helper.from_array(record.decode(), name)]


def _initializer_index(graph: onnx.GraphProto) -> dict[str, int]:
    return {t.name: i for i, t in enumerate(graph.initializer)}


def render(model: onnx.ModelProto, records: Iterable[CompressedTensor]) -> None:
    """Write each record's tensors into the model's initializers (adding the ones that are missing)."""
    for record in records:
        graph, name = _graph_for_key(model, record.name)
        # A weight that came from a Constant node becomes an initializer, so the sidecar can back it.
        constants = [n for n in graph.node if n.op_type == "Constant" and list(n.output) == [name]]
        for node in constants:
            graph.node.remove(node)
        index = _initializer_index(graph)
        for tensor in materialize(record, name):
            if tensor.name in index:
                graph.initializer[index[tensor.name]].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)


def skeleton(model: onnx.ModelProto, records: Iterable[CompressedTensor]) -> onnx.ModelProto:
    """The model with every sidecar-backed initializer deleted (what `unpack` starts from)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for record in records:
        graph, name = _graph_for_key(bare, record.name)
        keep = [t for t in graph.initializer if t.name != name]
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
    return bare


def packed_bytes(model: onnx.ModelProto, sidecar_size: int, records: Iterable[CompressedTensor]) -> int:
    """What a user ships: skeleton + sidecar, in bytes."""
    return len(model_to_bytes(skeleton(model, records))) + sidecar_size


def write_pair(
    model: onnx.ModelProto,
    records: Sequence[CompressedTensor],
    out: str | Path,
    force: bool = False,
    inputs: Iterable[Path] = (),
) -> tuple[Path, Path]:
    """Render `records` into `model` and write OUT.onnx and OUT.msq, both atomically.

    Both targets are checked before either is written, so a refusal leaves nothing behind."""
    out = Path(out)
    side = sidecar_path(out)
    if out.suffix == SIDECAR_SUFFIX:
        raise ModelSqueezeError(f"{out}: the output model must not end in {SIDECAR_SUFFIX}")
    inputs = [Path(p) for p in inputs]
    for target in (out, side):
        check_output(target, force, inputs + [sidecar_path(p) for p in inputs])
    render(model, records)
    check_model(model, out, full=True)
    data = encode_sidecar(list(records), graph_hash(model))
    atomic_write_bytes(side, data)
    save_model(model, out)
    return out, side


def load_pair(path: str | Path, sidecar: str | Path | None = None, require_sidecar: bool = False) -> Pair:
    """Load a model and its sidecar (OUT.msq beside OUT.onnx, when present), rebuilding any
    sidecar-backed initializer the graph lacks. A sidecar that belongs to another graph is refused."""
    path = Path(path)
    side = Path(sidecar) if sidecar is not None else sidecar_path(path)
    if sidecar is None and not side.exists():
        if require_sidecar:
            raise ModelSqueezeError(f"{path}: no sidecar {side.name} beside it")
        return Pair(path=path, model=load_model(path))
    data = read_model_bytes(path)
    model = parse_model(data, path)
    # External data, if any, is resolved by the full loader; a skeleton is always self-contained.
    model = load_model(path, check=False) if _has_external(model) else model
    car = read_sidecar(side)
    if car.graph_hash != graph_hash(model):
        raise ModelSqueezeError(
            f"{side}: this sidecar belongs to a different graph than {path} (binding hash mismatch)"
        )
    missing = []
    for record in car.records.values():
        graph, name = _graph_for_key(model, record.name)
        present = {t.name: t for t in graph.initializer}
        if name not in present:
            missing.append(record.name)
        elif tuple(present[name].dims) != record.shape:
            raise ModelSqueezeError(
                f"{side}: record {record.name!r} has shape {record.shape}, the graph's tensor "
                f"{tuple(present[name].dims)}"
            )
    render(model, [car.records[k] for k in missing])
    check_model(model, path)
    return Pair(path=path, model=model, sidecar=car, sidecar_path=side, restored=missing)


def _has_external(model: onnx.ModelProto) -> bool:
    return any(uses_external_data(t) for t in iter_all_tensors(model))


def unpack(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write a plain dense model (no sidecar) computing exactly what the pair computes."""
    pair = load_pair(src, require_sidecar=True)
    out = Path(out)
    check_output(out, force, [Path(src), sidecar_path(src)])
    render(pair.model, pair.records.values())
    save_model(pair.model, out)
    return out
