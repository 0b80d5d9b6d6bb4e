"""Accuracy (onnxruntime, held-out test split) against k-means index bits for the LeNet samples,
on the original weights and after global magnitude pruning, with the packed size and ratio of each.
Prints Markdown tables; the README's tables are this script's output."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes import LayerRule, Selection
from modelsqueeze.passes.cluster import ClusterConfig, cluster
from modelsqueeze.passes.prune import PruneConfig, prune
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_accuracy(model, data: dict) -> float:
    return top1_accuracy(model, data, source="test data")


def written(result, path: Path):
    write_pair(result.model, list(result.records.values()), path)
    return load_pair(path)


def sweep(name: str, bits: list[int], sparsity: float, init: str, workdir: Path) -> list[str]:
    src = load_pair(SAMPLES / f"{name}.onnx")
    data = load_npz(SAMPLES / f"{name}.npz")
    base_bytes = packed_size(src)
    pruned = written(prune(src.model, src.records, PruneConfig(sparsity=LayerRule(sparsity), scope="global")),
                     workdir / f"{name}-pruned.onnx")
    lines = [
        f"**{name}** (original {100 * test_accuracy(src.runnable(), data):.2f}%, {base_bytes:,} B; "
        f"pruned {100 * sparsity:.0f}% global: {100 * test_accuracy(pruned.runnable(), data):.2f}%, "
        f"{packed_size(pruned):,} B)",
        "",
        f"| bits | accuracy | packed bytes | ratio | pruned {100 * sparsity:.0f}% + bits: accuracy | packed bytes | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bits:
        config = ClusterConfig(bits=LayerRule(b), init=init, selection=Selection())
        cells = []
        for tag, start in (("dense", src), ("pruned", pruned)):
            pair = written(cluster(start.model, start.records, config), workdir / f"{name}-{tag}-{b}.onnx")
            size = packed_size(pair)
            cells += [f"{100 * test_accuracy(pair.runnable(), data):.2f}%", f"{size:,}", f"{base_bytes / size:.1f}x"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 5, 6, 8])
    parser.add_argument("--sparsity", type=float, default=0.8, help="global pruning before clustering")
    parser.add_argument("--init", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print("\n".join(sweep(name, args.bits, args.sparsity, args.init, Path(tmp))))


if __name__ == "__main__":
    main()
