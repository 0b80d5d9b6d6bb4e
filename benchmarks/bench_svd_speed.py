"""Speed of low-rank factorization, two tables:

1. latency: onnxruntime latency of the original LeNet-300-100 against the model factored by
   `svd --rank R` (every layer where rank R saves parameters), at batch 1 and batch 256, with
   intra_op_num_threads 1 and 2: the median of many runs, models interleaved so that machine load
   drifts hit all of them alike.
2. factorization: the kernel's exact SVD (LAPACK) against scikit-learn's randomized SVD on
   matrices with a slowly decaying spectrum (singular values i^-0.4, like trained layers): time
   and the randomized result's Frobenius error above the optimal one, and what `auto` picks, with
   1 and 2 BLAS threads.

Run as `python benchmarks/bench_svd_speed.py [--only latency|factorization]`; prints Markdown."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.utils.extmath import randomized_svd
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from modelsqueeze.kernels import lowrank
from modelsqueeze.model import model_to_bytes
from modelsqueeze.pack import load_pair, write_pair
from modelsqueeze.passes import LayerRule
from modelsqueeze.passes.svd import SvdConfig, svd

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
RANKS = (8, 16, 32, 64, 128)
BATCHES = {1: 3000, 256: 300}  # batch size -> timed runs per model
ROUNDS = 10


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def latency_table() -> list[str]:
    src = load_pair(SAMPLES / "lenet300.onnx")
    x_all = np.load(SAMPLES / "lenet300.npz")["x"].astype(np.float32)
    models = [("original", model_to_bytes(src.runnable()), 266_200)]
    with tempfile.TemporaryDirectory() as tmp:
        for rank in RANKS:
            result = svd(src.model, src.records, SvdConfig(rank=LayerRule(rank)))
            out = Path(tmp) / f"rank{rank}.onnx"
            write_pair(result.model, list(result.records.values()), out)
            macs = 266_200 - sum(layer.macs_before - layer.macs_after for layer in result.layers)
            ranks = {layer.weight.split(".")[0]: layer.rank for layer in result.layers}
            label = f"--rank {rank} (" + ", ".join(f"{k} {v}" for k, v in ranks.items()) + ")"
            models.append((label, model_to_bytes(load_pair(out).runnable()), macs))
    lines = [
        "| model | MACs/sample | " + " | ".join(f"batch {b}, {t} thread{'s' * (t > 1)}" for b in BATCHES for t in (1, 2)) + " |",
        "|---|---:|" + "---:|" * (2 * len(BATCHES)),
    ]
    cells: dict[str, list[str]] = {label: [] for label, _, _ in models}
    for batch, runs in BATCHES.items():
        feed = {"x": x_all[:batch]}
        for threads in (1, 2):
            sessions = [(label, session(data, threads)) for label, data, _ in models]
            for _, sess in sessions:  # warm-up
                for _ in range(20):
                    sess.run(None, feed)
            times: dict[str, list[float]] = {label: [] for label, _ in sessions}
            for _ in range(ROUNDS):
                for label, sess in sessions:
                    for _ in range(runs // ROUNDS):
                        start = time.perf_counter()
                        sess.run(None, feed)
                        times[label].append(time.perf_counter() - start)
            base = statistics.median(times["original"])
            for label, _ in sessions:
                median = statistics.median(times[label])
                cells[label].append(f"{1e6 * median:,.1f} µs ({base / median:.2f}x)")
    for label, _, macs in models:
        lines.append(f"| {label} | {macs:,} | " + " | ".join(cells[label]) + " |")
    return lines


def best_time(fn, repeats: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def factorization_table() -> list[str]:
    rng = np.random.default_rng(0)
    threads = (1, os.cpu_count() or 1) if (os.cpu_count() or 1) > 1 else (1,)
    lines = [
        "| matrix | rank | " + " | ".join(f"exact SVD, {t} BLAS thread{'s' * (t > 1)}" for t in threads) + " | "
        + " | ".join(f"randomized, {t} BLAS thread{'s' * (t > 1)}" for t in threads)
        + " | randomized error above optimal | auto uses |",
        "|---|---:|" + "---:|" * (2 * len(threads) + 1) + "---|",
    ]
    for k, n in ((256, 256), (512, 512), (1024, 1024), (1024, 4096)):
        side = min(k, n)
        u, _ = np.linalg.qr(rng.standard_normal((k, side)))
        v, _ = np.linalg.qr(rng.standard_normal((n, side)))
        w = ((u * np.arange(1, side + 1) ** -0.4) @ v.T).astype(np.float32)
        w64 = w.astype(np.float64)
        exact = []
        for t in threads:
            with threadpool_limits(t):
                exact.append(best_time(lambda: np.linalg.svd(w64, full_matrices=False))[0])
        spectrum = lowrank.energies(w64)
        discarded = lowrank.tails(spectrum)
        for fraction in (0.02, 0.05, 0.1, 0.2):
            rank = max(1, int(fraction * side))
            randomized = []
            for t in threads:
                with threadpool_limits(t):
                    seconds, (_, s, _) = best_time(lambda: randomized_svd(
                        w64, rank, n_oversamples=max(10, rank // 2), n_iter=7, random_state=lowrank.RANDOM_STATE))
                randomized.append(seconds)
            error = np.sqrt(max(float(np.sum(w64 * w64)) - float(np.sum(s * s)), 0.0))
            optimal = np.sqrt(discarded[rank])
            auto = lowrank.factorize(w, rank, spectrum).method
            lines.append(f"| {k}x{n} | {rank} | " + " | ".join(f"{t:.3f} s" for t in exact + randomized)
                         + f" | {100 * (error / optimal - 1):.3f}% | {auto} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["latency", "factorization"])
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    if args.only in (None, "latency"):
        print("\n**LeNet-300-100 latency, median per call (speed-up against the original)**\n")
        print("\n".join(latency_table()))
    if args.only in (None, "factorization"):
        print(f"\n**Factorization (best of 3; auto keeps a randomized result only within "
              f"{100 * lowrank.ERROR_TOLERANCE:g}% of the optimal error)**\n")
        print("\n".join(factorization_table()))
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
