"""Measure, from an .onnx file alone, what a corpus model exercises.

`python corpus/features.py [--models corpus/models]` prints one block per fetched model (ops, opset,
IR, inputs, initializer dtypes and sizes, Constant-node weights, subgraphs, features) and checks that
the `features` list in corpus/models.toml is exactly what the file shows. Needs onnx and numpy (the
project's venv); corpus/fetch.py does not import this.

Feature names (the vocabulary of models.toml):
  constant_weights  a Constant node (any graph level) holds a float tensor of >= 16 elements
  if_outer_scope    an If/Loop/Scan body reads a name defined outside it (an initializer or value)
  loop_carried_weights  a float initializer of >= 16 elements enters a Loop as a loop-carried value
                    that the body passes on unchanged (tf2onnx's Keras LSTM while-loop)
  lstm, gru, rnn    the fused recurrent op is in the graph
  unrolled_rnn      recurrent gates written out as MatMul/Gemm + Sigmoid/Tanh + Split (Keras exporters,
                    PyTorch's export of an LSTMCell loop)
  depthwise_conv    a Conv with group == input channels > 1
  grouped_conv      a Conv with 1 < group < input channels
  attention         a Softmax fed (within a few hops) by MatMul/Einsum of two activations
  int_inputs        a graph input of an integer dtype (token ids, bytes, indices)
  bool_inputs       a graph input of dtype bool (masks)
  multi_input       more than one graph input
  state_inputs      a second input that is a recurrent state: a graph output of the same shape
                    (fed back), or the initial_h/initial_c of an LSTM/GRU/RNN
  scalar_inputs     a 0-d graph input
  scalar_outputs    a 0-d graph output
  fixed_batch       every input's leading dim is fixed (1 or a state size), not a symbolic batch
  unbatched_inputs  some inputs have a symbolic batch, another a fixed leading dim > 1 (e.g. a GRU
                    state [layers, 1, hidden]): the inputs cannot all be split along axis 0
  float16           float16 initializers or Constant tensors
  prequantized      int8/uint8 weights used through DequantizeLinear / *Integer / DynamicQuantize* ops
  contrib_ops       ops from a non-default domain (com.microsoft, ...)
  shared_weights    a float initializer of >= 16 elements read by more than one node
  gather_table      a float (or quantized) initializer used as a Gather table (embedding)
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
             onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}
QUANT_OPS = {"DequantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
             "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"}


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def walk(graph: onnx.GraphProto, depth: int = 0):
    """(node, depth, graph) for every node, subgraphs included."""
    for node in graph.node:
        yield node, depth, graph
        for sub in _subgraphs(node):
            yield from walk(sub, depth + 1)


def _dims(value_info: onnx.ValueInfoProto) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (nested bodies included)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        defined.update(node.output)
    used = set()
    for node in graph.node:
        used.update(x for x in node.input if x)
        for sub in _subgraphs(node):
            used |= _outer_refs(sub)
    return used - defined


def measure(path: str | Path) -> dict:
    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = list(walk(g))
    ops = collections.Counter(n.op_type for n, _, _ in nodes)
    producers = {o: n for n, _, _ in nodes for o in n.output}
    features: set[str] = set()

    # initializers
    dtypes = collections.Counter()
    dtype_bytes = collections.Counter()
    params = 0
    float_params = 0
    for t in g.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type).lower()
        arr = numpy_helper.to_array(t)
        dtypes[name] += 1
        dtype_bytes[name] += arr.nbytes
        params += arr.size
        if t.data_type in FLOAT_TYPES:
            float_params += arr.size
        if t.data_type == onnx.TensorProto.FLOAT16:
            features.add("float16")

    # Constant nodes with weights
    const_weights = []
    for n, depth, _ in nodes:
        if n.op_type != "Constant":
            continue
        for attr in n.attribute:
            if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                size = int(np.prod(attr.t.dims)) if attr.t.dims else 1
                if attr.t.data_type == onnx.TensorProto.FLOAT16:
                    features.add("float16")
                if size >= 16:
                    const_weights.append((n.output[0], list(attr.t.dims), depth))
    if const_weights:
        features.add("constant_weights")

    # subgraphs reading outer-scope names
    subgraph_info = []
    for n, depth, _ in nodes:
        for sub in _subgraphs(n):
            refs = _outer_refs(sub)
            subgraph_info.append((n.op_type, n.name, len(sub.node), sorted(refs)[:5], len(refs)))
            if refs:
                features.add("if_outer_scope")

    for n, _, _ in nodes:
        body = next((a.g for a in n.attribute if n.op_type == "Loop" and a.name == "body"), None)
        if body is None:
            continue
        copies = {m.output[0]: m.input[0] for m in body.node if m.op_type == "Identity"}
        for c, name in enumerate(n.input[2:]):
            t = inits.get(name)
            if t is None or t.data_type not in FLOAT_TYPES or int(np.prod(t.dims or [1])) < 16:
                continue
            if 2 + c < len(body.input) and 1 + c < len(body.output):
                out = body.output[1 + c].name
                out = copies.get(out, out)
                if out == body.input[2 + c].name:
                    features.add("loop_carried_weights")

    for op, feat in (("LSTM", "lstm"), ("GRU", "gru"), ("RNN", "rnn"), ("DynamicQuantizeLSTM", "lstm")):
        if ops.get(op):
            features.add(feat)
    if not features & {"lstm", "gru", "rnn"} and ops.get("MatMul", 0) + ops.get("Gemm", 0) >= 2 \
            and ops.get("Sigmoid", 0) >= 3 and ops.get("Tanh", 0) >= 2 and ops.get("Split", 0) >= 1:
        features.add("unrolled_rnn")

    # convolutions
    shapes = {t.name: list(t.dims) for t in g.initializer}
    for n, _, _ in nodes:
        if n.op_type not in ("Conv", "ConvInteger", "QLinearConv"):
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = n.input[3] if n.op_type == "QLinearConv" else n.input[1]
        wshape = shapes.get(w)
        if group > 1 and wshape:
            in_channels = wshape[1] * group
            features.add("depthwise_conv" if wshape[1] == 1 and group == in_channels else "grouped_conv")

    # attention: Softmax <- ... <- MatMul/Einsum(activation, activation)
    def _activation(name: str) -> bool:
        return name not in inits and not (name in producers and producers[name].op_type == "Constant")

    for n, _, _ in nodes:
        if n.op_type != "Softmax":
            continue
        frontier, seen = [n.input[0]], set()
        for _ in range(5):
            nxt = []
            for name in frontier:
                p = producers.get(name)
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if p.op_type in ("MatMul", "Einsum") and len(p.input) >= 2 and all(_activation(x) for x in p.input[:2]):
                    features.add("attention")
                nxt.extend(p.input)
            frontier = nxt

    # inputs / outputs
    real_inputs = [i for i in g.input if i.name not in inits]
    outputs = {o.name: (o.type.tensor_type.elem_type, _dims(o)) for o in g.output}
    consumers = collections.defaultdict(list)
    for n, _, _ in nodes:
        for k, x in enumerate(n.input):
            consumers[x].append((n, k))

    def _same_shape(a: list, b: list) -> bool:  # the leading (batch) axis may differ: 1 vs "N"
        # past it, equal sizes or the same symbolic name ([1, samples] audio is no [1, frames] state)
        return len(a) == len(b) and all(x == y for x, y in zip(a[1:], b[1:]))

    def _feeds_rnn_state(name: str) -> bool:
        frontier = [name]
        for _ in range(4):
            nxt = []
            for x in frontier:
                for n, k in consumers.get(x, []):
                    if n.op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM") and k in (5, 6):
                        return True
                    if n.op_type in ("Slice", "Squeeze", "Unsqueeze", "Transpose", "Reshape", "Split", "Gather",
                                     "Identity", "Cast"):
                        nxt.extend(n.output)
            frontier = nxt
        return False

    for i in real_inputs:
        et = i.type.tensor_type.elem_type
        dims = _dims(i)
        if et in INT_TYPES:
            features.add("int_inputs")
        if et == onnx.TensorProto.BOOL:
            features.add("bool_inputs")
        if i.type.HasField("tensor_type") and len(dims) == 0:
            features.add("scalar_inputs")
        fed_back = any(_same_shape(d, dims) and dims and et == oe for oe, d in outputs.values())
        if len(real_inputs) > 1 and (fed_back or _feeds_rnn_state(i.name)):
            features.add("state_inputs")
    leading = {("sym" if not isinstance(_dims(i)[0], int) else _dims(i)[0]) for i in real_inputs if _dims(i)}
    if "sym" in leading and leading - {"sym", 1}:
        features.add("unbatched_inputs")
    if len(real_inputs) > 1:
        features.add("multi_input")
    if any(o.type.HasField("tensor_type") and len(_dims(o)) == 0 for o in g.output):
        features.add("scalar_outputs")
    if real_inputs and all(_dims(i) and isinstance(_dims(i)[0], int) and _dims(i)[0] > 0 for i in real_inputs):
        features.add("fixed_batch")

    if ops.keys() & QUANT_OPS and any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                                      and int(np.prod(t.dims or [1])) >= 16 for t in g.initializer):
        features.add("prequantized")
    domains = {n.domain for n, _, _ in nodes if n.domain not in ("", "ai.onnx")}
    if domains:
        features.add("contrib_ops")

    uses = collections.Counter(x for n, _, _ in nodes for x in set(n.input) if x in inits)
    shared = [k for k, v in uses.items() if v > 1 and inits[k].data_type in FLOAT_TYPES
              and int(np.prod(inits[k].dims or [1])) >= 16]
    if shared:
        features.add("shared_weights")
    gather_tables = {}
    for n, _, _ in nodes:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            t = inits[n.input[0]]
            if t.data_type in FLOAT_TYPES | {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
                gather_tables[n.input[0]] = list(t.dims)
    if gather_tables:
        features.add("gather_table")

    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [(i.name, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type), _dims(i)) for i in real_inputs],
        "outputs": [(o.name, onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) if o.type.HasField("tensor_type")
                     else "non-tensor", _dims(o) if o.type.HasField("tensor_type") else None) for o in g.output],
        "ops": dict(ops.most_common()),
        "nodes": len(nodes),
        "initializers": len(g.initializer),
        "params": params,
        "float_params": float_params,
        "init_dtypes": dict(dtypes),
        "init_bytes": dict(dtype_bytes),
        "constant_weights": const_weights,
        "subgraphs": subgraph_info,
        "shared_weights": shared,
        "gather_tables": gather_tables,
        "features": sorted(features),
    }


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip vendors tomli
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(HERE / "models"), help="folder of fetched <id>.onnx files")
    parser.add_argument("--manifest", default=str(HERE / "models.toml"))
    args = parser.parse_args(argv)
    entries = _load_toml(Path(args.manifest))["model"]
    bad = 0
    for entry in entries:
        path = Path(args.models) / f"{entry['id']}.onnx"
        if not path.exists():
            print(f"{entry['id']}: not fetched ({path})")
            bad += 1
            continue
        info = measure(path)
        print(f"== {entry['id']}  ({entry['package']}=={entry['version']}:{entry['member']})")
        for key in ("bytes", "ir_version", "opsets", "producer", "inputs", "outputs", "params", "float_params",
                    "init_dtypes", "nodes", "shared_weights", "gather_tables", "constant_weights", "subgraphs"):
            value = info[key]
            if key == "shared_weights":
                value = f"{len(value)} {value[:4]}"
            print(f"   {key:16} {value}")
        print(f"   {'ops':16} {info['ops']}")
        print(f"   {'features':16} {info['features']}")
        if sorted(entry.get("features", [])) != info["features"]:
            print(f"   MISMATCH with models.toml: {sorted(entry.get('features', []))}")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
