"""Accuracy (onnxruntime, held-out test split) against magnitude-pruning sparsity for the LeNet
samples, per-layer vs global scope, with the packed size (skeleton + sidecar) of each result.
Prints a Markdown table; the README's table is this script's output."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes import LayerRule, Selection
from modelsqueeze.passes.prune import PruneConfig, prune
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_accuracy(model, data: dict) -> float:
    return top1_accuracy(model, data, source="test data")


def sweep(name: str, sparsities: list[float], workdir: Path) -> list[str]:
    src = load_pair(SAMPLES / f"{name}.onnx")
    data = load_npz(SAMPLES / f"{name}.npz")
    base_bytes = packed_size(src)
    lines = [
        f"**{name}** (original: {100 * test_accuracy(src.runnable(), data):.2f}%, {base_bytes:,} B)",
        "",
        "| sparsity | per-layer accuracy | global accuracy | packed bytes (per-layer / global) | ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in sparsities:
        cells = {}
        for scope in ("layer", "global"):
            config = PruneConfig(sparsity=LayerRule(s), scope=scope, selection=Selection())
            result = prune(src.model, src.records, config)
            out = workdir / f"{name}-{scope}-{s}.onnx"
            write_pair(result.model, list(result.records.values()), out)
            pair = load_pair(out)
            cells[scope] = (test_accuracy(pair.runnable(), data), packed_size(pair))
        (acc_l, bytes_l), (acc_g, bytes_g) = cells["layer"], cells["global"]
        lines.append(
            f"| {100 * s:.0f}% | {100 * acc_l:.2f}% | {100 * acc_g:.2f}% | {bytes_l:,} / {bytes_g:,} "
            f"| {base_bytes / bytes_l:.1f}x / {base_bytes / bytes_g:.1f}x |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.8, 0.9, 0.95])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print("\n".join(sweep(name, args.sparsity, Path(tmp))))


if __name__ == "__main__":
    main()
