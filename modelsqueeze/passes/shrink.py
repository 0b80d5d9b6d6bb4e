"""Physically remove structurally pruned output channels: slice the layer's weight and bias, the
channel-wise ops after it (bias Add, BatchNormalization, activations, pooling, Flatten) and the
matching input rows of the next MatMul/Gemm/Conv, folding what the removed channels still
contributed (act(bias), a constant) into the next layer's bias, so outputs equal the masked model's."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelsqueeze import store
from modelsqueeze.pack import put_array

# Channel-wise ops a removed channel passes through, as functions of that channel's constant value.
_UNARY = {
    "Relu": lambda x, a: np.maximum(x, 0.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "Elu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 1.0) * (np.exp(x) - 1.0)),
    "Softplus": lambda x, a: np.log1p(np.exp(x)),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "Identity": lambda x, a: x,
    "Dropout": lambda x, a: x,  # inference: identity
}
# Spatial ops that keep a constant channel constant (only along a Conv chain, NCHW).
_SPATIAL = {"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"}


class NotShrinkable(Exception):
    """The graph around this layer is not a pattern shrink can rewrite exactly."""


@dataclass
class _Plan:
    weight: str  # the pruned weight's initializer name
    weight_axis: int
    bias: str | None
    channel_updates: list[tuple[str, int]] = field(default_factory=list)  # (initializer, axis) to slice
    batchnorms: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    steps: list[tuple[str, object]] = field(default_factory=list)  # ("add", name) / ("bn", i) / ("unary", fn)
    next_node: onnx.NodeProto | None = None
    next_weight: str = ""
    next_axis: int = 0
    block: int = 1  # rows of the next weight per channel (Flatten of C x H x W gives H*W)
    next_bias_add: str | None = None  # for MatMul: the bias of the Add after it
    chain: list[str] = field(default_factory=list)  # tensors whose shapes change


class _Graph:
    """Indexes of the main graph that the rewrite needs."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in set(node.input):
                self.users.setdefault(name, []).append(node)
        self.subgraph_names = set()
        for node in self.graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    self.subgraph_names |= _names_used(sub)

    def array(self, name: str) -> np.ndarray:
        return store.to_array(self.inits[name])

    def only_user(self, name: str) -> onnx.NodeProto:
        users = self.users.get(name, [])
        if len(users) != 1 or name in self.outputs or name in self.subgraph_names:
            raise NotShrinkable(f"{name!r} is read by {len(users)} nodes, a subgraph or the graph output")
        return users[0]

    def private_init(self, name: str, node: onnx.NodeProto) -> str:
        if name not in self.inits:
            raise NotShrinkable(f"{name!r} is not an initializer")
        if self.users.get(name) != [node] or name in self.subgraph_names:
            raise NotShrinkable(f"initializer {name!r} is shared")
        return name


def _names_used(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _names_used(sub)
    return names


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _channel_axis_of(shape: tuple[int, ...], n_channels: int, mode: str) -> int:
    """Axis of a broadcast per-channel operand: (N,) / (1, N) after MatMul; (C,1,1) / (1,C,1,1) after Conv."""
    if mode == "conv":
        if len(shape) in (3, 4) and shape[-3] == n_channels and all(d == 1 for d in shape[-2:]) and all(d == 1 for d in shape[:-3]):
            return len(shape) - 3
    elif shape and shape[-1] == n_channels and all(d == 1 for d in shape[:-1]):
        return len(shape) - 1
    raise NotShrinkable(f"operand of shape {shape} is not per-channel")


def _plan(g: _Graph, weight: str, n_channels: int) -> _Plan:
    producer = g.only_user(weight)
    attrs = _attrs(producer)
    op = producer.op_type
    if op == "Gemm" and list(producer.input).index(weight) == 1:
        plan = _Plan(weight, 0 if attrs.get("transB", 0) else 1, None)
        if len(producer.input) > 2 and producer.input[2]:
            bias = g.private_init(producer.input[2], producer)
            if list(g.inits[bias].dims) != [n_channels]:
                raise NotShrinkable("Gemm bias is not one value per output")
            plan.bias = bias
        mode = "dense"
    elif op == "MatMul" and list(producer.input).index(weight) == 1 and len(g.inits[weight].dims) == 2:
        plan, mode = _Plan(weight, 1, None), "dense"
    elif op == "Conv" and list(producer.input).index(weight) == 1 and attrs.get("group", 1) == 1:
        plan, mode = _Plan(weight, 0, None), "conv"
        if len(producer.input) > 2 and producer.input[2]:
            plan.bias = g.private_init(producer.input[2], producer)
    else:
        raise NotShrinkable(f"{op} is not a Gemm/MatMul/Conv reading this weight as its weight input")
    tensor = producer.output[0]
    plan.chain.append(tensor)
    while True:
        node = g.only_user(tensor)
        op, attrs = node.op_type, _attrs(node)
        if op == "Add":
            other = node.input[1] if node.input[0] == tensor else node.input[0]
            g.private_init(other, node)
            axis = _channel_axis_of(tuple(g.inits[other].dims), n_channels, mode)
            plan.channel_updates.append((other, axis))
            plan.steps.append(("add", other))
        elif op == "BatchNormalization" and mode == "conv" and node.input[0] == tensor and not attrs.get("training_mode", 0):
            names = [g.private_init(n, node) for n in node.input[1:5]]
            plan.channel_updates += [(n, 0) for n in names]
            plan.steps.append(("bn", (*names, attrs.get("epsilon", 1e-5))))
        elif op in _UNARY and node.input[0] == tensor:
            plan.steps.append(("unary", (_UNARY[op], attrs)))
        elif op == "Clip" and node.input[0] == tensor:
            bounds = [g.array(n).item() if n else None for n in list(node.input[1:3]) + [""] * (3 - len(node.input))][:2]
            if any(n and n not in g.inits for n in node.input[1:]):
                raise NotShrinkable("Clip bounds are not constants")
            lo = -np.inf if bounds[0] is None else bounds[0]
            hi = np.inf if bounds[1] is None else bounds[1]
            plan.steps.append(("unary", (lambda x, a, lo=lo, hi=hi: np.clip(x, lo, hi), attrs)))
        elif op in _SPATIAL and mode == "conv":
            plan.steps.append(("unary", (_UNARY["Identity"], attrs)))
        elif op == "Flatten" and mode == "conv" and attrs.get("axis", 1) == 1:
            mode = "flat"  # channel c becomes the block of inputs c*H*W .. (c+1)*H*W - 1
        elif op == "Gemm" and node.input[0] == tensor and not attrs.get("transA", 0) and mode != "conv":
            plan.next_node, plan.next_weight = node, g.private_init(node.input[1], node)
            plan.next_axis = 1 if attrs.get("transB", 0) else 0
            break
        elif op == "MatMul" and node.input[0] == tensor and mode != "conv" and node.input[1] in g.inits and len(g.inits[node.input[1]].dims) == 2:
            plan.next_node, plan.next_weight, plan.next_axis = node, g.private_init(node.input[1], node), 0
            after = g.users.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = [n for n in after[0].input if n != node.output[0]]
                if len(other) == 1 and other[0] in g.inits and g.users.get(other[0]) == after[0:1]:
                    plan.next_bias_add = other[0]
            break
        elif op == "Conv" and node.input[0] == tensor and mode == "conv" and attrs.get("group", 1) == 1:
            plan.next_node, plan.next_weight, plan.next_axis = node, g.private_init(node.input[1], node), 1
            break
        else:
            raise NotShrinkable(f"{op} node {node.name or ''} after it is not a pattern shrink handles")
        if len(node.output) > 1 and any(g.users.get(o) or o in g.outputs for o in node.output[1:] if o):
            raise NotShrinkable(f"{op} has a second output in use")
        tensor = node.output[0]
        plan.chain.append(tensor)
    rows = g.inits[plan.next_weight].dims[plan.next_axis]
    if rows % n_channels:
        raise NotShrinkable(f"next layer has {rows} inputs for {n_channels} channels")
    plan.block = rows // n_channels
    if plan.block > 1 and mode != "flat":
        raise NotShrinkable("channel count differs from the next layer's inputs")
    return plan


def _removed_constants(g: _Graph, plan: _Plan, removed: np.ndarray) -> np.ndarray:
    """The value each removed channel still outputs (its weights are zero): act(bias), through the chain."""
    value = g.array(plan.bias).reshape(-1)[removed].astype(np.float64) if plan.bias else np.zeros(removed.size)
    for kind, arg in plan.steps:
        if kind == "add":
            value = value + g.array(arg).reshape(-1)[removed]
        elif kind == "bn":
            scale, shift, mean, var, eps = arg
            s, b, m, v = (g.array(n).reshape(-1)[removed].astype(np.float64) for n in (scale, shift, mean, var))
            value = s * (value - m) / np.sqrt(v + eps) + b
        else:
            fn, attrs = arg
            value = fn(value, attrs)
    return value


def _fold(g: _Graph, plan: _Plan, removed: np.ndarray, consts: np.ndarray, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """What the removed channels contributed to the next layer, added to its bias. Returns the new
    bias arrays by name (a new bias initializer is created where the layer had none)."""
    if not np.any(consts):
        return {}
    node, weight = plan.next_node, g.array(plan.next_weight)
    rows = (removed[:, None] * plan.block + np.arange(plan.block)[None, :]).reshape(-1)
    per_row = np.repeat(consts, plan.block)
    taken = np.take(weight, rows, axis=plan.next_axis).astype(np.float64)
    if node.op_type == "Conv":
        attrs = _attrs(node)
        if any(attrs.get("pads", [0])) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise NotShrinkable("the next Conv pads its input, so a constant channel is not foldable")
        contrib = taken.reshape(taken.shape[0], taken.shape[1], -1).sum(-1) @ per_row
    else:
        moved = np.moveaxis(taken, plan.next_axis, 0)  # rows x N
        contrib = per_row @ moved
    if node.op_type == "Gemm":
        attrs = _attrs(node)
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        if beta == 0:
            raise NotShrinkable("the next Gemm has beta = 0, so its bias cannot absorb the constant")
        contrib = contrib * alpha / beta
    if node.op_type == "MatMul":
        if plan.next_bias_add is None:
            raise NotShrinkable("the next MatMul has no bias Add to absorb the removed channels' constant")
        name = plan.next_bias_add
    elif len(node.input) > 2 and node.input[2]:
        name = g.private_init(node.input[2], node)
    else:
        name = f"{plan.next_weight}.folded_bias"
        dtype = g.inits[plan.next_weight].data_type
        g.inits[name] = numpy_helper.from_array(np.zeros(contrib.shape, helper.tensor_dtype_to_np_dtype(dtype)), name)
        model.graph.initializer.append(g.inits[name])
        node.input.extend([""] * (2 - len(node.input)) + [name])
    bias = g.array(name)
    new = (bias.astype(np.float64) + contrib.reshape(bias.shape) if bias.size == contrib.size
           else bias.astype(np.float64) + contrib)
    return {name: new.astype(bias.dtype)}


def shrink_channels(model: onnx.ModelProto, keeps: dict[str, np.ndarray], notes: list[str]) -> set[str]:
    """Remove the channels whose keep flag is False from each layer `keeps` names (main graph
    weights only). Returns the names of the initializers that changed."""
    changed: set[str] = set()
    for weight, keep in keeps.items():
        if keep.all():
            continue
        g = _Graph(model)
        if weight not in g.inits:
            notes.append(f"{weight}: not an initializer of the main graph, not shrunk")
            continue
        try:
            plan = _plan(g, weight, keep.size)
            removed, kept = np.flatnonzero(~keep), np.flatnonzero(keep)
            new = _fold(g, plan, removed, _removed_constants(g, plan, removed), model)
        except NotShrinkable as why:
            notes.append(f"{weight}: kept its shape, masked only ({why})")
            continue
        new[plan.weight] = np.take(g.array(plan.weight), kept, axis=plan.weight_axis)
        if plan.bias:
            new[plan.bias] = g.array(plan.bias)[kept]
        for name, axis in plan.channel_updates:
            new[name] = np.take(g.array(name), kept, axis=axis)
        rows = (kept[:, None] * plan.block + np.arange(plan.block)[None, :]).reshape(-1)
        new[plan.next_weight] = np.take(g.array(plan.next_weight), rows, axis=plan.next_axis)
        for name, array in new.items():
            put_array(model, name, array)
        # Shapes recorded for the chain's tensors are stale now; let shape inference redo them.
        stale = set(plan.chain)
        kept_info = [v for v in model.graph.value_info if v.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept_info)
        changed |= set(new)
        notes.append(f"{weight}: removed {removed.size} of {keep.size} channels from the graph")
    return changed
