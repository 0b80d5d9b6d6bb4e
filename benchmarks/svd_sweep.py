"""Accuracy (onnxruntime, held-out test split) of low-rank SVD for the LeNet samples against the
kept energy per layer, the parameter ratio per layer and a whole-model parameter budget, with the
model's parameters, packed bytes (skeleton + sidecar) and the ratio to the original's packed size.
Prints Markdown tables; the README's tables are this script's output.

Run as `python benchmarks/svd_sweep.py [--models lenet300 lenet5]`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair, packed_size, write_pair
from modelsqueeze.passes import LayerRule, Selection
from modelsqueeze.passes.svd import SvdConfig, svd
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ENERGIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
MIN_PARAMS = 10_000
BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)  # fractions of the original model's parameters


def test_accuracy(model, data: dict) -> float:
    return top1_accuracy(model, data, source="test data")


def n_params(model) -> int:
    return sum(w.n_params for w in find_weights(model))


def ranks(result, weights: list[str]) -> str:
    """Rank per weight layer in graph order; '-' where the layer stayed whole."""
    chosen = {layer.weight: layer.rank for layer in result.layers}
    return " / ".join(str(chosen.get(w, "-")) for w in weights)


def sweep(name: str, settings: list[tuple[str, SvdConfig]], tmp: Path) -> list[str]:
    src = load_pair(SAMPLES / f"{name}.onnx")
    data = load_npz(SAMPLES / f"{name}.npz")
    base_bytes, base_params = packed_size(src), n_params(src.model)
    weights = [w.key for w in find_weights(src.model) if w.role == "weight"]
    lines = [
        f"| {name} | ranks ({' / '.join(w.removesuffix('.weight') for w in weights)}) | top-1 | params | packed bytes | ratio |",
        "|---|---|---:|---:|---:|---:|",
        f"| original | full | {100 * test_accuracy(src.runnable(), data):.2f}% | {base_params:,} | {base_bytes:,} | 1.00x |",
    ]
    for label, config in settings:
        result = svd(src.model, src.records, config)
        out = tmp / f"{name}-{label.replace(' ', '_')}.onnx"
        write_pair(result.model, list(result.records.values()), out, force=True)
        pair = load_pair(out)
        size = packed_size(pair)
        lines.append(f"| {label} | {ranks(result, weights)} | {100 * test_accuracy(pair.runnable(), data):.2f}% | "
                     f"{n_params(pair.model):,} | {size:,} | {base_bytes / size:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load_pair(SAMPLES / f"{name}.onnx").model
            total = n_params(model)
            # A per-layer rule also cuts the tiny layers (classifier, first conv) to rank 1 or 2,
            # which the budget allocator never does; --min-params leaves them whole.
            big_only = Selection(min_params=MIN_PARAMS)
            tables = [
                ("kept energy per layer (`--energy E`)",
                 [(f"--energy {e:g}", SvdConfig(energy=LayerRule(e))) for e in ENERGIES]),
                ("parameter ratio per layer (`--ratio P`)",
                 [(f"--ratio {p:g}", SvdConfig(ratio=LayerRule(p))) for p in RATIOS]
                 + [(f"--ratio {p:g} --min-params {MIN_PARAMS}", SvdConfig(ratio=LayerRule(p), selection=big_only))
                    for p in RATIOS]),
                ("whole-model budget (`--target-params N`, N a fraction of the original's parameters)",
                 [(f"--target-params {int(f * total)} ({f:.0%})", SvdConfig(target_params=int(f * total))) for f in BUDGETS]),
            ]
            for title, settings in tables:
                print(f"\n**{name}: {title}**\n")
                print("\n".join(sweep(name, settings, Path(tmp))))


if __name__ == "__main__":
    main()
