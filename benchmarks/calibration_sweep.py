"""Data-free against data-aware compression (`--calibration`, and `--sequential`) at the same
setting: packed bytes (skeleton + sidecar) and top-1 accuracy with onnxruntime on the held-out test
split. The calibration data is the unlabelled `*_calib.npz` (training images, not the test set).
Prints Markdown tables; the README's calibration tables are this script's output.

Run as `python benchmarks/calibration_sweep.py [--models lenet300 lenet5] [--chains]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from modelsqueeze.model import find_weights
from modelsqueeze.pack import load_pair, packed_size
from modelsqueeze.pipeline import run_steps
from modelsqueeze.recipe import make_step
from modelsqueeze.validate import load_npz, top1_accuracy

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MODES = {"data-free": {}, "calibrated": {"calibration": None}, "sequential": {"calibration": None, "sequential": True}}


def settings(total_params: int) -> list[tuple[str, list[tuple[str, dict]]]]:
    """(label, steps) of the single-method comparisons the issue asks for."""
    return [
        ("prune 90% per layer", [("prune", {"sparsity": 0.9})]),
        ("prune 90% global", [("prune", {"sparsity": 0.9, "scope": "global"})]),
        ("cluster 3 bits", [("cluster", {"bits": 3})]),
        ("cluster 2 bits", [("cluster", {"bits": 2})]),
        ("quantize int4 per channel", [("quantize", {"bits": 4})]),
        ("quantize 3 bits per channel", [("quantize", {"bits": 3})]),
        ("svd 25% of parameters", [("svd", {"target_params": total_params // 4})]),
    ]


CHAINS = [
    ("prune 90% global → cluster 3 bits → huffman", [("prune", {"sparsity": 0.9, "scope": "global"}), ("cluster", {"bits": 3}), ("huffman", {})]),
    ("prune 92% global → cluster 3 bits → huffman", [("prune", {"sparsity": 0.92, "scope": "global"}), ("cluster", {"bits": 3}), ("huffman", {})]),
    ("prune 93% global → cluster 4 bits → huffman", [("prune", {"sparsity": 0.93, "scope": "global"}), ("cluster", {"bits": 4}), ("huffman", {})]),
    ("prune 95% global → cluster 3 bits → huffman", [("prune", {"sparsity": 0.95, "scope": "global"}), ("cluster", {"bits": 3}), ("huffman", {})]),
]


def measure(pair, steps, test: dict) -> tuple[int, float, float]:
    start = time.perf_counter()
    model, records, outcomes = run_steps(pair.model, pair.records, steps,
                                         measure=lambda graph: top1_accuracy(graph, test, source="test data"))
    return outcomes[-1].packed_bytes, outcomes[-1].accuracy, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--chains", action="store_true", help="also the Deep Compression chains")
    args = parser.parse_args()
    for name in args.models:
        pair = load_pair(SAMPLES / f"{name}.onnx")
        test = load_npz(SAMPLES / f"{name}.npz")
        calib = str(SAMPLES / f"{name}_calib.npz")
        base_bytes, base_acc = packed_size(pair), top1_accuracy(pair.runnable(), test, source="test data")
        total = sum(w.n_params for w in find_weights(pair.model))
        print(f"\n### {name}: {base_bytes:,} B, {100 * base_acc:.2f}% (test), calibration {Path(calib).name}\n")
        print("| setting | mode | packed bytes | ratio | accuracy | drop (pp) | drop / data-free drop | time |")
        print("|---|---|---|---|---|---|---|---|")
        rows = settings(total) + (CHAINS if args.chains else [])
        for label, spec in rows:
            free_drop = None
            for mode, extra in MODES.items():
                options = {k: (calib if v is None else v) for k, v in extra.items()}
                steps = [make_step(cmd, {**opts, **(options if cmd != "huffman" else {})}) for cmd, opts in spec]
                size, acc, seconds = measure(pair, steps, test)
                drop = 100 * (base_acc - acc)
                if mode == "data-free":
                    free_drop = drop
                    share = ""
                else:
                    share = f"{drop / free_drop:.2f}" if free_drop and free_drop > 0 else "-"
                print(f"| {label} | {mode} | {size:,} | {base_bytes / size:.2f}x | {100 * acc:.2f}% | {drop:+.2f} | {share} | {seconds:.1f} s |",
                      flush=True)


if __name__ == "__main__":
    main()
