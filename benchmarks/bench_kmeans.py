"""Benchmark 1-D k-means in one run: time and within-cluster sum of squares (WCSS) of kmeans1d (its
default and every init) against scikit-learn KMeans from the same starting centroids (n_init=1),
and against the exact optimum where a reference can compute it (the optional `ckwrap` or
`kmeans1d` PyPI packages). Cases: (a) 700k Laplace weights -> 7000 clusters, (b) 25M -> 256,
(c) 700k Laplace -> 256. Every ratio printed is measured in this same run, with a fixed seed."""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import sklearn
from rich.console import Console
from rich.table import Table
from sklearn.cluster import KMeans

from modelsqueeze.kernels.kmeans1d import INITS, assign, init_centroids, kmeans1d, wcss

CASES = {"a": ("700k Laplace -> 7000 clusters", 700_000, 7000),
         "b": ("25M Laplace -> 256 clusters", 25_000_000, 256),
         "c": ("700k Laplace -> 256 clusters", 700_000, 256)}
# The exact references (Ckmeans.1d.dp) keep a k x n table of float64: skip them beyond this size.
MAX_REFERENCE_TABLE_BYTES = 4 << 30


def timed(fn, repeats: int):
    """(best seconds, result) over `repeats` calls (the first pays for fresh memory pages); one call
    only if it takes over 10 s."""
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        if best > 10.0:
            break
    return best, result


def run_sklearn(values: np.ndarray, start: np.ndarray, max_values: int, rng) -> tuple[float, float, str]:
    """(seconds, WCSS on all values, note) of KMeans from `start`; above max_values it fits a random
    subsample, and its centroids are scored on all values."""
    fit_on, note = values, ""
    if values.size > max_values:
        fit_on = rng.choice(values, max_values, replace=False)
        note = f"fit on {max_values:,} of {values.size:,}; est. full ~x{values.size / max_values:.0f} time"
    column = fit_on.astype(np.float64).reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # repeated starting centroids make it warn
        model = KMeans(n_clusters=start.size, init=start.reshape(-1, 1), n_init=1, random_state=0)
        begin = time.perf_counter()
        model.fit(column)
        seconds = time.perf_counter() - begin
    centroids = np.sort(model.cluster_centers_.reshape(-1))
    return seconds, wcss(values, centroids, assign(values, centroids)), note


def run_reference(values: np.ndarray, k: int, choice: str) -> tuple[str, float | None, float | None]:
    """(name or reason, seconds, WCSS) of the exact optimum from an installed reference package."""
    table_bytes = 8 * k * values.size
    if choice == "none":
        return "skipped (--optimum none)", None, None
    if table_bytes > MAX_REFERENCE_TABLE_BYTES:
        return f"skipped: a k x n table is {table_bytes / 2**30:.0f} GiB", None, None
    x = values.astype(np.float64)
    for name in (("ckwrap", "kmeans1d") if choice == "auto" else (choice,)):
        try:
            module = __import__(name)
        except ImportError:
            continue
        begin = time.perf_counter()
        if name == "ckwrap":
            result = module.ckmeans(x, k)
            centroids, labels = np.asarray(result.centers), np.asarray(result.labels)
        else:
            labels, centroids = module.cluster(x, k)
            centroids, labels = np.asarray(centroids), np.asarray(labels)
        seconds = time.perf_counter() - begin
        return f"exact optimum ({name})", seconds, wcss(x, centroids, labels)
    return "unavailable: pip install ckwrap (or kmeans1d) for this column", None, None


def bench_case(key: str, args, console: Console) -> dict:
    title, n, k = CASES[key]
    if args.quick:
        n, k = max(n // 100, 10 * k), max(k // 10, 8)
        title = f"{title} (quick: {n:,} -> {k})"
    rng = np.random.default_rng(args.seed)
    values = rng.laplace(0.0, 0.05, n).astype(np.float32)
    rows = []  # (who, start, seconds, wcss, note)
    ours = {}
    for init in INITS:
        if init == "binned-dp" and k > 2048 and args.skip_slow:
            rows.append(("kmeans1d lloyd", init, None, None, "skipped (--skip-slow)"))
            continue
        seconds, (centroids, labels) = timed(lambda: kmeans1d(values, k, init=init, seed=args.seed),
                                             args.repeats)
        ours[init] = (seconds, wcss(values, centroids, labels))
        rows.append(("kmeans1d lloyd", init + (" (default)" if init == "auto" else ""), seconds,
                     ours[init][1], ""))
    sklearn_runs = {}
    for init in args.sklearn_inits:
        if args.skip_sklearn:
            rows.append(("sklearn KMeans", f"{init}'s start", None, None, "skipped (--skip-sklearn)"))
            continue
        start = init_centroids(values, k, init=init, seed=args.seed)
        seconds, error, note = run_sklearn(values, start, args.sklearn_max_values, rng)
        sklearn_runs[init] = (seconds, error, note)
        rows.append(("sklearn KMeans", f"{init}'s start", seconds, error, note))
    name, seconds, optimum = run_reference(values, k, args.optimum)
    rows.append((name if optimum is not None else "exact optimum", "", seconds, optimum,
                 "" if optimum is not None else name))

    reference = optimum if optimum is not None else min(r[3] for r in rows if r[3] is not None)
    ref_name = "the exact optimum" if optimum is not None else "the best WCSS in this table"
    table = Table(title=f"({key}) {title}; WCSS ratios to {ref_name}")
    for column in ("run", "start", "seconds", "WCSS", "WCSS / ref", "sklearn s / ours s", "note"):
        table.add_column(column, justify="left" if column in ("run", "start", "note") else "right")
    for who, start, secs, error, note in rows:
        speedup = ""
        base = start.split("'")[0]
        if who == "sklearn KMeans" and secs is not None and base in ours:
            speedup = f"{secs / ours[base][0]:,.3g}x"
        table.add_row(who, start, "-" if secs is None else f"{secs:.3f}",
                      "-" if error is None else f"{error:.6g}",
                      "-" if error is None else f"{error / reference:.4f}", speedup, note)
    console.print(table)
    return {"ours": ours, "sklearn": sklearn_runs, "optimum": optimum, "reference": reference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default="abc", help="which cases to run, e.g. 'ac'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of ours")
    parser.add_argument("--sklearn-max-values", type=int, default=2_000_000,
                        help="fit scikit-learn on a random subsample of this many values above it "
                             "(its centroids are scored on all values)")
    parser.add_argument("--sklearn-inits", default="auto,linear",
                        help="which of our starts to hand to scikit-learn, comma-separated")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-slow", action="store_true", help="skip binned-dp beyond 2048 clusters")
    parser.add_argument("--optimum", default="auto", choices=("auto", "ckwrap", "kmeans1d", "none"))
    parser.add_argument("--quick", action="store_true", help="1/100 of the sizes: a smoke test")
    args = parser.parse_args()
    args.sklearn_inits = [i for i in args.sklearn_inits.split(",") if i]
    console = Console(width=150)
    console.print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores (scikit-learn uses all, kmeans1d one), seed {args.seed}")
    results = {key: bench_case(key, args, console) for key in args.cases}
    for key, result in results.items():
        default_seconds, default_error = result["ours"]["auto"]
        line = f"({key}) default: {default_seconds:.3f} s, WCSS / ref {default_error / result['reference']:.4f}"
        if "auto" in result["sklearn"]:
            seconds, error, note = result["sklearn"]["auto"]
            line += (f"; sklearn from the same start: {seconds / default_seconds:,.3g}x the time"
                     f"{' (on its subsample)' if note else ''}, WCSS ours / sklearn {default_error / error:.4f}")
        console.print(line)


if __name__ == "__main__":
    main()
