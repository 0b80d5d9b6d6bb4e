"""How a compressed record appears in the ONNX graph: a dense initializer, or a native compact form
built from standard ops, whichever is smaller: sparse as ScatterElements of the non-zeros into
zeros, weight sharing as Gather(codebook, Cast(uint8/uint16 indices)), or both together, linear
quantization as DequantizeLinear of int8/uint8/int4/uint4 codes.

Every form of tensor NAME owns the nodes named `msq/NAME/<step>` (one of FORM_STEPS) and the
initializers they read, or the initializer `NAME` itself; `remove` deletes exactly those, so a
graph can be re-rendered or turned back into plain dense weights. The tensors a form adds are named
`NAME::<part>`, with more colons where the model already has a name of that shape (PyTorch names
tensors `onnx::LSTM_209`): no name the tool adds is one the model has.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelsqueeze import store
from modelsqueeze.kernels.quant import qrange
from modelsqueeze.tensor import FLOAT_DTYPES, CompressedTensor

AUX = "::"  # separates a tensor's name from its form's own tensors (repeated as needed: see form_tag)
FORM_STEPS = ("cast", "gather", "zeros", "scatter", "reshape", "dequantize")


def node_prefix(name: str) -> str:
    return f"msq/{name}/"


def form_nodes(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    """The nodes of `name`'s form: exactly the names this module gives them."""
    names = {node_prefix(name) + step for step in FORM_STEPS}
    return [n for n in graph.node if n.name in names and n.domain in ("", "ai.onnx")]


def owned_initializers(graph: onnx.GraphProto, *names: str) -> set[str]:
    """The initializers that belong to the forms of `names`: each name itself, or those its form's
    nodes read (one pass over the graph, however many names)."""
    inits = {t.name for t in graph.initializer}
    wanted = set(names)
    owned = wanted & inits
    for node in graph.node:
        step = node.name.rsplit("/", 1)
        if len(step) == 2 and step[1] in FORM_STEPS and step[0].startswith("msq/") and step[0][4:] in wanted \
                and node.domain in ("", "ai.onnx"):
            owned.update(i for i in node.input if i in inits)
    return owned


def form_tag(graph: onnx.GraphProto, name: str) -> str:
    """The prefix of the tensors `name`'s form adds: `NAME::`, or `NAME:::` and so on until no
    name in the graph (other than the current form's own) starts with it."""
    own = owned_initializers(graph, name) | {o for n in form_nodes(graph, name) for o in n.output}
    taken = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    taken |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    taken |= {x for n in graph.node for x in (*n.input, *n.output)}
    taken -= own
    sep = AUX
    while any(t.startswith(name + sep) for t in taken):
        sep += ":"
    return name + sep


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def remove(graph: onnx.GraphProto, name: str) -> None:
    """Delete whatever currently defines tensor `name`: its form's nodes and initializers, a
    Constant node producing it, a sparse initializer of that name."""
    owned = owned_initializers(graph, name)
    doomed = form_nodes(graph, name) + [n for n in graph.node if n.op_type == "Constant" and list(n.output) == [name]]
    for node in doomed:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name in owned]:
        graph.initializer.remove(tensor)
    for sparse in [t for t in graph.sparse_initializer if t.values.name == name]:
        graph.sparse_initializer.remove(sparse)


def declared_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor the graph defines as a weight (see `declared`)."""
    return {name: shape for name, (shape, _) in declared(graph).items()}


def dtype_name(data_type: int) -> str | None:
    """The numpy name of an ONNX element type, or None for one numpy has no dtype for."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).name
    except (KeyError, TypeError, ValueError):
        return None


def declared(graph: onnx.GraphProto) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """The shape and dtype (numpy name; None where the graph does not say) of every tensor the
    graph defines as a weight, from its definition alone (no weight is read): an initializer's or
    sparse initializer's dims, a Constant's tensor, and the output of each form above (Reshape to a
    constant shape, DequantizeLinear of a code tensor, Gather of a 1-D codebook by a code tensor,
    possibly through a Cast, and a Cast of any of these)."""
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    shapes.update((t.values.name, tuple(t.dims)) for t in graph.sparse_initializer)
    dtypes = {t.name: dtype_name(t.data_type) for t in graph.initializer}
    dtypes.update((t.values.name, dtype_name(t.values.data_type)) for t in graph.sparse_initializer)
    constants = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1
                 and not store.is_stub(t)}
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if len(node.output) != 1:
            continue
        out, inputs = node.output[0], list(node.input)
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if value is not None:
                shapes[out], dtypes[out] = tuple(value.dims), dtype_name(value.data_type)
        elif node.op_type == "Reshape" and len(inputs) == 2 and inputs[1] in constants:
            shape = tuple(int(d) for d in numpy_helper.to_array(constants[inputs[1]]))
            if all(d > 0 for d in shape):
                shapes[out], dtypes[out] = shape, dtypes.get(inputs[0])
        elif node.op_type == "ScatterElements" and len(inputs) == 3:
            dtypes[out] = dtypes.get(inputs[2])
        elif node.op_type == "DequantizeLinear" and len(inputs) >= 2 and inputs[0] in shapes:
            shapes[out], dtypes[out] = shapes[inputs[0]], dtypes.get(inputs[1])
        elif node.op_type == "Gather" and len(inputs) == 2 and len(shapes.get(inputs[0], ())) == 1:
            codes = inputs[1]
            cast = producer.get(codes)
            if cast is not None and cast.op_type == "Cast":
                codes = cast.input[0]
            if codes in shapes:
                shapes[out], dtypes[out] = shapes[codes], dtypes.get(inputs[0])
        elif node.op_type == "Cast" and inputs and inputs[0] in shapes:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            shapes[out], dtypes[out] = shapes[inputs[0]], (dtype_name(to) if to is not None else None)
    return {name: (shape, dtypes.get(name)) for name, shape in shapes.items()}


def _lazy(name: str, dtype: np.dtype, shape: tuple[int, ...], make) -> onnx.TensorProto:
    """An initializer of `dtype` and `shape` whose value `make()` computes: now when it is small,
    when it is read (written, run) when it is big. Rendering a record is then nearly free: a form
    that is not chosen, or a graph only measured and checked, never builds its arrays."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < store.MIN_BYTES:
        return numpy_helper.from_array(np.asarray(make(), dtype).reshape(shape), name)
    return store.lazy_tensor(name, dtype, shape, store.Held(lambda: np.asarray(make(), dtype).reshape(shape), nbytes))


def _dense(name: str, record: CompressedTensor) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The decoded tensor as an initializer."""
    return [_lazy(name, record.dtype, record.shape, record.decode)], []


def _index_dtype(n_codes: int) -> type:
    return np.uint8 if n_codes <= 256 else np.uint16


def _gathered(name: str, tag: str, record: CompressedTensor, out: str, shape: tuple[int, ...], codebook: np.ndarray,
              indices) -> tuple[list, list]:
    """`out` = Gather(codebook, Cast(indices)) with indices of `shape`, in the smallest unsigned
    type; `indices()` gives them."""
    prefix = node_prefix(name)
    inits = [
        numpy_helper.from_array(codebook.astype(record.dtype), f"{tag}codebook"),
        _lazy(f"{tag}indices", _index_dtype(codebook.size), shape, indices),
    ]
    nodes = [
        helper.make_node("Cast", [f"{tag}indices"], [f"{tag}indices_i64"], name=prefix + "cast",
                         to=onnx.TensorProto.INT64),
        helper.make_node("Gather", [f"{tag}codebook", f"{tag}indices_i64"], [out], name=prefix + "gather", axis=0),
    ]
    return inits, nodes


def _gather(name: str, tag: str, record: CompressedTensor) -> tuple[list, list]:
    """Every element as a code: pruned zeros get code 0 of a codebook with 0.0 prepended."""
    codebook = record.codebook
    if record.positions is None:
        return _gathered(name, tag, record, name, record.shape, codebook, lambda: record.indices)

    def codes() -> np.ndarray:
        dense = np.zeros(record.n_params, _index_dtype(codebook.size + 1))  # 1-2 bytes a weight
        dense[record.positions] = record.indices.astype(dense.dtype) + dense.dtype.type(1)
        return dense

    return _gathered(name, tag, record, name, record.shape, np.concatenate([np.zeros(1, codebook.dtype), codebook]), codes)


def _scatter(name: str, tag: str, record: CompressedTensor) -> tuple[list, list]:
    """Non-zeros scattered into a flat zero tensor, then reshaped: 4-byte positions + the values
    (or, for a shared codebook, Gather of the stored entries' codes)."""
    n = record.n_params
    index_dtype = np.int32 if n < 2**31 else np.int64
    if record.codebook is not None:
        inits, nodes = _gathered(name, tag, record, f"{tag}values", (record.n_stored,), record.codebook,
                                 lambda: record.indices)
    else:
        inits, nodes = [_lazy(f"{tag}values", record.dtype, (record.n_stored,), record.stored_values)], []
    inits += [
        _lazy(f"{tag}positions", index_dtype, (record.n_stored,), lambda: record.positions.astype(index_dtype)),
        numpy_helper.from_array(np.array([n], np.int64), f"{tag}size"),
        numpy_helper.from_array(np.array(record.shape, np.int64), f"{tag}shape"),
    ]
    zero = numpy_helper.from_array(np.zeros(1, record.dtype))
    prefix = node_prefix(name)
    nodes += [
        helper.make_node("ConstantOfShape", [f"{tag}size"], [f"{tag}zeros"], name=prefix + "zeros", value=zero),
        helper.make_node("ScatterElements", [f"{tag}zeros", f"{tag}positions", f"{tag}values"],
                         [f"{tag}flat"], name=prefix + "scatter", axis=0),
        helper.make_node("Reshape", [f"{tag}flat", f"{tag}shape"], [name], name=prefix + "reshape"),
    ]
    return inits, nodes


def _int_tensor(name: str, shape: tuple[int, ...], bits: int, signed: bool, make) -> onnx.TensorProto:
    """Integer codes (`make()` gives them) as an ONNX tensor: 4-bit types packed two to a byte
    (low nibble first, as ONNX stores INT4/UINT4), otherwise the smallest 8/16-bit type."""
    if bits > 4:
        dtype = (np.int8 if signed else np.uint8) if bits <= 8 else (np.int16 if signed else np.uint16)
        return _lazy(name, dtype, shape, lambda: make().astype(dtype))

    def packed() -> np.ndarray:
        nibbles = (make().reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        return nibbles[0::2] | (nibbles[1::2] << 4)

    data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    nbytes = (math.prod(shape) + 1) // 2
    if nbytes < store.MIN_BYTES:
        tensor = onnx.TensorProto(name=name, dims=list(shape), data_type=data_type)
        tensor.raw_data = packed().tobytes()
        return tensor
    return store.lazy_tensor(name, np.uint8, shape, store.Held(packed, nbytes), data_type=data_type)


def _dequantize(name: str, tag: str, record: CompressedTensor, model_opset: int) -> tuple[list, list] | None:
    """DequantizeLinear of the integer codes (pruned entries hold the zero point, so they give 0):
    per tensor from opset 10, per axis from 13, 4-bit and block-wise from 21; else None."""
    bits = record.index_bits
    need = 21 if (bits <= 4 and model_opset >= 21) or record.block_size else 13 if record.quant_axis is not None else 10
    if record.dtype not in FLOAT_DTYPES or model_opset < need or bits > 16 or (bits > 8 and model_opset < 21):
        return None
    qmin = qrange(bits, record.signed)[0]
    zero_point = record.zero_point.astype(np.int64)

    def codes() -> np.ndarray:
        dense = record.layout.expand(zero_point.astype(np.int32)).reshape(-1).copy()
        stored = slice(None) if record.positions is None else record.positions
        dense[stored] = record.indices.astype(np.int32) + qmin
        return dense.reshape(record.shape)

    container = bits if (bits <= 4 and model_opset >= 21) else max(bits, 8)
    inits = [
        _int_tensor(f"{tag}q", record.shape, container, record.signed, codes),
        numpy_helper.from_array(record.scale.astype(np.float32), f"{tag}scale"),
        _int_tensor(f"{tag}zero_point", record.scale.shape, container, record.signed,
                    lambda: zero_point.reshape(record.scale.shape)),
    ]
    attrs = {}
    if record.quant_axis is not None:
        attrs["axis"] = record.quant_axis
    if record.block_size:
        attrs["block_size"] = record.block_size
    if record.dtype == "float32":
        node = helper.make_node("DequantizeLinear", [t.name for t in inits], [name], name=node_prefix(name) + "dequantize", **attrs)
        return inits, [node]
    # float16/float64 weights: the float32 product rounded to the weight's type, as the record
    # decodes (DequantizeLinear gives float32 at every opset this form uses)
    wide = helper.make_node("DequantizeLinear", [t.name for t in inits], [f"{tag}wide"], name=node_prefix(name) + "dequantize",
                            **attrs)
    cast = helper.make_node("Cast", [f"{tag}wide"], [name], name=node_prefix(name) + "cast",
                            to=helper.np_dtype_to_tensor_dtype(np.dtype(record.dtype)))
    return inits, [wide, cast]


def _size(form: tuple[list, list]) -> int:
    return sum(store.inline_size(t) for t in form[0]) + sum(n.ByteSize() for n in form[1])


def choose(name: str, record: CompressedTensor, model_opset: int, dense: bool = False, tag: str | None = None):
    """The smallest form this record can take at this opset (dense when asked); the tensors a
    compact form adds are named `tag + part` (`form_tag`)."""
    forms = [_dense(name, record)]
    if dense:
        return forms[0]
    tag = name + AUX if tag is None else tag
    # ScatterElements needs opset 11; a 0-d tensor has nothing to scatter into.
    if record.positions is not None and model_opset >= 11 and record.shape:
        forms.append(_scatter(name, tag, record))
    if record.codebook is not None and record.codebook.size + (record.positions is not None) <= 2**16:
        forms.append(_gather(name, tag, record))
    if record.scale is not None:
        forms += [f for f in [_dequantize(name, tag, record, model_opset)] if f is not None]
    return min(forms, key=_size)


def emit(graph: onnx.GraphProto, name: str, record: CompressedTensor, model_opset: int, dense: bool = False) -> None:
    """Replace whatever defines `name` in `graph` by the record's chosen form. A dense initializer
    keeps its place in the initializer list; form nodes go first in the graph (they read only
    initializers, so topological order holds)."""
    inits, nodes = choose(name, record, model_opset, dense, None if dense else form_tag(graph, name))
    position = next((i for i, t in enumerate(graph.initializer) if t.name == name), None)
    remove(graph, name)
    if position is not None and len(inits) == 1 and not nodes:
        graph.initializer.insert(position, inits[0])
    else:
        graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    # A record's tensor is no longer listed among the graph inputs (as old exporters list every
    # initializer): nodes that compute it could not share its name with an input, and the logical
    # model, the file and the pack all agree on it whatever form it takes.
    mirror = next((i for i, v in enumerate(graph.input) if v.name == name), None)
    if mirror is not None:
        del graph.input[mirror]
