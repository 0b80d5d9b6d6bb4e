"""The svd pass: low-rank factorization of MatMul / Gemm weights (two MatMuls, or MatMul then Gemm)
and of Conv weights (a k x k Conv to r channels, then a 1x1 Conv to the outputs), where it saves
parameters, with the rank chosen per layer or across layers for a parameter budget."""

from __future__ import annotations

import fnmatch
import math

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelsqueeze import store
from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels import lowrank
from modelsqueeze.model import WeightInfo, find_weights, iter_graphs, node_name, pin_labels
from modelsqueeze.passes import LayerRule, PassResult, Selection, finite_only, nothing_selected, tensor_names, track
from modelsqueeze.passes.calibration import Calibrator
from modelsqueeze.tensor import CompressedTensor

SUFFIX_IN = ".svd_in"  # the factor applied first, to the layer's input (r output channels)
SUFFIX_OUT = ".svd_out"  # the factor applied second, making the layer's outputs (and its bias)


@dataclass(frozen=True)
class SvdConfig:
    """Options of `modelsqueeze svd`: exactly one of `rank` (whole numbers), `energy` (keep this
    fraction of the squared singular values, (0, 1]), `ratio` (at most this fraction of the layer's
    parameters, (0, 1)), `max_error` (relative Frobenius error of the weight, [0, 1)), each a
    per-layer rule, or `target_params` (total parameters of the output model)."""

    rank: LayerRule | None = None
    energy: LayerRule | None = None
    ratio: LayerRule | None = None
    max_error: LayerRule | None = None
    target_params: int | None = None
    calibration: str | None = None  # inputs (.npz, no labels needed): activation-aware factors and ranks
    sequential: bool = False  # with calibration: fit each layer to the inputs the factored layers before it give
    damp: float = 0.01  # ridge added to XᵀX, relative to its mean diagonal
    selection: Selection = field(default_factory=Selection)
    version: int = 1

    def __post_init__(self) -> None:
        if self.sequential and self.calibration is None:
            raise ModelSqueezeError("--sequential needs --calibration DATA.npz")
        given = [n for n in ("rank", "energy", "ratio", "max_error", "target_params") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ModelSqueezeError(
                "svd needs exactly one of --rank, --energy, --ratio, --max-error or --target-params"
                + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else "")
            )
        if self.rank is not None and any(v != int(v) or v < 1 for v in self.rank.values()):
            raise ModelSqueezeError("--rank values must be whole numbers of 1 or more")
        if self.energy is not None and any(not 0 < v <= 1 for v in self.energy.values()):
            raise ModelSqueezeError("--energy values must lie in (0, 1]: the fraction of squared singular values kept")
        if self.ratio is not None and any(not 0 < v < 1 for v in self.ratio.values()):
            raise ModelSqueezeError("--ratio values must lie in (0, 1): the most of a layer's parameters its factors may hold")
        if self.max_error is not None and any(not 0 <= v < 1 for v in self.max_error.values()):
            raise ModelSqueezeError("--max-error values must lie in [0, 1): the relative Frobenius error of each weight")
        if self.target_params is not None and (isinstance(self.target_params, bool) or int(self.target_params) != self.target_params
                                               or self.target_params < 1):
            raise ModelSqueezeError(f"--target-params {self.target_params}: must be a whole number of 1 or more")


@dataclass(frozen=True)
class FactoredLayer:
    """What the pass did to one layer. MACs are multiply-accumulates per output position (a row of
    a MatMul/Gemm output, a pixel of a Conv output); `positions` is the number of such positions
    per sample when the shapes say it (else None)."""

    weight: str
    node: str
    op: str
    shape: tuple[int, ...]  # the weight tensor's shape
    matrix: tuple[int, int]  # the factored matrix K x N (Conv: M x C*kh*kw)
    rank: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    positions: int | None
    kept_energy: float
    relative_error: float
    method: str
    factors: tuple[str, str]  # (applied first, applied second)


@dataclass
class SvdResult(PassResult):
    layers: list[FactoredLayer] = field(default_factory=list)


@dataclass
class _Target:
    info: WeightInfo
    node: onnx.NodeProto
    label: str
    orient: str  # how the weight becomes the matrix: "as is", "transposed" (Gemm transB), "flat" (Conv)
    where: str = ""  # the path of the graph holding the layer's node ("" for the main graph)
    graph: onnx.GraphProto | None = None  # the graph holding the layer's node
    home: onnx.GraphProto | None = None  # the graph holding the weight (initializer or Constant node)
    spectrum: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        """K x N as the layer multiplies: MatMul/Gemm op(B); Conv W reshaped M x C*kh*kw. Read
        from the weight each time it is asked for (one layer's matrix in memory at a time)."""
        array = self.info.array()
        if self.orient == "transposed":
            return array.T
        return array.reshape(array.shape[0], -1) if self.orient == "flat" else array

    @property
    def shape(self) -> tuple[int, int]:
        s = self.info.shape
        if self.orient == "transposed":
            return (s[1], s[0])
        return (s[0], math.prod(s[1:])) if self.orient == "flat" else (s[0], s[1])


def _detached(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy that stays valid while the graph's node list is rewritten."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _graphs(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    return dict(iter_graphs(model.graph))


def _locate(model: onnx.ModelProto, qualified: str) -> tuple[str, onnx.GraphProto, onnx.NodeProto] | None:
    """The path and graph holding the node `find_weights` calls `qualified` ("path/label"), and the node."""
    for path, graph in iter_graphs(model.graph):
        for index, node in enumerate(graph.node):
            if (f"{path}/{node_name(node, index)}" if path else node_name(node, index)) == qualified:
                return path, graph, node
    return None


def _target(model: onnx.ModelProto, info: WeightInfo) -> _Target | str:
    """The layer to factor for this weight, or why it is left alone. Weights of Constant nodes and
    of subgraphs (their own, or outer-scope ones read inside a branch) are factored like
    initializers: the factors become initializers of the graph that held the weight."""
    if info.source not in ("initializer", "constant"):
        return f"is a {info.source.replace('_', ' ')}, not a plain initializer; left alone"
    if len(info.consumers) != 1:
        return f"is read by {len(info.consumers)} nodes (shared weight), left alone"
    consumer = info.consumers[0]
    if consumer.via:
        return f"reaches its {consumer.op} through {consumer.via}; left alone"
    if consumer.op not in ("MatMul", "Gemm", "Conv"):
        return f"is a {consumer.op} weight; svd factors MatMul, Gemm and Conv weights only"
    if consumer.input_index != 1:
        return f"is input {consumer.input_index} of its {consumer.op}, not the weight input B; left alone"
    home = _graphs(model).get(info.graph)
    located = _locate(model, consumer.node)
    if home is None or located is None:
        return f"its {consumer.op} ({consumer.node}) cannot be found in the graph, left alone"
    where, graph, node = located
    if list(node.input[1:2]) != [info.name]:
        return f"its {consumer.op} ({consumer.node}) does not read it by name, left alone"
    node = _detached(node)
    if any(info.name in {o.name for o in g.output} for g in (home, graph)):
        return "is also a graph output, left alone"
    if home is model.graph and info.name in {i.name for i in home.input} and model.ir_version >= 4:
        return "is also a graph input (its value can be replaced at run time), left alone"
    ndim = len(info.shape)
    attrs = _attrs(node)
    if node.op_type == "MatMul":
        if ndim != 2:
            return f"is a {ndim}-D MatMul weight; only 2-D weights are factored"
        orient = "as is"
    elif node.op_type == "Gemm":
        orient = "transposed" if attrs.get("transB", 0) else "as is"
    else:
        if attrs.get("group", 1) != 1:
            return f"feeds a grouped Conv (group={attrs['group']}), left alone"
        if ndim < 3:
            return f"is a {ndim}-D Conv weight, left alone"
        orient = "flat"
    return _Target(info, node, consumer.node, orient, where=where, graph=graph, home=home)


_GATES = ("Sigmoid", "Tanh", "HardSigmoid", "Relu")
_PASS_ON = ("Add", "Identity", "Reshape", "Squeeze", "Unsqueeze")


def _recurrent(model: onnx.ModelProto, target: _Target) -> str:
    """Why the layer looks like a recurrent cell's gate-stacked weight ("" if it does not): read
    inside a Loop or Scan body, or its output split into three or more parts that gates read (an
    unrolled LSTM/GRU). Factoring one stacked matrix mixes the gates, and the error compounds over
    time steps."""
    if target.where:
        for path, op in _body_owners(model.graph):
            if op in ("Loop", "Scan") and (target.where == path or target.where.startswith(path + "/")):
                return f"is read in a {op} body (a recurrent cell)"
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in target.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    frontier = list(target.node.output[:1])
    for _ in range(3):  # through a bias Add or a reshape, to where the stacked output is cut
        parts: list[str] = []
        for value in frontier:
            cuts = readers.get(value, [])
            splits = [n for n in cuts if n.op_type == "Split" and len(n.output) >= 3]
            slices = [n for n in cuts if n.op_type == "Slice"]
            for cut in splits[:1] or (slices if len(slices) >= 3 else []):
                parts += list(cut.output)
        if parts:
            gated = {n.op_type for p in parts for n in readers.get(p, [])} & set(_GATES)
            if gated:
                return f"is gate-stacked: its output is cut into {len(parts)} parts read by {', '.join(sorted(gated))} (a recurrent cell)"
            return ""
        frontier = [o for v in frontier for n in readers.get(v, []) if n.op_type in _PASS_ON for o in n.output]
        if not frontier:
            return ""
    return ""


def _body_owners(graph: onnx.GraphProto, path: str = "") -> Iterator[tuple[str, str]]:
    """(subgraph path, op of the node that owns it) for every subgraph, as `iter_graphs` names them."""
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for i, sub in enumerate(subs):
                label = f"{node_name(node, index)}/{attr.name}" + (f"[{i}]" if len(subs) > 1 else "")
                sub_path = f"{path}/{label}" if path else label
                yield sub_path, node.op_type
                yield from _body_owners(sub, sub_path)


def _positions(model: onnx.ModelProto) -> dict[str, tuple]:
    """Inferred shapes of the main graph's tensors (empty when inference cannot run)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # too large to serialise, or a model inference does not understand
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def _output_positions(target: _Target, shapes: dict[str, tuple]) -> int | None:
    """Output positions per sample: Conv pixels (dims after N, C), or MatMul/Gemm rows (dims
    between the batch dim and the features; 1 for a 2-D output)."""
    shape = shapes.get(target.node.output[0])
    if shape is None:
        return None
    inner = shape[2:] if target.node.op_type == "Conv" else shape[1:-1]
    if any(d is None or d <= 0 for d in inner):
        return None
    return int(np.prod(inner, dtype=np.int64))


def _whitened_spectrum(data, target: _Target, damp: float) -> np.ndarray:
    """Squared singular values of LᵀW (H = LLᵀ): how the layer's output energy spreads over ranks."""
    from modelsqueeze.kernels.calibrated import whitened_svd

    w = data.view.to_matrix(target.info.array()).astype(np.float64)
    return np.asarray(whitened_svd(w, data.H, 1, damp)[2], np.float64)


def _whitened(cal: Calibrator, target: _Target, rank: int, current: onnx.ModelProto, notes: list[str]) -> lowrank.Factors | None:
    """Activation-aware factors: the rank-r A·B closest to W in the layer's outputs (whitened by the
    Cholesky factor of XᵀX), in the orientation `target.matrix` uses (Conv: M × C·k). None when
    they or their product do not fit the weight's dtype (weights near its largest value)."""
    from modelsqueeze.kernels.calibrated import refit_masked, whitened_svd

    data = cal.layer(target.info.key, current)
    view = data.view
    w = view.to_matrix(target.info.array()).astype(np.float64)
    goal = w if data.C is None else refit_masked(w, np.ones(w.shape, bool), data.H, cal.damp, C=data.C)
    a, b, spectrum = whitened_svd(goal, data.H, rank, cal.damp)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if target.node.op_type == "Conv":  # target.matrix is Wᵀ: W ≈ A B  =>  Wᵀ ≈ Bᵀ Aᵀ
        a, b = b.T, a.T
    dtype = target.matrix.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        product = a @ b
        fits = all(np.all(np.isfinite(x.astype(dtype))) for x in (a, b, product))
    if not fits:
        return None
    matrix = target.matrix.astype(np.float64)
    norm = float(np.linalg.norm(matrix)) or 1.0
    spectrum = np.asarray(spectrum, np.float64)
    kept = float(spectrum[:rank].sum() / spectrum.sum()) if spectrum.sum() > 0 else 1.0
    plain = lowrank.factorize(target.matrix, rank, lowrank.energies(target.matrix))
    plain_w = plain.a.astype(np.float64) @ plain.b.astype(np.float64)
    fitted_w = product
    if target.node.op_type == "Conv":
        plain_w, fitted_w = plain_w.T, fitted_w.T
    notes.append(cal.note(target.info.key, data, w, plain_w, fitted_w))
    return lowrank.Factors(a.astype(dtype), b.astype(dtype), "whitened", kept,
                           float(np.linalg.norm(matrix - product) / norm), float(np.sqrt(max(1.0 - kept, 0.0))))


def _named(config: SvdConfig, info: WeightInfo) -> bool:
    """Whether the user named this tensor: a --layers glob or a per-layer rule's glob matches it."""
    names = tensor_names(info)
    if any(fnmatch.fnmatchcase(n, glob) for glob in config.selection.layers for n in names):
        return True
    rules = (config.rank, config.energy, config.ratio, config.max_error)
    return any(rule is not None and rule.lookup(info)[1] for rule in rules)


def _rank_rules(config: SvdConfig) -> list[tuple[LayerRule, str]]:
    """The per-layer rules that choose ranks, given ones only, with their kind (the option's name)."""
    rules = ((config.rank, "rank"), (config.energy, "energy"), (config.ratio, "ratio"), (config.max_error, "max_error"))
    return [(rule, kind) for rule, kind in rules if rule is not None]


def _choose_rank(config: SvdConfig, target: _Target) -> tuple[int | None, str]:
    """(rank, how it was chosen) from the per-layer rule; rank None means the rule skips the layer."""
    k, n = target.shape
    for rule, kind in _rank_rules(config):
        value, _ = rule.lookup(target.info)
        if value is None:
            return None, ""
        if kind == "rank":
            return min(int(value), k, n), f"--rank {int(value)}"
        if kind == "ratio":
            return lowrank.rank_for_ratio(k, n, value), f"--ratio {value:g}"
        if kind == "energy":
            return lowrank.rank_for_energy(target.spectrum, value), f"--energy {value:g}"
        return lowrank.rank_for_error(target.spectrum, value), f"--max-error {value:g}"
    raise AssertionError("config validation admits exactly one rule")


class _Names:
    """Fresh tensor and node names, unique across the model's graphs."""

    def __init__(self, model: onnx.ModelProto):
        self.taken: set[str] = set()
        self.nodes: set[str] = set()
        for _, graph in iter_graphs(model.graph):
            self.taken |= {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
            self.taken |= {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
            for node in graph.node:
                self.taken |= set(node.input) | set(node.output)
                self.nodes.add(node.name)

    @staticmethod
    def _fresh(base: str, used: set[str]) -> str:
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        return name

    def tensor(self, base: str) -> str:
        return self._fresh(base, self.taken)

    def node(self, base: str) -> str:
        return self._fresh(base, self.nodes)


def _rewrite(model: onnx.ModelProto, target: _Target, factors: lowrank.Factors, names: _Names) -> tuple[str, str]:
    """Replace the layer by its two factor steps; returns the factors' initializer names (first, second)."""
    graph, home, node, weight = target.graph, target.home, target.node, target.info.name
    label, op = node.name or target.label.rsplit("/", 1)[-1], node.op_type
    first_w, second_w = names.tensor(weight + SUFFIX_IN), names.tensor(weight + SUFFIX_OUT)
    middle = names.tensor(f"{label}.svd_mid")
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    attrs = _attrs(node)
    first_name, second_name = names.node(label + SUFFIX_IN), names.node(label + SUFFIX_OUT)
    new_nodes: list[onnx.NodeProto] = []
    if op == "Conv":
        # W (M x C*k) ~= a (M x r) b (r x C*k): b is a Conv with r filters of the same kernel, a a 1x1 Conv.
        spatial = len(target.info.shape) - 2
        first = factors.b.reshape((factors.rank, *target.info.shape[1:]))
        second = factors.a.reshape((target.info.shape[0], factors.rank) + (1,) * spatial)
        conv = helper.make_node("Conv", [node.input[0], first_w], [middle], name=first_name)
        conv.attribute.extend(node.attribute)  # kernel, strides, pads, dilations, auto_pad as they were
        new_nodes.append(conv)
        new_nodes.append(helper.make_node("Conv", [middle, second_w, *bias], list(node.output), name=second_name,
                                          kernel_shape=[1] * spatial))
    else:
        # op(B) = W (K x N) ~= a (K x r) b (r x N): X' a is a MatMul, then the original op with b.
        first, second = factors.a, factors.b
        source = node.input[0]
        if op == "Gemm" and attrs.get("transA", 0):
            transposed = names.tensor(f"{label}.svd_input_t")
            new_nodes.append(helper.make_node("Transpose", [source], [transposed], name=names.node(f"{label}.svd_transpose"),
                                              perm=[1, 0]))
            source = transposed
        new_nodes.append(helper.make_node("MatMul", [source, first_w], [middle], name=first_name))
        if op == "Gemm":
            gemm = helper.make_node("Gemm", [middle, second_w, *bias], list(node.output), name=second_name)
            gemm.attribute.extend(a for a in node.attribute if a.name not in ("transA", "transB"))  # alpha, beta
            new_nodes.append(gemm)
        else:
            new_nodes.append(helper.make_node("MatMul", [middle, second_w], list(node.output), name=second_name))
    position = next(i for i, n in enumerate(graph.node) if list(n.output) == list(node.output))
    del graph.node[position]
    for offset, new in enumerate(new_nodes):
        graph.node.insert(position + offset, new)

    replacement = [store.stub_array(first_w, np.ascontiguousarray(first)),
                   store.stub_array(second_w, np.ascontiguousarray(second))]
    inits = list(home.initializer)
    if target.info.source == "constant":  # the Constant node goes; its factors are initializers there
        position = next(i for i, n in enumerate(home.node) if n.op_type == "Constant" and list(n.output[:1]) == [weight])
        del home.node[position]
        at = len(inits)
    else:
        at = next(i for i, t in enumerate(inits) if t.name == weight)
        inits = inits[:at] + inits[at + 1:]
    del home.initializer[:]
    home.initializer.extend(inits[:at] + replacement + inits[at:])
    # The old weight's recorded type is stale; the layer's output keeps its name and shape.
    for value_graph in {id(g): g for g in (home, graph)}.values():
        for value in [v for v in value_graph.value_info if v.name == weight]:
            value_graph.value_info.remove(value)
    inputs = list(home.input)
    if home is model.graph and model.ir_version < 4:  # IR < 4: every initializer is also a graph input
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(target.info.dtype))
        factor_inputs = [helper.make_tensor_value_info(t.name, elem, list(t.dims)) for t in replacement]
        del home.input[:]
        for value in inputs:
            if value.name != weight:
                home.input.append(value)
            else:
                home.input.extend(factor_inputs)
        if all(value.name != weight for value in inputs):
            home.input.extend(factor_inputs)
    return first_w, second_w


def _macs(target: _Target, rank: int) -> tuple[int, int]:
    """Multiply-accumulates per output position before and after (Conv: C*kh*kw*M -> r*C*kh*kw + M*r)."""
    k, n = target.shape
    return k * n, rank * (k + n)


def svd(model: onnx.ModelProto, records: dict[str, CompressedTensor], config: SvdConfig) -> SvdResult:
    """Apply `config` to a copy of the logical `model`. Factored weights leave the model (and
    their records the sidecar); their factors are plain dense weights that later passes compress."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes: list[str] = []
    selected = config.selection.pick(out, notes)
    if not selected:
        raise nothing_selected(out)
    selected = finite_only(selected, notes)
    for rule, kind in _rank_rules(config):
        notes += rule.unused_notes(selected, "--" + kind.replace("_", "-"))
    targets: list[_Target] = []
    for info in selected:
        found = _target(out, info)
        if isinstance(found, str):
            notes.append(f"{info.key}: {found}")
        elif (recurrent := _recurrent(out, found)) and not _named(config, info):
            notes.append(f"{info.key}: {recurrent}; factoring it mixes the gates and its error compounds over time "
                         f"steps, left alone (name it in --layers or in a 'glob=value' rule to factor it anyway)")
        elif lowrank.saving_rank_limit(*found.shape) < 1:
            notes.append(f"{info.key}: a {found.shape[0]}x{found.shape[1]} matrix cannot be factored into fewer parameters")
        else:
            targets.append(found)

    cal = Calibrator.create(config, model, [t.info for t in targets], notes)
    if cal is not None:  # rank choice by the spectrum of the layer's outputs, not of its weights
        for target in targets:
            if cal.covers(target.info.key):
                data = cal.reference_layer(target.info.key)
                target.spectrum = _whitened_spectrum(data, target, cal.damp)
    plan: list[tuple[_Target, int, str]] = []
    if config.target_params is not None:
        plan = _budget_plan(out, targets, config.target_params, notes)
    else:
        for target in targets:
            if (config.energy is not None or config.max_error is not None) and target.spectrum is None:
                target.spectrum = lowrank.energies(target.matrix)
            rank, how = _choose_rank(config, target)
            if rank is None:
                continue
            k, n = target.shape
            limit = lowrank.saving_rank_limit(k, n)
            if rank < 1:
                notes.append(f"{target.info.key}: {how} leaves no rank for a {k}x{n} matrix, left whole")
            elif rank > limit:
                notes.append(f"{target.info.key}: {how} needs rank {rank} of {min(k, n)}; factors of a {k}x{n} matrix "
                             f"save parameters only up to rank {limit}, left whole")
            else:
                plan.append((target, rank, how))

    shapes = _positions(out) if plan else {}
    if plan:
        pin_labels(out)  # the rewrite moves nodes; the keys of subgraph weights must not move
    names = _Names(out)
    layers: list[FactoredLayer] = []
    changed: list[str] = []  # the factors' keys (subgraph-qualified like every weight's)
    for target, rank, how in track(plan):
        if target.spectrum is None:
            target.spectrum = lowrank.energies(target.matrix)
        calibrated = cal is not None and cal.covers(target.info.key)
        factors = _whitened(cal, target, rank, out, notes) if calibrated else None
        if factors is None:
            if calibrated:
                notes.append(f"{target.info.key}: its activation-aware factors overflow {target.matrix.dtype}; "
                             f"not calibrated (factored data-free)")
            factors = lowrank.factorize(target.matrix, rank, target.spectrum)
        positions = _output_positions(target, shapes) if target.graph is out.graph else None
        first_w, second_w = _rewrite(out, target, factors, names)
        changed += [f"{target.info.graph}/{name}" if target.info.graph else name for name in (first_w, second_w)]
        k, n = target.shape
        macs_before, macs_after = _macs(target, rank)
        layer = FactoredLayer(
            weight=target.info.key, node=target.label, op=target.node.op_type, shape=target.info.shape,
            matrix=(k, n), rank=rank, params_before=k * n, params_after=lowrank.factor_params(k, n, rank),
            macs_before=macs_before, macs_after=macs_after, positions=positions,
            kept_energy=factors.kept_energy, relative_error=factors.relative_error, method=factors.method,
            factors=(first_w, second_w),
        )
        layers.append(layer)
        notes.append(_describe(layer, how))
    new_records = dict(records)
    for layer in layers:
        old = new_records.pop(layer.weight, None)
        if old is not None:
            notes.append(f"{layer.weight}: its {old.kind} record is dropped; the factors are plain weights "
                         f"(quantize / cluster / prune compress them)")
    if layers:
        notes.append(_totals(layers))
    else:
        notes.append("svd: no layer factored")
    return SvdResult(model=out, records=new_records, changed=changed, notes=notes, layers=layers)


def _budget_plan(model: onnx.ModelProto, targets: list[_Target], target_params: int,
                 notes: list[str]) -> list[tuple[_Target, int, str]]:
    """Ranks for every factorable layer such that the whole model holds at most `target_params`
    parameters (every float tensor counts), discarding the least relative energy."""
    total = sum(info.n_params for info in find_weights(model))
    how = f"--target-params {target_params:,}"
    if total <= target_params:
        notes.append(f"the model has {total:,} parameters, already within {how}; nothing factored")
        return []
    fixed = total - sum(math.prod(t.shape) for t in targets)
    floor = fixed + sum(k + n for k, n in (t.shape for t in targets))
    if not targets or floor > target_params:
        raise ModelSqueezeError(
            f"{how}: unreachable; the fewest parameters svd can leave is {floor:,} (rank 1 in each of the "
            f"{len(targets)} factorable layers, {fixed:,} in tensors it cannot factor)"
        )
    for target in targets:
        if target.spectrum is None:
            target.spectrum = lowrank.energies(target.matrix)
    ranks = lowrank.allocate_ranks([t.spectrum for t in targets], [t.shape for t in targets], target_params - fixed)
    plan = []
    for target, rank in zip(targets, ranks):
        if rank == 0:
            notes.append(f"{target.info.key}: kept whole under {how} (its remaining energy is worth the parameters)")
        else:
            plan.append((target, rank, how))
    return plan


def _describe(layer: FactoredLayer, how: str) -> str:
    k, n = layer.matrix
    per = "per sample" if layer.positions is not None else "per output position"
    scale = layer.positions or 1
    return (f"{layer.weight} ({layer.op} {layer.node}, {k}x{n}): rank {layer.rank} of {min(k, n)} by {how}, "
            f"params {layer.params_before:,} -> {layer.params_after:,} ({layer.params_after / layer.params_before:.1%}), "
            f"kept energy {layer.kept_energy:.4f}, relative error {layer.relative_error:.4f}, "
            f"MACs {layer.macs_before * scale:,} -> {layer.macs_after * scale:,} {per}")


def _totals(layers: list[FactoredLayer]) -> str:
    before = sum(layer.params_before for layer in layers)
    after = sum(layer.params_after for layer in layers)
    text = f"svd: {len(layers)} layer(s) factored, params {before:,} -> {after:,} ({after / before:.1%})"
    if all(layer.positions is not None for layer in layers):
        macs_before = sum(layer.macs_before * layer.positions for layer in layers)
        macs_after = sum(layer.macs_after * layer.positions for layer in layers)
        text += f", MACs per sample {macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.1%})"
    return text
