"""Benchmark modelsqueeze's weight-only linear quantization against onnxruntime's own
`onnxruntime.quantization.quantize_dynamic` (int8 weights, default options) on every sample model:
file bytes, packed bytes (skeleton + sidecar for modelsqueeze), ratio, top-1 accuracy on the
labelled test split (onnxruntime), and the wall time of the quantization call (including the write).

Run as `python benchmarks/bench_quantize.py`; prints one rich table per model."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from modelsqueeze.model import model_file_bytes
from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes.quantize import QuantizeConfig, quantize
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODELS = ["lenet300", "lenet5", "lstm_digits", "tiny_transformer"]

MSQ_CONFIGS = [
    ("modelsqueeze int8 per-channel", QuantizeConfig(bits=8, granularity="channel")),
    ("modelsqueeze int4 per-channel", QuantizeConfig(bits=4, granularity="channel")),
    ("modelsqueeze int4 block 32", QuantizeConfig(bits=4, granularity="block", block_size=32)),
]

INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def first_line(exc: BaseException) -> str:
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}"[:160]


def test_accuracy(model, data: dict) -> float:
    return top1_accuracy(model, data, source="test data")


def float_weights(model: onnx.ModelProto) -> dict[str, int]:
    """Parameter count of each float initializer of the top-level graph."""
    return {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT}


def ort_quantized_params(model: onnx.ModelProto, originals: dict[str, int]) -> int:
    """Parameters of the original float initializers that onnxruntime replaced by integers (a
    quantized weight W becomes W_quantized, or W_Transposed_quantized when a Gemm with transB
    turns into MatMulInteger)."""
    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    ints = {t.name for t in model.graph.initializer if t.data_type in INT_TYPES}
    return sum(n for name, n in originals.items()
               if name not in floats and ints & {f"{name}_quantized", f"{name}_Transposed_quantized"})


def ort_row(label: str, src: Path, out: Path, per_channel: bool, base: int, data: dict,
            weights: dict[str, int]) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(src)  # loaded outside the timed call, as for modelsqueeze
    try:
        start = time.perf_counter()
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, per_channel=per_channel)
        seconds = time.perf_counter() - start
    except Exception as exc:  # onnxruntime's quantizer raises many types
        return [label, f"failed: {first_line(exc)}", "", "", "", "", ""]
    size = model_file_bytes(out)
    written = onnx.load(out)
    try:
        acc = f"{100 * test_accuracy(written, data):.2f}%"
    except Exception as exc:
        acc = f"cannot run: {first_line(exc)}"
    total = sum(weights.values())
    done = ort_quantized_params(written, weights)
    return [label, f"{size:,}", f"{size:,}", f"{base / size:.2f}x", acc, f"{seconds:.3f}",
            f"{done:,} / {total:,} ({100 * done / total:.0f}%)"]


def msq_row(label: str, config: QuantizeConfig, src_path: Path, out: Path, base: int, data: dict,
            weights: dict[str, int]) -> list[str]:
    src = load_pair(src_path)
    try:
        start = time.perf_counter()
        result = quantize(src.model, src.records, config)
        write_pair(result.model, list(result.records.values()), out)
        seconds = time.perf_counter() - start
    except Exception as exc:
        return [label, f"failed: {first_line(exc)}", "", "", "", "", ""]
    pair = load_pair(out)
    size = model_file_bytes(out)
    packed = packed_size(pair)
    try:
        acc = f"{100 * test_accuracy(pair.runnable(), data):.2f}%"
    except Exception as exc:
        acc = f"cannot run: {first_line(exc)}"
    total = sum(weights.values())
    done = sum(weights.get(key, 0) for key in result.changed)
    return [label, f"{size:,}", f"{packed:,}", f"{base / packed:.2f}x", acc, f"{seconds:.3f}",
            f"{done:,} / {total:,} ({100 * done / total:.0f}%)"]


def bench(name: str, workdir: Path, console: Console) -> None:
    src_path = SAMPLES / f"{name}.onnx"
    data = load_npz(SAMPLES / f"{name}.npz")
    src = load_pair(src_path)
    weights = float_weights(src.model)
    base_file = model_file_bytes(src_path)
    base = packed_size(src)
    total = sum(weights.values())
    rows = [["original", f"{base_file:,}", f"{base:,}", "1.00x",
             f"{100 * test_accuracy(src.runnable(), data):.2f}%", "", f"0 / {total:,} (0%)"]]
    rows.append(ort_row("ORT quantize_dynamic (per-tensor)", src_path, workdir / f"{name}-ort-tensor.onnx",
                        False, base, data, weights))
    rows.append(ort_row("ORT quantize_dynamic (per-channel)", src_path, workdir / f"{name}-ort-channel.onnx",
                        True, base, data, weights))
    for i, (label, config) in enumerate(MSQ_CONFIGS):
        rows.append(msq_row(label, config, src_path, workdir / f"{name}-msq-{i}.onnx", base, data, weights))

    table = Table(
        title=f"{name} ({', '.join(sorted({n.op_type for n in src.model.graph.node}))})",
        caption="packed = skeleton + sidecar for modelsqueeze, the file for ORT; ratio = original / packed. "
                "float params → int: float initializer parameters stored as integers. ORT quantize_dynamic also quantizes activations "
                "dynamically at run time (DynamicQuantizeLinear + MatMulInteger/ConvInteger), so its "
                "accuracy reflects int8 activations too; modelsqueeze is weight-only (DequantizeLinear "
                "feeding float ops). Time: the quantize call including the write, model already loaded.",
        caption_justify="left",
    )
    for header, justify in (("method", "left"), ("file bytes", "right"), ("packed bytes", "right"),
                            ("ratio", "right"), ("top-1", "right"), ("time (s)", "right"),
                            ("float params → int", "right")):
        table.add_column(header, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs pre-processing advice
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, Path(tmp), console)


if __name__ == "__main__":
    main()
