"""The quantize pass: linear weight-only quantization (2..8 bits, per layer if asked; per tensor,
per output channel along each consumer's channel axis, or in blocks along its input axis).
Zeros stay zero."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, version_converter

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.forms import opset
from modelsqueeze.kernels import quant
from modelsqueeze.model import WeightInfo, check_model, find_weights, iter_graphs
from modelsqueeze.pack import put_record
from modelsqueeze.passes import LayerRule, PassResult, Selection, finite_only, track
from modelsqueeze.passes.calibration import Calibrator
from modelsqueeze.sidecar import record_size
from modelsqueeze.tensor import CompressedTensor


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `modelsqueeze quantize`. `bits` is a value per tensor (a default and `glob=bits`
    overrides); a plain int is accepted and means that many bits for every selected tensor."""

    bits: LayerRule = LayerRule(8.0)
    signed: bool = True
    symmetric: bool = True
    granularity: str = "channel"
    block_size: int = 32
    range: str = "minmax"
    percentile: float = 99.99
    calibration: str | None = None  # inputs (.npz, no labels needed): GPTQ error feedback
    sequential: bool = False  # with calibration: fit each layer to the inputs the quantized layers before it give
    damp: float = 0.01  # ridge added to XᵀX, relative to its mean diagonal
    selection: Selection = field(default_factory=Selection)
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.bits, numbers.Real) and not isinstance(self.bits, bool):
            object.__setattr__(self, "bits", LayerRule(default=float(self.bits)))
        if self.sequential and self.calibration is None:
            raise ModelSqueezeError("--sequential needs --calibration DATA.npz")
        if not isinstance(self.bits, LayerRule):
            raise ModelSqueezeError(f"--bits {self.bits!r}: expected a number of bits or per-layer bits")
        if not self.bits.values():
            raise ModelSqueezeError("--bits: no value given")
        for value in self.bits.values():
            if not (2 <= value <= 8 and value == int(value)):
                raise ModelSqueezeError(f"--bits {value:g}: expected 2 to 8 whole bits (8 and 4 map to ONNX int8 / int4)")
        if self.granularity not in quant.GRANULARITIES:
            raise ModelSqueezeError(f"--granularity {self.granularity!r}: expected one of {', '.join(quant.GRANULARITIES)}")
        if self.range not in quant.RANGES:
            raise ModelSqueezeError(f"--range {self.range!r}: expected one of {', '.join(quant.RANGES)}")
        if self.block_size < 1:
            raise ModelSqueezeError(f"--block-size {self.block_size}: must be positive")
        if not 50.0 <= self.percentile <= 100.0:
            raise ModelSqueezeError(f"--percentile {self.percentile}: expected 50 to 100")

    @property
    def needed_opset(self) -> int:
        """The opset whose DequantizeLinear can say every value of `bits` natively (4-bit and
        blocks need 21)."""
        if self.granularity == "block" or any(value <= 4 for value in self.bits.values()):
            return 21
        return 13 if self.granularity == "channel" else 10


def layout_for(info: WeightInfo, array: np.ndarray, config: QuantizeConfig, notes: list[str]) -> quant.Layout:
    """The grouping this consumer's layout allows: channels along its output axis, blocks along
    its input axis; a tensor without one falls back to a single scale."""
    if config.granularity == "channel":
        if info.channel_axis is not None:
            return quant.Layout(array.shape, info.channel_axis)
        notes.append(f"{info.key}: no single output-channel axis ({info.ops}), one scale for the tensor")
    elif config.granularity == "block":
        if info.reduction_axis is not None:
            # Clamped to the axis: a larger block is one block (and must not size any allocation).
            block = min(config.block_size, max(array.shape[info.reduction_axis], 1))
            blocked = quant.Layout(array.shape, info.reduction_axis, block)
            weights_per_scale = array.size / max(int(np.prod(blocked.param_shape, dtype=np.int64)), 1)
            if weights_per_scale >= 8 or info.channel_axis is None:
                return blocked
            # An input axis of size 1 (depthwise conv [C, 1, k, k]) makes blocks of one weight: a
            # float scale per weight is bigger than the float weight. Per channel pays.
            notes.append(f"{info.key}: blocks along its {array.shape[info.reduction_axis]}-wide input axis would hold "
                         f"{weights_per_scale:.0f} weights per scale; one scale per output channel instead")
            return quant.Layout(array.shape, info.channel_axis)
        notes.append(f"{info.key}: no input axis to block along ({info.ops}), one scale for the tensor")
    return quant.Layout(array.shape)


def encode(name: str, array: np.ndarray, layout: quant.Layout, config: QuantizeConfig, bits: int,
           fitted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> CompressedTensor:
    """The smaller of a dense record (zeros quantize exactly to the zero point) and one storing
    only the non-zeros' codes with their positions, both with `bits`-bit codes (this tensor's
    value of `config.bits`). `fitted` = (scale, zero_point, q) gives the codes (from GPTQ) instead
    of rounding each weight to its nearest level."""
    if fitted is None:
        scale, zero_point = quant.choose_params(array, layout, bits, config.signed, config.symmetric,
                                                config.range, config.percentile)
        q = quant.quantize(array, layout, scale, zero_point, bits, config.signed).reshape(-1)
    else:
        scale, zero_point, q = fitted
        q = q.reshape(-1)
    codes = (q - quant.qrange(bits, config.signed)[0]).astype(np.uint8)
    common = dict(scale=scale, zero_point=zero_point.astype(np.int64), quant_axis=layout.axis,
                  block_size=layout.block_size, signed=config.signed, index_bits=bits)
    dense = CompressedTensor(name, array.shape, array.dtype.name, indices=codes, **common)
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    if positions.size == flat.size:
        return dense
    sparse = CompressedTensor(name, array.shape, array.dtype.name, indices=codes[positions], positions=positions, **common)
    return min((dense, sparse), key=record_size)


def _gptq(cal: Calibrator, info: WeightInfo, array: np.ndarray, layout: quant.Layout, config: QuantizeConfig,
          bits: int, current: onnx.ModelProto, notes: list[str]) -> CompressedTensor:
    """GPTQ: the same grid as the data-free record (scales from the weights), codes chosen input by
    input with the rounding error fed back into the weights not yet quantized; zeros stay zero."""
    from modelsqueeze.kernels.calibrated import gptq, refit_masked

    scale, zero_point = quant.choose_params(array, layout, bits, config.signed, config.symmetric,
                                            config.range, config.percentile)
    data = cal.layer(info.key, current)
    view = data.view
    qmin, qmax = quant.qrange(bits, config.signed)
    w = view.to_matrix(array).astype(np.float64)
    target = w
    if data.C is not None:  # sequential: first the weights that best map these inputs to the original outputs
        target = refit_masked(w, view.to_matrix(array != 0), data.H, cal.damp, C=data.C)
    codes, _ = gptq(target, data.H, view.to_matrix(layout.expand(scale)).astype(np.float64),
                    view.to_matrix(layout.expand(zero_point)).astype(np.float64), qmin, qmax,
                    keep=view.to_matrix(array != 0), damp=cal.damp)
    q = view.from_matrix(np.asarray(codes, np.int64))
    plain = encode(info.key, array, layout, config, bits)
    record = encode(info.key, array, layout, config, bits, fitted=(scale, zero_point, q))
    notes.append(cal.note(info.key, data, w, view.to_matrix(plain.decode()).astype(np.float64),
                          view.to_matrix(record.decode()).astype(np.float64)))
    return record


def _upgrade(model: onnx.ModelProto, target: int, notes: list[str]) -> onnx.ModelProto:
    """The model at opset `target` (IR 10 for 4-bit types), or unchanged with a note when the
    converter cannot do it safely."""
    current = opset(model)
    if current >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
        _keep_what_the_converter_drops(model, upgraded)
        check_model(upgraded, "upgraded model", full=True)
    except Exception as exc:  # the converter raises many types; any failure means "not safe"
        notes.append(f"opset {current} could not be upgraded to {target} ({str(exc).splitlines()[0][:120]}); "
                     f"quantized weights are kept as floats in the graph (the sidecar still packs them)")
        return model
    ir = f", IR {model.ir_version} -> {upgraded.ir_version}" if upgraded.ir_version != model.ir_version else ""
    notes.append(f"opset upgraded {current} -> {target}{ir} for DequantizeLinear (the least these quantized forms need)")
    return upgraded


def _keep_what_the_converter_drops(model: onnx.ModelProto, upgraded: onnx.ModelProto) -> None:
    """The version converter drops node metadata (PyTorch's stack traces can be most of a file),
    adds inferred value_info, names unnamed dims of the graph's inputs and outputs ("unk__0") and
    leaves the IR version as it was. Put back each node's metadata where the node list is
    unchanged, the original value_info, inputs and outputs, and the lowest IR version the new
    opsets allow (onnxruntime <= 1.16 refuses IR 10, which only opset 21 needs)."""
    for (old_path, old), (new_path, new) in zip(iter_graphs(model.graph), iter_graphs(upgraded.graph)):
        if old_path != new_path:
            break
        if [n.op_type for n in old.node] == [n.op_type for n in new.node]:
            for before, after in zip(old.node, new.node):
                if before.metadata_props and not after.metadata_props:
                    after.metadata_props.extend(before.metadata_props)
        del new.value_info[:]
        new.value_info.extend(old.value_info)
        for before_values, after_values in ((old.input, new.input), (old.output, new.output)):
            if [v.name for v in before_values] == [v.name for v in after_values]:  # no "unk__0" for a '?' dim
                for before, after in zip(before_values, after_values):
                    after.CopyFrom(before)
    upgraded.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(upgraded.opset_import)))


def quantize(model: onnx.ModelProto, records: dict[str, CompressedTensor], config: QuantizeConfig) -> PassResult:
    """Apply `config` to a copy of the logical `model`; a tensor without a `bits` value (no
    default and no matching override) is left alone."""
    notes: list[str] = []
    out, selected = config.selection.start(model, notes)
    selected = finite_only(selected, notes)
    notes += config.bits.unused_notes(selected, "--bits")
    cal = Calibrator.create(config, model, [i for i in selected if config.bits.lookup(i)[0] is not None], notes)
    if any(config.bits.lookup(info)[0] is not None for info in selected):
        out = _upgrade(out, config.needed_opset, notes)
        finite = {info.key for info in selected}  # the same tensors, read from the upgraded graph
        selected = [info for info in find_weights(out) if info.key in finite]
    new_records = dict(records)
    changed = []
    for info in track(selected):
        value, _ = config.bits.lookup(info)
        if value is None:
            continue
        array = info.array()
        layout = layout_for(info, array, config, notes)
        if cal is not None and cal.covers(info.key):
            record = _gptq(cal, info, array, layout, config, int(value), out, notes)
        else:
            record = encode(info.key, array, layout, config, int(value))
        new_records[info.key] = record
        put_record(out, info.key, record)
        changed.append(info.key)
    return PassResult(model=out, records=new_records, changed=changed, notes=notes)
