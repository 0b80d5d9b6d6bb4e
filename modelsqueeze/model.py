"""Load and save ONNX models safely, and find their weight tensors from the graph (never from names).

Loading refuses anything that is not a readable ONNX model with one clear error; external data must
stay inside the model's folder. Saving is atomic and never overwrites without `force`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from modelsqueeze import store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.files import check_regular, kind_of, open_input, read_input, writing

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it with some headroom.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
}

# (op_type, input index) -> (role, output-channel axis, reduction axis), axes for the usual layouts.
# Gemm and MatMul depend on attributes or rank and are worked out in `_consumer_axes`.
_WEIGHT_INPUTS: dict[tuple[str, int], tuple[str, int | None, int | None]] = {
    ("Conv", 1): ("weight", 0, 1),
    ("Conv", 2): ("bias", 0, None),
    ("ConvTranspose", 1): ("weight", 1, 0),
    ("ConvTranspose", 2): ("bias", 0, None),
    # Recurrent W and R are [directions, gates*hidden, input|hidden]: gate rows are the outputs.
    ("LSTM", 1): ("weight", 1, 2),
    ("LSTM", 2): ("weight", 1, 2),
    ("LSTM", 3): ("bias", 1, None),
    ("GRU", 1): ("weight", 1, 2),
    ("GRU", 2): ("weight", 1, 2),
    ("GRU", 3): ("bias", 1, None),
    ("RNN", 1): ("weight", 1, 2),
    ("RNN", 2): ("weight", 1, 2),
    ("RNN", 3): ("bias", 1, None),
    ("BatchNormalization", 1): ("norm", 0, None),
    ("BatchNormalization", 2): ("norm", 0, None),
    ("BatchNormalization", 3): ("norm", 0, None),
    ("BatchNormalization", 4): ("norm", 0, None),
    ("LayerNormalization", 1): ("norm", None, None),
    ("LayerNormalization", 2): ("norm", None, None),
    ("InstanceNormalization", 1): ("norm", 0, None),
    ("InstanceNormalization", 2): ("norm", 0, None),
}
_ROLE_RANK = {"weight": 4, "embedding": 3, "bias": 2, "norm": 1, "other": 0}
# Roles whose tensors the compression commands transform by default.
COMPRESSIBLE_ROLES = ("weight", "embedding")


@dataclass(frozen=True)
class Consumer:
    """One use of a tensor: the node that reads it and at which input."""

    node: str
    op: str
    input_index: int
    via: str = ""  # the shape-only ops between the tensor and this node ("Slice>Concat>Unsqueeze"), if any


@dataclass(eq=False)
class WeightInfo:
    """A float tensor stored in the model, with what the graph says about it."""

    name: str
    graph: str  # "" for the main graph, else the path of the subgraph ("node/attribute")
    source: str  # "initializer", "constant" or "sparse_initializer"
    shape: tuple[int, ...]
    dtype: str
    consumers: tuple[Consumer, ...]
    role: str  # weight, embedding, bias, norm or other
    channel_axis: int | None  # axis along which the consumer's output channels lie
    reduction_axis: int | None  # the input (reduction) axis, where the layout has one
    proto: onnx.TensorProto | onnx.SparseTensorProto

    @property
    def key(self) -> str:
        """Unique name across subgraphs (subgraph initializers may shadow outer names)."""
        return self.name if not self.graph else f"{self.graph}/{self.name}"

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ops(self) -> str:
        return ",".join(sorted({c.op for c in self.consumers})) or "-"

    def array(self) -> np.ndarray:
        if isinstance(self.proto, onnx.SparseTensorProto):
            return sparse_to_dense(self.proto)
        return store.to_array(self.proto)


# ----------------------------------------------------------------------------------------------
# Loading


def check_model_path(path: Path) -> None:
    """One clear error for a path that cannot be a model file: missing, a directory, empty."""
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory, expected an .onnx file")
    if check_regular(path, "an .onnx file").st_size == 0:
        raise ModelSqueezeError(f"{path}: file is empty, expected an ONNX model")


def read_model_bytes(path: Path) -> bytes:
    """The file's bytes, or one clear error for a path that cannot be a model."""
    check_model_path(path)
    data = read_input(path, "an .onnx file")
    if not data:
        raise ModelSqueezeError(f"{path}: file is empty, expected an ONNX model")
    return data


def parse_model(data: bytes, source: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        if "MaxDepth" in str(exc):  # upb stops at 100 nested messages: a recursion bomb of subgraphs
            raise ModelSqueezeError(f"{source}: subgraphs nested too deeply for the protobuf parser") from None
        raise ModelSqueezeError(f"{source}: not an ONNX model (truncated or not protobuf: {exc})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise ModelSqueezeError(f"{source}: not an ONNX model (no IR version, graph or opset)")
    return model


def load_model(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Load a model; its external data (which must lie inside the model's folder) and the data of
    its big initializers stay on disk, read tensor by tensor when asked (see `store`)."""
    path = Path(path)
    key = _disk_key(path) if path.is_file() else None
    model = _parse_lazily(path)
    external = [t for t in iter_all_tensors(model) if uses_external_data(t) and not store.is_stub(t)]
    if key is not None:
        _FILE_BYTES[key] = _file_bytes(path, external)
    if external:
        base = path.resolve().parent
        for tensor in external:
            check_external_location(tensor, base, path)
        _external_to_stubs(model, external, base, path)
    if check:
        check_model(model, path)
    check_tensor_sizes(model, path)
    return model


def _parse_lazily(path: Path) -> onnx.ModelProto:
    """Parse the model file without copying its main graph's big raw_data into the protobuf: those
    initializers become stubs reading their bytes from the file."""
    check_model_path(path)
    try:
        with open_input(path, "an .onnx file") as handle:
            store.check_head(handle.read(1 << 16), os.fstat(handle.fileno()).st_size)  # before any big read or map
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                split = store.split_model_bytes(view)
    except store.NotProtobuf:
        raise ModelSqueezeError(f"{path}: not an ONNX model (truncated or not protobuf: its top-level fields do not "
                                f"parse)") from None
    except (OSError, ValueError):
        split = None
    if split is None:
        return parse_model(read_model_bytes(path), path)
    data, taken = split
    model = parse_model(data, path)
    absolute = path.resolve()
    for index, offset, length in taken:
        tensor = model.graph.initializer[index]
        store.make_stub(tensor, store.FileRange(absolute, offset, length))
        if _expected_bytes(tensor) != length or tensor.data_type not in _LAZY_TYPES:
            store.materialize(tensor)  # an odd type or a wrong length: inline, as the file has it (and checked as such)
    return model


_LAZY_TYPES = {getattr(onnx.TensorProto, t) for t in ("FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16", "INT8", "INT16",
                                                       "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")}


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    if any(d < 0 for d in tensor.dims):
        return None
    try:
        return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _external_to_stubs(model: onnx.ModelProto, external: list[onnx.TensorProto], base: Path, source: Path) -> None:
    """External data (already checked to lie inside the model's folder) becomes stubs reading it."""
    for tensor in external:
        info = {entry.key: entry.value for entry in tensor.external_data}
        target = (base / info["location"]).resolve()
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else target.stat().st_size - offset
        want = _expected_bytes(tensor)
        lazy = tensor.data_type in _LAZY_TYPES and want is not None
        if lazy and length != want:
            raise ModelSqueezeError(
                f"{source}: invalid ONNX model: tensor {tensor.name!r} holds {length} bytes of external data, "
                f"its dims {list(tensor.dims)} declare {want}"
            )
        store.make_stub(tensor, store.FileRange(target, offset, length))
        if not lazy:  # an exotic type: read now, into raw_data, and checked like any inline tensor
            store.materialize(tensor)
    # Only initializers stay on disk; Constant-node values and sparse initializers are read now.
    for tensor in store.non_initializers(model):
        if store.is_stub(tensor):
            store.materialize(tensor)


_FOUR_BIT_TYPES = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, t)}
_TYPED_FIELDS = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
                 onnx.TensorProto.FLOAT16: "int32_data"}


def check_tensor_sizes(model: onnx.ModelProto, source: Path | str) -> None:
    """Every tensor's data holds exactly what its dims declare. onnx.checker refuses data that is
    too short; data that is too long would fail later in a reshape, so it is refused here too."""
    for tensor in iter_all_tensors(model):
        if uses_external_data(tensor) or tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        n = math.prod(tensor.dims)  # Python ints: an absurd product cannot overflow
        raw = len(tensor.raw_data)
        if raw:
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, ValueError, TypeError):
                continue  # a type this tool never reads
            need = (n + 1) // 2 if tensor.data_type in _FOUR_BIT_TYPES else n * itemsize
            if raw != need:
                raise ModelSqueezeError(
                    f"{source}: invalid ONNX model: tensor {tensor.name!r} holds {raw} bytes of data, "
                    f"its dims {list(tensor.dims)} declare {need}"
                )
        elif tensor.data_type in _TYPED_FIELDS:
            held = len(getattr(tensor, _TYPED_FIELDS[tensor.data_type]))
            if held and held != n:
                raise ModelSqueezeError(
                    f"{source}: invalid ONNX model: tensor {tensor.name!r} holds {held} values, "
                    f"its dims {list(tensor.dims)} declare {n}"
                )


def check_model(model: onnx.ModelProto, source: Path | str, full: bool = False) -> None:
    """onnx.checker, with its long message cut to the line that says what is wrong."""
    try:
        if store.has_stubs(model):
            _check_with_stubs(model, full)
        elif tensor_bytes(model) < PROTOBUF_LIMIT_BYTES:
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "invalid")
        raise ModelSqueezeError(f"{source}: invalid ONNX model: {first}") from None
    except UnicodeDecodeError:
        raise ModelSqueezeError(f"{source}: invalid ONNX model: a name or string is not valid UTF-8") from None


def _check_with_stubs(model: onnx.ModelProto, full: bool) -> None:
    """onnx.checker on a model whose big weights are stubs: they are shown to it as external data
    in a sparse file (nothing read, nothing in memory) beside a copy of the graph in a temporary
    folder, and the checker is given that file (so it resolves them there: no change of the
    process's working folder)."""
    with writing(tempfile.gettempdir(), "a temporary copy of the model for onnx's checker"), \
            tempfile.TemporaryDirectory(prefix="modelsqueeze-check-") as folder:
        checked = store.checkable(model, folder)
        if sum(store.stored_bytes(t) for t in iter_all_tensors(checked) if not uses_external_data(t)) >= PROTOBUF_LIMIT_BYTES:
            return
        path = Path(folder) / "model.onnx"
        path.write_bytes(checked.SerializeToString())
        onnx.checker.check_model(str(path), full_check=full)


# Bytes on disk of models already parsed, by (path, mtime, size): `model_file_bytes` of a model this
# process loaded need not read and parse it again (a second copy of a big model in memory).
_FILE_BYTES: dict[tuple[str, int, int], int] = {}


def _disk_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


def _file_bytes(path: Path, tensors: Iterable[onnx.TensorProto]) -> int:
    locations = {entry.value for t in tensors for entry in t.external_data if entry.key == "location"}
    extra = (path.parent / loc for loc in locations)
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


def model_file_bytes(path: Path) -> int:
    """Bytes on disk of a model file plus the external data files it names."""
    path = Path(path)
    key = _disk_key(path)
    if key not in _FILE_BYTES:
        model = parse_model(read_model_bytes(path), path)
        _FILE_BYTES[key] = _file_bytes(path, (t for t in iter_all_tensors(model) if uses_external_data(t)))
    return _FILE_BYTES[key]


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def check_external_location(tensor: onnx.TensorProto, base: Path, source: Path) -> None:
    """Refuse external data that escapes the model's folder or is not there."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    what = f"{source}: tensor {tensor.name!r} external data {location!r}"
    if not location:
        raise ModelSqueezeError(f"{what}: no location given")
    if "\0" in location:
        raise ModelSqueezeError(f"{what}: refused, the location holds a NUL byte")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or ".." in rel.parts or ".." in location.split("\\"):
        raise ModelSqueezeError(f"{what}: refused, the path leaves the model's folder")
    target = (base / rel).resolve()
    if base != target and base not in target.parents:
        raise ModelSqueezeError(f"{what}: refused, it resolves outside the model's folder (symlink?)")
    if not target.exists():
        raise ModelSqueezeError(f"{what}: file is missing")
    if not target.is_file():
        raise ModelSqueezeError(f"{what}: is {kind_of(target.stat().st_mode)}, not a regular file")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else target.stat().st_size - offset
    except ValueError:
        raise ModelSqueezeError(f"{what}: offset or length is not a number") from None
    if offset < 0 or length < 0 or offset + length > target.stat().st_size:
        raise ModelSqueezeError(f"{what}: bytes {offset}..{offset + length} lie beyond the end of the file")


# ----------------------------------------------------------------------------------------------
# Walking the graph


def iter_graphs(graph: onnx.GraphProto, path: str = "") -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graph and every subgraph (If/Loop/Scan bodies), each with its path."""
    yield path, graph
    for node_index, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for i, sub in enumerate(subs):
                label = f"{node_name(node, node_index)}/{attr.name}" + (f"[{i}]" if len(subs) > 1 else "")
                yield from iter_graphs(sub, f"{path}/{label}" if path else label)


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can carry data: initializers and node attributes, in all graphs."""
    for _, graph in iter_graphs(model.graph):
        yield from graph.initializer
    yield from store.non_initializers(model)


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def holds_subgraph(node: onnx.NodeProto) -> bool:
    """Whether the node carries a subgraph (If branches, Loop/Scan bodies)."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def pin_labels(model: onnx.ModelProto) -> None:
    """Name each unnamed node that holds a subgraph by the label it has now ("If_2"). The keys of
    the weights inside ("If_2/else_branch/W") come from that label, and the forms this tool puts
    into a graph (and takes out) move nodes: an index-based label would then point elsewhere."""
    for _, graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if not node.name and holds_subgraph(node):
                node.name = node_name(node, index)


def unpin_labels(model: onnx.ModelProto) -> None:
    """Undo `pin_labels` where the label needs no pinning: a node holding a subgraph whose name is
    the label its place in the graph gives anyway goes back to unnamed (the file stays the
    original's where the tool added nothing before it)."""
    for _, graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if node.name == f"{node.op_type}_{index}" and holds_subgraph(node):
                node.ClearField("name")


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), shape)
    dense[flat] = values
    return dense.reshape(shape)


def _consumer_axes(node: onnx.NodeProto, index: int, rank: int) -> tuple[str, int | None, int | None]:
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Gemm":
        if index == 1:  # B is K x N, or N x K with transB
            return ("weight", 0, 1) if attrs.get("transB", 0) else ("weight", 1, 0)
        if index == 0:  # a constant A is M x K (K x M with transA): its rows are the outputs
            return ("weight", 1, 0) if attrs.get("transA", 0) else ("weight", 0, 1)
        return ("bias", rank - 1 if rank else None, None)
    if op == "MatMul":
        if rank < 2:
            return ("weight", None, 0 if rank == 1 else None)
        return ("weight", rank - 1, rank - 2) if index == 1 else ("weight", rank - 2, rank - 1)
    if op == "Gather" and index == 0 and attrs.get("axis", 0) == 0:
        return ("embedding", 0, None)
    return _WEIGHT_INPUTS.get((op, index), ("other", None, None))


# Ops that only move, cut, join or retype a tensor's values: a weight read through them (PyTorch
# reorders LSTM gates with Slice → Concat → Unsqueeze) is still that node's weight. The value is the
# data inputs they pass on (Concat: all of them).
_SHAPE_ONLY_INPUTS = {"Cast": (0,), "Identity": (0,), "Slice": (0,), "Concat": None, "Split": (0,),
                      "Unsqueeze": (0,), "Squeeze": (0,), "Transpose": (0,), "Reshape": (0,), "Flatten": (0,)}


@dataclass(frozen=True)
class _Alias:
    """A value computed from a stored tensor by shape-only ops: which tensor, through which ops,
    and for each axis of the value, the tensor's axis it comes from (None: unknown or new)."""

    key: str
    via: tuple[str, ...]
    axes: tuple[int | None, ...]


def _int_list(name: str, ints: dict[str, list[int]], node: onnx.NodeProto, attr: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == attr:
            return list(a.ints)
    return ints.get(name) if name else None


def _through(node: onnx.NodeProto, axes: tuple[int | None, ...], ints: dict[str, list[int]]) -> tuple[int | None, ...] | None:
    """The axis map of a shape-only node's output from its data input's (None: rank unknown)."""
    op = node.op_type
    if op in ("Cast", "Identity", "Slice", "Concat", "Split"):
        return axes
    if op == "Transpose":
        perm = _int_list("", ints, node, "perm") or list(reversed(range(len(axes))))
        return tuple(axes[p] if 0 <= p < len(axes) else None for p in perm)
    if op in ("Unsqueeze", "Squeeze"):
        given = _int_list(node.input[1] if len(node.input) > 1 else "", ints, node, "axes")
        if given is None:
            return None
        if op == "Unsqueeze":
            rank = len(axes) + len(given)
            inserted = {a % rank for a in given}
            rest = iter(axes)
            return tuple(None if a in inserted else next(rest, None) for a in range(rank))
        removed = {a % max(len(axes), 1) for a in given}
        return tuple(a for i, a in enumerate(axes) if i not in removed)
    return None  # Reshape, Flatten: the axes are regrouped


def find_weights(model: onnx.ModelProto) -> list[WeightInfo]:
    """Every float tensor held in the model (initializers, Constant nodes, subgraphs), with its
    consumers and layout, in the order the graph first uses them. Names resolve by scope, so a
    subgraph that reads an outer initializer is one of that initializer's consumers; a tensor read
    through shape-only ops (Slice, Concat, Unsqueeze, Transpose, Cast, ...) has the node after them
    as its consumer, with its axes mapped back through them."""
    found: dict[str, WeightInfo] = {}
    uses: dict[str, list[tuple[onnx.NodeProto, str, int, tuple[str, ...], tuple[int | None, ...] | None]]] = {}

    def walk(graph: onnx.GraphProto, path: str, scope: dict[str, object], ints: dict[str, list[int]],
             bound: dict[str, list[_Alias]] | None = None) -> None:
        scope, ints = dict(scope), dict(ints)
        for inp in graph.input:
            scope[inp.name] = (bound or {}).get(inp.name)
            ints.pop(inp.name, None)
        for tensor in graph.initializer:
            _add(found, tensor.name, path, "initializer", tensor)
            scope[tensor.name] = _key(path, tensor.name)
            if tensor.data_type == onnx.TensorProto.INT64 and len(tensor.dims) <= 1 and not store.is_stub(tensor):
                ints[tensor.name] = [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
        for sparse in graph.sparse_initializer:
            _add(found, sparse.values.name, path, "sparse_initializer", sparse)
            scope[sparse.values.name] = _key(path, sparse.values.name)
        for node_index, node in enumerate(graph.node):
            label = node_name(node, node_index)
            qualified = _key(path, label)
            passes_on = node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_ONLY_INPUTS
            data_inputs = _SHAPE_ONLY_INPUTS.get(node.op_type) if passes_on else ()
            carried: list[_Alias] = []
            into_body = _loop_invariants(node)
            bound: dict[str, list[_Alias]] = {}
            for i, name in enumerate(node.input):
                target = scope.get(name)
                if target is None:
                    continue
                aliases = target if isinstance(target, list) else [
                    _Alias(target, (), tuple(range(len(found[target].shape)))) if target in found else None]
                for alias in aliases:
                    if alias is None:
                        continue
                    if i in into_body:  # the body reads it unchanged every iteration: its readers there use it
                        bound.setdefault(into_body[i], []).append(_Alias(alias.key, alias.via + ("Loop",), alias.axes))
                    elif passes_on and (data_inputs is None or i in data_inputs):
                        mapped = _through(node, alias.axes, ints)
                        carried.append(_Alias(alias.key, alias.via + (node.op_type,), mapped if mapped is not None else ()))
                    else:
                        uses.setdefault(alias.key, []).append((node, qualified, i, alias.via, alias.axes))
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for j, sub in enumerate(subs):
                    sub_label = f"{label}/{attr.name}" + (f"[{j}]" if len(subs) > 1 else "")
                    walk(sub, f"{path}/{sub_label}" if path else sub_label, scope, ints, bound)  # bound: a Loop's only
            const = _constant_tensor(node)
            for out in node.output:
                scope[out] = carried or None
                ints.pop(out, None)
            if const is not None and node.output:
                _add(found, node.output[0], path, "constant", const)
                scope[node.output[0]] = _key(path, node.output[0])
                if const.data_type == onnx.TensorProto.INT64 and len(const.dims) <= 1:
                    ints[node.output[0]] = [int(v) for v in numpy_helper.to_array(const).reshape(-1)]

    walk(model.graph, "", {}, {})
    # Graph order: by first use (uses fills in node order), unused tensors last.
    first_use = {key: i for i, key in enumerate(uses)}
    weights = []
    for key, info in sorted(found.items(), key=lambda item: first_use.get(item[0], len(first_use))):
        seen = uses.get(key, ())
        consumers = tuple(Consumer(label, node.op_type, i, ">".join(via)) for node, label, i, via, _ in seen)
        layouts = set()
        for node, _, i, via, axes in seen:
            role, channel, reduction = _consumer_axes(node, i, len(axes) if axes else len(info.shape))
            if via:  # the consumer's axes, mapped back to the stored tensor's (None where they are lost)
                channel, reduction = (axes[a] if axes and a is not None and a < len(axes) else None
                                      for a in (channel, reduction))
            layouts.add((role, channel, reduction))
        role = max((r for r, _, _ in layouts), key=_ROLE_RANK.__getitem__, default="other")
        axes = {(c, r) for rl, c, r in layouts if rl == role}
        channel_axis, reduction_axis = axes.pop() if len(axes) == 1 else (None, None)
        info.consumers, info.role = consumers, role
        info.channel_axis, info.reduction_axis = channel_axis, reduction_axis
        weights.append(info)
    return weights


def _loop_invariants(node: onnx.NodeProto) -> dict[int, str]:
    """For a Loop, its loop-carried inputs that the body passes on unchanged (as the body output
    of the same position, directly or through Identity): input index -> the body input's name.
    tf2onnx feeds a Keras LSTM's weights to its while-loop this way, so the body's MatMuls are
    their real readers."""
    if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
        return {}
    body = next((a.g for a in node.attribute if a.name == "body" and a.type == onnx.AttributeProto.GRAPH), None)
    if body is None:
        return {}
    copies = {n.output[0]: n.input[0] for n in body.node if n.op_type == "Identity" and n.input and n.output}
    found = {}
    # Loop inputs: M, cond, then the carried values; body inputs: iteration, cond, carried;
    # body outputs: cond, carried, then scan outputs.
    for c in range(min(len(node.input), len(body.input)) - 2):
        name = body.input[2 + c].name
        if 1 + c >= len(body.output) or not name:
            continue
        out = body.output[1 + c].name
        for _ in range(len(copies) + 1):
            if out == name or out not in copies:
                break
            out = copies[out]
        if out == name:
            found[2 + c] = name
    return found


def _key(path: str, name: str) -> str:
    return name if not path else f"{path}/{name}"


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _add(found: dict, name: str, path: str, source: str, proto) -> None:
    tensor = proto.values if isinstance(proto, onnx.SparseTensorProto) else proto
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        return  # integer, bool, string and exotic float tensors are not weights we transform
    shape = tuple(proto.dims)
    found[_key(path, name)] = WeightInfo(
        name=name, graph=path, source=source, shape=shape, dtype=dtype, consumers=(),
        role="other", channel_axis=None, reduction_axis=None, proto=proto,
    )


def fixed_basis(info: WeightInfo) -> str:
    """Why `info` looks like a fixed signal-processing basis rather than a learned weight ("" if it
    does not): the weight of Conv or MatMul/Gemm nodes, at least 8 filters of at least 32 taps, nine in ten
    of which hold 80% or more of their energy within two bins of one frequency, over at least half
    as many distinct frequencies as filters (an STFT/CQT/DFT basis: windowed sinusoids). Learned
    filters of that length spread their energy (at most 45% on the corpus models)."""
    if info.role != "weight" or not info.consumers or len({(c.op, c.input_index) for c in info.consumers}) != 1 \
            or info.consumers[0].op not in ("Conv", "MatMul", "Gemm"):
        return ""  # (a basis may be shared: basic-pitch's CQT kernels feed one Conv per octave)
    consumer, shape = info.consumers[0], info.shape
    if len(shape) < 2 or info.n_params > 2**21:
        return ""
    if consumer.op == "Conv":
        count, taps = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    elif consumer.op == "Gemm" and info.channel_axis == 0:  # transB: rows are the filters
        count, taps = shape[0], shape[1]
    else:  # x @ W: each output is a column
        count, taps = shape[-1], shape[-2]
    if count < 8 or taps < 32 or (consumer.op != "Conv" and len(shape) != 2):
        return ""
    array = info.array().astype(np.float64)
    if not np.isfinite(array).all():
        return ""  # NaN/Inf weights are left alone anyway (finite_only), with their own note
    filters = array.reshape(count, taps) if consumer.op == "Conv" or (consumer.op == "Gemm" and info.channel_axis == 0) \
        else array.T
    power = np.abs(np.fft.rfft(filters, axis=1)) ** 2
    total = power.sum(axis=1)
    live = total > 0
    if live.sum() < 8:
        return ""
    power, total = power[live], total[live]
    peaks = power.argmax(axis=1)
    padded = np.pad(power, ((0, 0), (2, 2)))
    near = sum(padded[np.arange(len(peaks)), peaks + 2 + d] for d in range(-2, 3)) / total
    if np.quantile(near, 0.1) < 0.8 or len(set(peaks.tolist())) < len(peaks) / 2:
        return ""
    return (f"a fixed signal-processing basis, not a learned weight: each of its {int(live.sum())} filters of "
            f"{taps} taps is a windowed sinusoid ({np.quantile(near, 0.1):.0%} or more of the energy of nine in "
            f"ten within two bins of one frequency, {len(set(peaks.tolist()))} distinct frequencies)")


def select_weights(
    weights: Iterable[WeightInfo],
    layers: Iterable[str] = (),
    exclude: Iterable[str] = (),
    min_params: int = 0,
    roles: Iterable[str] | None = COMPRESSIBLE_ROLES,
) -> list[WeightInfo]:
    """The shared --layers / --exclude / --min-params filter. Globs match the tensor's name, its
    subgraph-qualified key, or the name of any node that consumes it."""
    layers, exclude = list(layers), list(exclude)
    roles = None if roles is None else set(roles)

    def matches(info: WeightInfo, patterns: list[str]) -> bool:
        names = [info.name, info.key, *(c.node for c in info.consumers)]
        names += [c.node.rsplit("/", 1)[-1] for c in info.consumers]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)

    chosen = []
    for info in weights:
        if roles is not None and info.role not in roles and not (layers and matches(info, layers)):
            continue
        if layers and not matches(info, layers):
            continue
        if exclude and matches(info, exclude):
            continue
        if info.n_params < min_params:
            continue
        chosen.append(info)
    return chosen


# ----------------------------------------------------------------------------------------------
# Hashing and saving


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model holds (raw and typed fields, stubs' sources), without
    serialising it."""
    return sum(store.stored_bytes(t) for t in iter_all_tensors(model))


def graph_hash(model: onnx.ModelProto) -> bytes:
    """SHA-256 binding a sidecar to its graph: the model with every initializer removed, so the
    skeleton (graph minus sidecar-backed initializers) and the full graph hash alike."""
    bare = onnx.ModelProto()
    try:
        _copy_fields(model, bare, skip=("graph",))
        _copy_fields(model.graph, bare.graph, skip=("initializer", "sparse_initializer"))  # no copy of the weights
    except UnicodeDecodeError:  # protobuf decodes a string field when it is read
        raise ModelSqueezeError("invalid ONNX model: a name or string is not valid UTF-8") from None
    for _, graph in iter_graphs(bare.graph):
        graph.ClearField("initializer")
        graph.ClearField("sparse_initializer")
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).digest()


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of message `src` into `dst` except those named in `skip`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def check_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output that would overwrite an input, or an existing file without --force."""
    path = Path(path)
    for inp in inputs:
        if Path(inp).exists() and path.exists() and path.resolve() == Path(inp).resolve():
            raise ModelSqueezeError(f"{path}: refusing to overwrite the input file")
    if path.is_dir():
        raise ModelSqueezeError(f"{path}: is a directory, give an output file name")
    if path.exists() and not force:
        raise ModelSqueezeError(f"{path}: already exists (use --force to overwrite)")
    if not path.parent.exists():
        raise ModelSqueezeError(f"{path}: folder {path.parent} does not exist")
    check_writable_folder(path)


def check_writable_folder(path: Path) -> None:
    """Refuse, before any work, an output whose folder does not take new files (read-only, a
    pseudo file system): the atomic write makes a temporary file there, so try exactly that."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".probe", dir=Path(path).parent)
    except OSError as exc:
        raise ModelSqueezeError(f"{path}: cannot write in {Path(path).parent} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    with writing(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def model_to_bytes(model: onnx.ModelProto) -> bytes:
    """The serialized model, stubs resolved (so: the whole model in memory; writers of big models
    use `save_model`, which streams)."""
    return store.resolved(model).SerializeToString(deterministic=True)


def check_data_file(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model file whose external data file (`NAME.data` beside it) is one the model's
    weights are still read from."""
    data = Path(path).parent / f"{Path(path).name}.data"
    if data.resolve() in store.files(model):
        raise ModelSqueezeError(f"{path}: its data file {data.name} is the input's external data; choose another output name")


def save_model(
    model: onnx.ModelProto, path: Path, limit_bytes: int | None = None, inline_below_bytes: int = 1024
) -> None:
    """Write atomically. A model too big for one protobuf keeps its tensors of `inline_below_bytes`
    or more in `NAME.data` beside it, written tensor by tensor (never all in memory)."""
    with writing(path):
        _save_model(model, Path(path), limit_bytes, inline_below_bytes)


def _save_model(model: onnx.ModelProto, path: Path, limit_bytes: int | None, inline_below_bytes: int) -> None:
    if tensor_bytes(model) < (PROTOBUF_LIMIT_BYTES if limit_bytes is None else limit_bytes):

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                store.serialize_to(model, handle.write)  # model_to_bytes(model), a tensor at a time

        atomic_write(path, write)
        return
    data_name = f"{path.name}.data"
    check_data_file(model, path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        staged, staged_data = Path(tmp_dir) / path.name, Path(tmp_dir) / data_name
        bare = onnx.ModelProto()
        bare.CopyFrom(model)  # stubs and small tensors: cheap
        with open(staged_data, "wb") as data:
            for graph in store.iter_graphs(bare.graph):
                for tensor in graph.initializer:
                    if store.stored_bytes(tensor) < inline_below_bytes or tensor.data_type == onnx.TensorProto.STRING:
                        if store.is_stub(tensor):
                            store.materialize(tensor)
                        continue
                    raw = store.raw_bytes(tensor)
                    offset = data.tell()
                    data.write(memoryview(raw))
                    del raw
                    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                        tensor.ClearField(field)
                    del tensor.external_data[:]
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
        staged.write_bytes(bare.SerializeToString(deterministic=True))
        for done in (staged, staged_data):
            os.chmod(done, 0o666 & ~_umask())
        # The old model goes before the new data arrives: a kill never leaves an old model
        # reading a new data file (at worst, no model at the destination).
        path.unlink(missing_ok=True)
        os.replace(staged_data, path.parent / data_name)
        os.replace(staged, path)
