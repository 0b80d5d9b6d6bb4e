"""Accuracy (onnxruntime, held-out test split) and packed ratio of linear weight quantization for
the LeNet samples: int8 / int4 x per tensor / per channel / block-wise. Prints a Markdown table;
the README's table is this script's output."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes.quantize import QuantizeConfig, quantize
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_accuracy(model, data: dict) -> float:
    return top1_accuracy(model, data, source="test data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    settings = [(bits, g) for bits in (8, 4) for g in ("tensor", "channel", "block")]
    header = "| model (original accuracy) | " + " | ".join(f"int{b} {g}" for b, g in settings) + " |"
    lines = [header, "|---|" + "---:|" * len(settings)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = load_pair(SAMPLES / f"{name}.onnx")
            data = load_npz(SAMPLES / f"{name}.npz")
            base = packed_size(src)
            cells = []
            for bits, granularity in settings:
                config = QuantizeConfig(bits=bits, granularity=granularity, block_size=args.block_size)
                result = quantize(src.model, src.records, config)
                out = Path(tmp) / f"{name}-{bits}-{granularity}.onnx"
                write_pair(result.model, list(result.records.values()), out)
                pair = load_pair(out)
                cells.append(f"{100 * test_accuracy(pair.runnable(), data):.2f}% ({base / packed_size(pair):.1f}x)")
            lines.append(f"| {name} ({100 * test_accuracy(src.runnable(), data):.2f}%) | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
