"""How a compressed record appears in the ONNX graph: a dense initializer, or a native compact form
built from standard ops (sparse: ScatterElements of the non-zeros into zeros), whichever is smaller.

Every form of tensor NAME owns the nodes named `msq/NAME/...` and the initializers `NAME` or
`NAME::...`; `remove` deletes exactly those, so a graph can be re-rendered or turned back into
plain dense weights.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
    return [numpy_helper.from_array(record.decode(), name)], []


def _scatter(name: str, record: CompressedTensor) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Non-zeros scattered into a flat zero tensor, then reshaped: 4-byte positions + the values."""
    n = record.n_params
    index_dtype = np.int32 if n < 2**31 else np.int64
    inits = [
        numpy_helper.from_array(record.stored_values(), f"{name}{AUX}values"),
        numpy_helper.from_array(record.positions.astype(index_dtype), f"{name}{AUX}positions"),
        numpy_helper.from_array(np.array([n], np.int64), f"{name}{AUX}size"),
        numpy_helper.from_array(np.array(record.shape, np.int64), f"{name}{AUX}shape"),
    ]
    zero = numpy_helper.from_array(np.zeros(1, record.dtype))
    prefix = node_prefix(name)
    nodes = [
        helper.make_node("ConstantOfShape", [f"{name}{AUX}size"], [f"{name}{AUX}zeros"], name=prefix + "zeros", value=zero),
        helper.make_node("ScatterElements", [f"{name}{AUX}zeros", f"{name}{AUX}positions", f"{name}{AUX}values"],
                         [f"{name}{AUX}flat"], name=prefix + "scatter", axis=0),
        helper.make_node("Reshape", [f"{name}{AUX}flat", f"{name}{AUX}shape"], [name], name=prefix + "reshape"),
    ]
    return inits, nodes


def _size(form: tuple[list, list]) -> int:
    return sum(t.ByteSize() for t in form[0]) + sum(n.ByteSize() for n in form[1])


def choose(name: str, record: CompressedTensor, model_opset: int, dense: bool = False):
    """The smallest form this record can take at this opset (dense when asked)."""
    forms = [_dense(name, record)]
    # ScatterElements needs opset 11; a 0-d tensor has nothing to scatter into.
    if not dense and record.positions is not None and model_opset >= 11 and record.shape:
        forms.append(_scatter(name, record))
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
