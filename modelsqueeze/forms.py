"""How a compressed record appears in the ONNX graph: a dense initializer, or a native compact form
built from standard ops, whichever is smaller: sparse as ScatterElements of the non-zeros into
zeros, weight sharing as Gather(codebook, Cast(uint8/uint16 indices)), or both together, linear
quantization as DequantizeLinear of int8/uint8/int4/uint4 codes.

Every form of tensor NAME owns the nodes named `msq/NAME/...` and the initializers `NAME` or
`NAME::...`; `remove` deletes exactly those, so a graph can be re-rendered or turned back into
plain dense weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelsqueeze import store
from modelsqueeze.kernels.quant import qrange
from modelsqueeze.tensor import CompressedTensor

AUX = "::"  # separates a tensor's name from its form's own initializers


def node_prefix(name: str) -> str:
    return f"msq/{name}/"


def owns_initializer(name: str, initializer: str) -> bool:
    return initializer == name or initializer.startswith(name + AUX)


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def remove(graph: onnx.GraphProto, name: str) -> None:
    """Delete whatever currently defines tensor `name`: its form's nodes and initializers, a
    Constant node producing it, a sparse initializer of that name."""
    prefix = node_prefix(name)
    doomed = [n for n in graph.node if n.name.startswith(prefix)
              or (n.op_type == "Constant" and list(n.output) == [name])]
    for node in doomed:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if owns_initializer(name, t.name)]:
        graph.initializer.remove(tensor)
    for sparse in [t for t in graph.sparse_initializer if owns_initializer(name, t.values.name)]:
        graph.sparse_initializer.remove(sparse)


def _dense(name: str, record: CompressedTensor) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The decoded tensor as an initializer; a big one is a stub that decodes the record when read."""
    nbytes = record.n_params * np.dtype(record.dtype).itemsize
    if nbytes < store.MIN_BYTES:
        return [numpy_helper.from_array(record.decode(), name)], []
    return [store.lazy_tensor(name, np.dtype(record.dtype), record.shape, store.Held(record.decode, nbytes))], []


def _index_array(indices: np.ndarray, n_codes: int) -> np.ndarray:
    return indices.astype(np.uint8 if n_codes <= 256 else np.uint16, copy=False)


def _gathered(name: str, record: CompressedTensor, out: str, shape: tuple[int, ...], codebook: np.ndarray,
              indices: np.ndarray) -> tuple[list, list]:
    """`out` = Gather(codebook, Cast(indices)) with indices of `shape`, in the smallest unsigned type."""
    prefix = node_prefix(name)
    inits = [
        numpy_helper.from_array(codebook.astype(record.dtype), f"{name}{AUX}codebook"),
        numpy_helper.from_array(_index_array(indices, codebook.size).reshape(shape), f"{name}{AUX}indices"),
    ]
    nodes = [
        helper.make_node("Cast", [f"{name}{AUX}indices"], [f"{name}{AUX}indices_i64"], name=prefix + "cast",
                         to=onnx.TensorProto.INT64),
        helper.make_node("Gather", [f"{name}{AUX}codebook", f"{name}{AUX}indices_i64"], [out], name=prefix + "gather", axis=0),
    ]
    return inits, nodes


def _gather(name: str, record: CompressedTensor) -> tuple[list, list]:
    """Every element as a code: pruned zeros get code 0 of a codebook with 0.0 prepended."""
    codebook, indices = record.codebook, record.indices
    if record.positions is not None:
        codes = np.zeros(record.n_params, np.uint8 if codebook.size + 1 <= 256 else np.uint16)  # 1-2 bytes a weight
        codes[record.positions] = indices.astype(codes.dtype) + codes.dtype.type(1)
        codebook, indices = np.concatenate([np.zeros(1, codebook.dtype), codebook]), codes
    return _gathered(name, record, name, record.shape, codebook, indices)


def _scatter(name: str, record: CompressedTensor) -> tuple[list, list]:
    """Non-zeros scattered into a flat zero tensor, then reshaped: 4-byte positions + the values
    (or, for a shared codebook, Gather of the stored entries' codes)."""
    n = record.n_params
    index_dtype = np.int32 if n < 2**31 else np.int64
    if record.codebook is not None:
        inits, nodes = _gathered(name, record, f"{name}{AUX}values", (record.n_stored,), record.codebook, record.indices)
    else:
        inits, nodes = [numpy_helper.from_array(record.stored_values(), f"{name}{AUX}values")], []
    inits += [
        numpy_helper.from_array(record.positions.astype(index_dtype), f"{name}{AUX}positions"),
        numpy_helper.from_array(np.array([n], np.int64), f"{name}{AUX}size"),
        numpy_helper.from_array(np.array(record.shape, np.int64), f"{name}{AUX}shape"),
    ]
    zero = numpy_helper.from_array(np.zeros(1, record.dtype))
    prefix = node_prefix(name)
    nodes += [
        helper.make_node("ConstantOfShape", [f"{name}{AUX}size"], [f"{name}{AUX}zeros"], name=prefix + "zeros", value=zero),
        helper.make_node("ScatterElements", [f"{name}{AUX}zeros", f"{name}{AUX}positions", f"{name}{AUX}values"],
                         [f"{name}{AUX}flat"], name=prefix + "scatter", axis=0),
        helper.make_node("Reshape", [f"{name}{AUX}flat", f"{name}{AUX}shape"], [name], name=prefix + "reshape"),
    ]
    return inits, nodes


def _int_tensor(q: np.ndarray, name: str, bits: int, signed: bool) -> onnx.TensorProto:
    """Integer codes as an ONNX tensor: 4-bit types packed two to a byte (low nibble first, as
    ONNX stores INT4/UINT4), otherwise the smallest 8/16-bit type."""
    if bits <= 4:
        tensor = onnx.TensorProto(name=name, dims=list(q.shape),
                                  data_type=onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4)
        nibbles = (q.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        tensor.raw_data = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
        return tensor
    dtype = (np.int8 if signed else np.uint8) if bits <= 8 else (np.int16 if signed else np.uint16)
    return numpy_helper.from_array(q.astype(dtype), name)


def _dequantize(name: str, record: CompressedTensor, model_opset: int) -> tuple[list, list] | None:
    """DequantizeLinear of the integer codes (pruned entries hold the zero point, so they give 0):
    per tensor from opset 10, per axis from 13, 4-bit and block-wise from 21; else None."""
    bits = record.index_bits
    need = 21 if (bits <= 4 and model_opset >= 21) or record.block_size else 13 if record.quant_axis is not None else 10
    if record.dtype != "float32" or model_opset < need or bits > 16 or (bits > 8 and model_opset < 21):
        return None
    qmin = qrange(bits, record.signed)[0]
    zero_point = record.zero_point.astype(np.int64)
    codes = record.layout.expand(zero_point).reshape(-1).copy()
    stored = np.arange(codes.size) if record.positions is None else record.positions
    codes[stored] = record.indices.astype(np.int64) + qmin
    container = bits if (bits <= 4 and model_opset >= 21) else max(bits, 8)
    inits = [
        _int_tensor(codes.reshape(record.shape), f"{name}{AUX}q", container, record.signed),
        numpy_helper.from_array(record.scale.astype(np.float32), f"{name}{AUX}scale"),
        _int_tensor(zero_point.reshape(record.scale.shape), f"{name}{AUX}zero_point", container, record.signed),
    ]
    attrs = {}
    if record.quant_axis is not None:
        attrs["axis"] = record.quant_axis
    if record.block_size:
        attrs["block_size"] = record.block_size
    node = helper.make_node("DequantizeLinear", [t.name for t in inits], [name], name=node_prefix(name) + "dequantize", **attrs)
    return inits, [node]


def _size(form: tuple[list, list]) -> int:
    return sum(store.inline_size(t) for t in form[0]) + sum(n.ByteSize() for n in form[1])


def choose(name: str, record: CompressedTensor, model_opset: int, dense: bool = False):
    """The smallest form this record can take at this opset (dense when asked)."""
    forms = [_dense(name, record)]
    if dense:
        return forms[0]
    # ScatterElements needs opset 11; a 0-d tensor has nothing to scatter into.
    if record.positions is not None and model_opset >= 11 and record.shape:
        forms.append(_scatter(name, record))
    if record.codebook is not None and record.codebook.size + (record.positions is not None) <= 2**16:
        forms.append(_gather(name, record))
    if record.scale is not None:
        forms += [f for f in [_dequantize(name, record, model_opset)] if f is not None]
    return min(forms, key=_size)


def emit(graph: onnx.GraphProto, name: str, record: CompressedTensor, model_opset: int, dense: bool = False) -> None:
    """Replace whatever defines `name` in `graph` by the record's chosen form. A dense initializer
    keeps its place in the initializer list; form nodes go first in the graph (they read only
    initializers, so topological order holds)."""
    inits, nodes = choose(name, record, model_opset, dense)
    position = next((i for i, t in enumerate(graph.initializer) if t.name == name), None)
    remove(graph, name)
    if position is not None and len(inits) == 1 and not nodes:
        graph.initializer.insert(position, inits[0])
    else:
        graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
