"""1-D k-means for weight sharing: sort the values once, then every Lloyd step is a binary search of
the midpoints between centroids plus prefix sums (O(k log n), no n x k matrix); exact optimum by
dynamic programming for small inputs; the default starts Lloyd from that optimum on a histogram.

Why "auto" is the default, measured by benchmarks/bench_kmeans.py on 700k Laplace weights (WCSS
over the exact optimum of Ckmeans.1d.dp, which takes 30 s): in 1-D Lloyd's local optima lie far
apart, so the start decides. Into 256 clusters Lloyd ends at 2.30x from a linear start (Han et
al.'s; scikit-learn from it: 2.79x), 5.8x from density, 1.045x from k-means++, 1.002x from
cube-root, and 1.0016x from "binned-dp" (exact DP on a 1024-bin histogram, then Lloyd on all
values) in 0.1-0.2 s. The DP costs ~k^2, so "auto" takes "binned-dp" up to AUTO_DP_MAX_CLUSTERS
and "cube-root" above: 700k -> 7000 clusters in ~0.2 s, over 100x faster than scikit-learn from
the same start (~25-30 s), which ends 7% higher. Lloyd's converged clusters are then improved by
moves it cannot make (drop the cluster that costs least to lose and split the one that gains
most; re-split neighbouring pairs at their best point) while a round gains 0.1%.
"""

from __future__ import annotations

import bisect
import operator

import numpy as np

INITS = ("auto", "linear", "density", "kmeans++", "cube-root", "binned-dp")
METHODS = ("lloyd", "optimal")
# "auto" runs "binned-dp" up to this many clusters (about 1 s at 1024), "cube-root" above.
AUTO_DP_MAX_CLUSTERS = 1024
# The exact DP costs about k times O(n log n) on n distinct values: at 20k values about 0.3 s for
# k = 16, 3 s for k = 256, 30 s for k = 2000.
MAX_OPTIMAL_DISTINCT = 20_000
# Histogram size for "binned-dp": this many bins per cluster, at least MIN_BINS.
BINS_PER_CLUSTER = 4
MIN_BINS = 1024
# Rows evaluated per gap and level of the monotone row-minima search (see _row_minima).
_BLOCK = 8
# Cluster moves go on while a round of them lowers the squared error by at least this fraction.
_MOVE_GAIN = 1e-3
# Split points tried per cluster when refilling, moving or re-splitting clusters.
_SPLIT_POINTS = 32
# Bound on the steps after max_iter that refill empty clusters (they end in exact arithmetic).
_MAX_FINAL_STEPS = 1000
# assign() uses its lookup grid from this many values on.
_GRID_MIN_VALUES = 1 << 16


def kmeans1d(values: np.ndarray, k: int, *, init: str = "auto", method: str = "lloyd",
             seed: int = 0, max_iter: int = 300, sample_weight: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D `values` (any shape, flattened; float16/32/64) into at most k clusters.
    Returns (centroids, labels): centroids float64 sorted strictly ascending, length min(k, number of
    distinct values) (never an empty cluster); labels intp with labels[i] the index of values[i]'s
    centroid (its nearest one; ties to the lower centroid). Deterministic for a given seed.

    init: "auto" (default, see the module docstring), "linear" (k points evenly spaced from min to
    max), "density" (quantiles of the values), "kmeans++" (seeded), "cube-root" (quantiles of
    density^(1/3), the high-resolution optimum), "binned-dp" (exact optimum on a histogram).
    method: "lloyd" (from `init` until assignments stop changing, then cluster moves, see above;
    max_iter Lloyd steps in all; empty clusters are refilled by splitting the one that gains most)
    or "optimal" (exact, `init` unused; at most MAX_OPTIMAL_DISTINCT distinct values). With no more
    distinct values than k, each distinct value is a centroid.

    Empty `values` give empty centroids and labels. Values of zero `sample_weight` take no part in
    the fit (they are only labelled). NaN/inf values or weights, negative weights, k < 1 and unknown
    `init`/`method` names raise ValueError."""
    flat, centroids = _fit(values, k, init, method, seed, max_iter, sample_weight)
    if centroids is None:
        return np.zeros(0), np.zeros(0, np.intp)
    return centroids, assign(flat, centroids)


def fit_centroids(values: np.ndarray, k: int, *, init: str = "auto", method: str = "lloyd", seed: int = 0,
                  max_iter: int = 300, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """kmeans1d's centroids alone (empty for empty `values`), for callers that label the values
    themselves (e.g. a chunk at a time, straight into small codes)."""
    _, centroids = _fit(values, k, init, method, seed, max_iter, sample_weight)
    return np.zeros(0) if centroids is None else centroids


def _fit(values, k, init, method, seed, max_iter, sample_weight) -> tuple[np.ndarray, np.ndarray | None]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if operator.index(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    flat, data = _prepare(values, k, init, sample_weight)
    if data is None:
        return flat, None
    if data.n <= k:
        return flat, data.x.copy()
    if method == "optimal":
        if data.n > MAX_OPTIMAL_DISTINCT:
            raise ValueError(f"method 'optimal' is limited to {MAX_OPTIMAL_DISTINCT} distinct values "
                             f"(got {data.n}); method 'lloyd' with init 'auto' is near-optimal")
        return flat, data.exact_means(_dp_bounds(data.W, data.S, data.Q, k))
    return flat, _lloyd(data, _start(data, k, init, seed), k, max_iter)


def init_centroids(values: np.ndarray, k: int, *, init: str = "auto", seed: int = 0,
                   sample_weight: np.ndarray | None = None) -> np.ndarray:
    """The k ascending starting centroids that kmeans1d's Lloyd would begin from (for handing the
    same start to another k-means, e.g. scikit-learn's `init=`). They may repeat; with no more
    distinct values than k, kmeans1d skips Lloyd and these are just the distinct values."""
    _, data = _prepare(values, k, init, sample_weight)
    if data is None:
        return np.zeros(0)
    if data.n <= k:
        return data.x.copy()
    return np.sort(np.asarray(_start(data, k, init, seed), dtype=np.float64))


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending `centroids` for every value (same shape as `values`),
    ties to the lower centroid: a binary search among the midpoints, O(n log k). Large inputs first
    look their value up in a uniform grid whose cells hold no midpoint (no search, no branch), and
    search only values in the few cells that do: about 6x faster for 25M values and k = 256."""
    centroids = np.asarray(centroids, dtype=np.float64)
    if centroids.ndim != 1 or centroids.size == 0:
        raise ValueError("centroids must be a non-empty 1-D array")
    if not np.isfinite(centroids).all() or (np.diff(centroids) < 0).any():
        raise ValueError("centroids must be finite and ascending")
    values = np.asarray(values)
    if values.dtype.kind not in "fiu" or not np.isfinite(values).all():
        raise ValueError("values must be finite real numbers")
    midpoints = _midpoints(centroids)
    flat = values.reshape(-1)
    if midpoints.size == 0:
        return np.zeros(values.shape, dtype=np.intp)
    lo, hi = float(flat.min()), float(flat.max())
    # The grid needs cells far wider than the rounding of the values (see _grid_search).
    if flat.size < _GRID_MIN_VALUES or (hi - lo) < 1e-3 * max(abs(lo), abs(hi)):
        labels = _nearest(flat, centroids, np.searchsorted(midpoints, flat, side="left"))
    else:
        labels = _grid_search(flat, centroids, midpoints, lo, hi)
    if (midpoints == centroids[1:]).any():  # repeated centroids: the first of equals wins
        labels = np.searchsorted(centroids, centroids, side="left")[labels]
    return labels.reshape(values.shape)


def _grid_search(flat: np.ndarray, centroids: np.ndarray, midpoints: np.ndarray, lo: float,
                 hi: float) -> np.ndarray:
    n_cells = int(np.clip(256 * midpoints.size, 4096, 1 << 18))
    scale = n_cells / (hi - lo)
    edges = lo + np.arange(n_cells + 1) / scale
    # A cell's label holds for every value in it (even one that rounding put in the next cell)
    # when no midpoint lies in the cell widened by a hair; such cells get -1: search those values.
    hair = 1e-6 / scale
    label = np.searchsorted(midpoints, edges[:-1] - hair, side="left")
    label[np.searchsorted(midpoints, edges[1:] + hair, side="left") != label] = -1
    cell = np.subtract(flat, lo, dtype=np.float64)
    cell *= scale
    cell = cell.astype(np.intp)
    np.minimum(cell, n_cells - 1, out=cell)
    labels = label[cell]
    unsure = np.flatnonzero(labels < 0)
    labels[unsure] = _nearest(flat[unsure], centroids, np.searchsorted(midpoints, flat[unsure], side="left"))
    return labels


def _nearest(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`labels` from a search among the midpoints, corrected by the distances themselves: a computed
    midpoint can sit an ulp off the true one, which sends a value an ulp from it (or a centroid an
    ulp from its neighbour) to the farther centroid. Nearest by float64 distance, ties lower."""
    last = centroids.size - 1
    down = labels > 0
    down[down] = (np.abs(values[down] - centroids[labels[down] - 1])
                  <= np.abs(values[down] - centroids[labels[down]]))
    labels = labels - down
    up = labels < last
    up[up] = (np.abs(values[up] - centroids[labels[up] + 1]) < np.abs(values[up] - centroids[labels[up]]))
    return labels + up


def wcss(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray, sample_weight=None) -> float:
    """Within-cluster sum of squares: sum of w * (value - centroids[label])^2."""
    residual = np.asarray(values, dtype=np.float64).reshape(-1) - np.asarray(centroids, np.float64)[
        np.asarray(labels).reshape(-1)]
    squares = residual * residual
    if sample_weight is None:
        return float(squares.sum())
    return float(np.dot(np.asarray(sample_weight, np.float64).reshape(-1), squares))


# --- data ----------------------------------------------------------------------------------------


def _prepare(values, k, init: str, sample_weight) -> tuple[np.ndarray, _Sorted | None]:
    """Check the arguments; the flat values and their sorted distinct values (None when empty)."""
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: expected one of {', '.join(INITS)}")
    flat = _finite_flat(values, "values")
    weights = None
    if sample_weight is not None:
        weights = _finite_flat(sample_weight, "sample_weight").astype(np.float64)
        if weights.size != flat.size:
            raise ValueError(f"sample_weight has {weights.size} entries for {flat.size} values")
        if (weights < 0).any():
            raise ValueError("sample_weight must not be negative")
        if flat.size and not (weights > 0).any():
            raise ValueError("sample_weight is zero everywhere: nothing to cluster")
    return flat, (_Sorted.of(flat, weights) if flat.size else None)


def _finite_flat(array, what: str) -> np.ndarray:
    flat = np.asarray(array).reshape(-1)
    if flat.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be real numbers, got dtype {flat.dtype}")
    if not np.isfinite(flat).all():
        raise ValueError(f"{what} contains NaN or infinity")
    return flat


def _midpoints(centroids: np.ndarray) -> np.ndarray:
    return 0.5 * (centroids[1:] + centroids[:-1])


def _prefix(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.size + 1)
    out[0] = 0.0
    np.cumsum(a, out=out[1:])
    return out


class _Sorted:
    """The distinct values `x` ascending with prefix sums of their weights (W), and of weight * x (S)
    and weight * x^2 (Q) with x shifted by the weighted mean so the sums stay small: any contiguous
    run's weight, mean and squared error is O(1)."""

    def __init__(self, x: np.ndarray, w: np.ndarray, W: np.ndarray | None = None):
        self.x, self.n = x, x.size
        self.W = _prefix(w) if W is None else W
        self.shift = float(np.dot(w, x) / self.W[-1])
        # S = prefix(w * (x - shift)), built in its own array (no separate temporary of n values)
        self.S = np.empty(x.size + 1)
        self.S[0] = 0.0
        weighted = self.S[1:]
        np.subtract(x, self.shift, out=weighted)
        weighted *= w
        np.cumsum(weighted, out=weighted)
        self._Q = None

    def shifted(self) -> np.ndarray:
        return self.x - self.shift

    @classmethod
    def of(cls, flat: np.ndarray, weights: np.ndarray | None) -> _Sorted:
        if weights is None:
            # Sorting in the input's own dtype is faster (float32) and exact; widen afterwards. The
            # distinct values and their counts as np.unique gives them, but the counts' prefix sums
            # (W) straight from where each distinct value starts: big tensors hold fewer arrays.
            native = np.sort(flat.astype(np.float32) if flat.dtype == np.float16 else flat)
            first = np.empty(native.size, bool)
            first[:1] = True
            np.not_equal(native[1:], native[:-1], out=first[1:])
            x = native[first]
            del native
            W = np.empty(x.size + 1)
            W[:-1] = np.flatnonzero(first)
            W[-1] = first.size
            del first
            x = x.astype(np.float64)
            return cls(x, np.diff(W), W)
        x, inverse = np.unique(flat.astype(np.float64), return_inverse=True)
        w = np.bincount(inverse.reshape(-1), weights=weights, minlength=x.size)
        return cls(x[w > 0], w[w > 0])

    @property
    def Q(self) -> np.ndarray:
        if self._Q is None:
            Q = np.empty(self.n + 1)
            Q[0] = 0.0
            squares = Q[1:]
            np.subtract(self.x, self.shift, out=squares)
            squares *= squares
            squares *= np.diff(self.W)
            np.cumsum(squares, out=squares)
            self._Q = Q
        return self._Q

    def bounds(self, centroids: np.ndarray) -> np.ndarray:
        """Cluster boundaries [0, ..., n]: cluster j is x[b[j]:b[j+1]], the values nearest to
        centroid j (a value on a midpoint goes to the lower centroid, as in `assign`)."""
        return np.concatenate(([0], self.splits(centroids[:-1], centroids[1:]), [self.n]))

    def splits(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """First index of the values nearer to `upper` than to `lower` (ties lower), pair by pair:
        a search of the midpoint, corrected like `_nearest` by the distances themselves."""
        x = self.x
        at = np.searchsorted(x, 0.5 * (lower + upper), side="right")
        back = at > 0
        back[back] = np.abs(x[at[back] - 1] - upper[back]) < np.abs(x[at[back] - 1] - lower[back])
        at = at - back
        on = at < self.n
        on[on] = np.abs(x[at[on]] - lower[on]) <= np.abs(x[at[on]] - upper[on])
        return at + on

    def means(self, b: np.ndarray) -> np.ndarray:
        return self.run_means(b[:-1], b[1:])

    def run_means(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Means of the non-empty runs x[lo:hi] from the prefix sums, kept within each run's values
        (rounding about the shift could push them out, even past the next run's)."""
        means = (self.S[hi] - self.S[lo]) / (self.W[hi] - self.W[lo]) + self.shift
        return np.clip(means, self.x[lo], self.x[hi - 1])

    def exact_means(self, b: np.ndarray) -> np.ndarray:
        """Means of the non-empty runs b[j]:b[j+1] summed run by run without the shift (so a run
        of one value has exactly that value as its mean), kept within each run's values."""
        w = np.diff(self.W)
        means = np.add.reduceat(w * self.x, b[:-1]) / np.add.reduceat(w, b[:-1])
        single = b[1:] - b[:-1] == 1
        means[single] = self.x[b[:-1][single]]
        return np.clip(means, self.x[b[:-1]], self.x[b[1:] - 1])

    def cost(self, a, b):
        """Squared error of the runs x[a:b] about their means (0 for empty runs)."""
        weight = self.W[b] - self.W[a]
        total = self.S[b] - self.S[a]
        return np.maximum(self.Q[b] - self.Q[a] - total * total / np.where(weight > 0, weight, 1.0), 0.0)


# --- Lloyd ---------------------------------------------------------------------------------------


def _lloyd(data: _Sorted, centroids: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    """Lloyd from `centroids` until the assignment stops changing, then moves of clusters (see
    _moves) and Lloyd again while a round of them still lowers the squared error by _MOVE_GAIN,
    max_iter Lloyd steps in all. Empty clusters (and missing ones: fewer centroids than k) are
    refilled by splitting the clusters that gain most, so k clusters survive whenever n >= k; out of
    steps, it still steps on until no cluster is empty (each such step lowers the squared error)."""
    b = _refill(data, data.bounds(np.unique(np.asarray(centroids, dtype=np.float64))), k)
    steps, error = 0, np.inf
    while steps < max_iter:
        b, centroids, used, converged = _settle(data, b, max_iter - steps)
        steps += used
        if not converged:
            break
        previous, error = error, float(data.cost(b[:-1], b[1:]).sum())
        moved = _moves(data, b) if steps < max_iter and error < previous * (1 - _MOVE_GAIN) else None
        if moved is None:
            return centroids
        b = moved
    for _ in range(_MAX_FINAL_STEPS):
        centroids = data.exact_means(b)
        new = data.bounds(centroids)
        if (new[1:] > new[:-1]).all():
            return centroids
        b = _refill(data, new, len(new) - 1)
    # Only rounding could get here: keep the centroids that have values.
    return centroids[new[1:] > new[:-1]]


def _settle(data: _Sorted, b: np.ndarray, max_steps: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Lloyd steps from boundaries `b` (the partition, steps used, whether it converged). Each step
    only searches again the boundaries next to a centroid that moved: after the first few steps of a
    large k only a few move, so a step costs far less than O(k log n)."""
    k = len(b) - 1
    b = _refill(data, b, k) if (b[1:] == b[:-1]).any() else b.copy()
    centroids = data.means(b)
    active = np.arange(1, k)  # inner boundaries to search again
    steps = 0
    while steps < max_steps:
        steps += 1
        if active.size == 0:
            # No boundary moves with prefix-sum means: confirm with means summed run by run.
            centroids = data.exact_means(b)
            new = data.bounds(centroids)
            if np.array_equal(new, b):
                return b, centroids, steps, True
            b, active = new, np.arange(1, k)
        else:
            found = data.splits(centroids[active - 1], centroids[active])
            moved = found != b[active]
            active = active[moved]
            b[active] = found[moved]
        if (b[1:] == b[:-1]).any():
            b = _refill(data, b, k)
            centroids, active = data.means(b), np.arange(1, k)
        elif active.size:
            # Clusters on either side of a moved boundary get new means; their boundaries are next.
            touched = np.zeros(k + 1, dtype=bool)
            touched[active - 1] = touched[active] = True
            clusters = np.flatnonzero(touched[:k])
            centroids[clusters] = data.run_means(b[clusters], b[clusters + 1])
            touched[clusters + 1] = True
            touched[0] = touched[k] = False
            active = np.flatnonzero(touched)
    return b, centroids, steps, False


def _best_splits(data: _Sorted, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the runs of boundaries `b` with two or more values: their indices, the squared error that
    splitting each at its best point (see _best_split_points) saves, and that point."""
    sizes = np.diff(b)
    splittable = np.flatnonzero(sizes > 1)
    point, split_cost = _best_split_points(data, b[splittable], b[splittable + 1])
    return splittable, data.cost(b[splittable], b[splittable + 1]) - split_cost, point


def _best_split_points(data: _Sorted, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best point p (lo < p < hi) to split each run x[lo:hi] in two, and the error after; among
    every point of runs up to _SPLIT_POINTS + 1 values, else among _SPLIT_POINTS evenly spread ones
    (so a call costs O(k), not O(n); Lloyd refines the split)."""
    inner = hi - lo - 1
    counts = np.minimum(inner, _SPLIT_POINTS)
    step = np.repeat((inner - 1) / np.maximum(counts - 1, 1), counts)
    point = np.repeat(lo + 1, counts) + (_ragged_arange(counts) * step).astype(np.intp)
    W, S, Q = data.W, data.S, data.Q
    w_p, s_p = W[point], S[point]  # Q[point] cancels out of the two costs
    w_lo, s_lo, q_lo = (np.repeat(a[lo], counts) for a in (W, S, Q))
    w_hi, s_hi, q_hi = (np.repeat(a[hi], counts) for a in (W, S, Q))
    left, right = s_p - s_lo, s_hi - s_p
    split_cost = q_hi - q_lo - left * left / (w_p - w_lo) - right * right / (w_hi - w_p)
    at = _segment_argmin(split_cost, counts)
    return point[at], np.maximum(split_cost[at], 0.0)


def _refill(data: _Sorted, b: np.ndarray, k: int) -> np.ndarray:
    """Drop empty clusters from boundaries `b`, then split the clusters whose best split gains most
    until there are k clusters again."""
    b = np.unique(b)
    while len(b) - 1 < k:
        _, gain, point = _best_splits(data, b)
        b = np.union1d(b, point[np.argsort(-gain, kind="stable")[:k - (len(b) - 1)]])
    return b


def _moves(data: _Sorted, b: np.ndarray) -> np.ndarray | None:
    """Boundaries after one round of moves that Lloyd cannot make (see _swaps, _resplit_pairs), or
    None if none pays."""
    swapped = _swaps(data, b)
    resplit = _resplit_pairs(data, b if swapped is None else swapped)
    return swapped if resplit is None else resplit


def _swaps(data: _Sorted, b: np.ndarray) -> np.ndarray | None:
    """Boundaries after moving low-utility clusters to where a split saves more than their removal
    costs (each removed cluster's values go to its neighbours), or None if no move pays."""
    k = len(b) - 1
    if k < 3:
        return None
    centroids = data.means(b)
    # Removing inner cluster j: its values split between j-1 and j+1 at their midpoint.
    j = np.arange(1, k - 1)
    cut = np.clip(np.searchsorted(data.x, 0.5 * (centroids[j - 1] + centroids[j + 1]), side="right"),
                  b[j], b[j + 1])
    before = data.cost(b[j - 1], b[j]) + data.cost(b[j], b[j + 1]) + data.cost(b[j + 1], b[j + 2])
    loss = data.cost(b[j - 1], cut) + data.cost(cut, b[j + 2]) - before
    by_loss = np.argsort(loss, kind="stable")
    # A split saves at most the cluster's error, which bounds how many pairs can pay: only the
    # clusters of largest error (a few times that many) need their best split searched.
    error = data.cost(b[:-1], b[1:])
    by_error = np.argsort(-error, kind="stable")
    n_bound = int(np.sum(error[by_error[:loss.size]] > loss[by_loss[:k]]))
    if n_bound == 0:
        return None
    candidates = np.sort(by_error[:4 * n_bound + 16])
    candidates = candidates[b[candidates + 1] - b[candidates] > 1]
    point, split_cost = _best_split_points(data, b[candidates], b[candidates + 1])
    splittable, gain = candidates, error[candidates] - split_cost
    by_gain = np.argsort(-gain, kind="stable")
    n_pairs = int(np.sum(gain[by_gain[:by_loss.size]] > loss[by_loss[:by_gain.size]] + 1e-12 * before.sum()))
    busy = np.zeros(k, dtype=bool)
    drop, add = [], []
    for g, r in zip(by_gain[:n_pairs], by_loss[:n_pairs]):
        split, removed = splittable[g], j[r]
        if busy[split] or busy[removed - 1:removed + 2].any() or abs(split - removed) <= 1:
            continue
        busy[split] = True
        busy[removed - 1:removed + 2] = True
        drop += [removed, removed + 1]
        add += [cut[r], point[g]]
    if not add:
        return None
    return np.union1d(np.delete(b, drop), add)


def _resplit_pairs(data: _Sorted, b: np.ndarray) -> np.ndarray | None:
    """Boundaries after re-splitting pairs of neighbouring clusters at their best 2-means point
    (Lloyd's midpoint rule only finds a local one), even pairs then odd ones so no two overlap; None
    if none moves."""
    moved = False
    for parity in (0, 1):
        j = np.arange(1 + parity, len(b) - 1, 2)  # inner boundary j between clusters j-1 and j
        j = j[b[j + 1] - b[j - 1] > 1]
        if j.size == 0:
            continue
        point, after = _best_split_points(data, b[j - 1], b[j + 1])
        before = data.cost(b[j - 1], b[j]) + data.cost(b[j], b[j + 1])
        better = after < before - 1e-12 * np.abs(before)
        if better.any():
            b = b.copy()
            b[j[better]] = point[better]
            moved = True
    return b if moved else None


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..counts[0]), [0..counts[1]), ..."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if ends.size else 0) - np.repeat(ends - counts, counts)


def _segment_argmin(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat index of the first minimum of each consecutive segment (all counts >= 1)."""
    starts = np.cumsum(counts) - counts
    seg = np.repeat(np.arange(counts.size), counts)
    at_min = np.flatnonzero(values <= np.minimum.reduceat(values, starts)[seg])
    first = np.ones(at_min.size, dtype=bool)
    first[1:] = seg[at_min[1:]] != seg[at_min[:-1]]
    return at_min[first]


# --- exact DP ------------------------------------------------------------------------------------


def _dp_bounds(W: np.ndarray, S: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    """Boundaries [0, ..., m] of the optimal k-partition of m weighted items in order, given prefix
    sums of weight, weight * x and weight * x^2 (Wang & Song's Ckmeans.1d.dp recurrence).

    Layer j's best cost of the first j + t items in j clusters is
    D_j[t] = min over s <= t of D_{j-1}[s] + cost(items j-1+s .. j+t); the best s is nondecreasing
    in t (the cost is Monge), so each layer is one monotone row-minima search, further bounded below
    by the previous layer's split points."""
    m = W.size - 1
    width = m - k + 1  # layer j needs j <= i <= m - k + j items covered

    total = S[1:width + 1]
    best = Q[1:width + 1] - total * total / W[1:width + 1]  # layer 1: items 0 .. t
    split = np.zeros((k, width), dtype=np.int32)
    for j in range(2, k + 1):
        # Candidate s starts the last cluster at item j-1+s, row t ends it before item j+t: slices
        # make both plain indices, and D_{j-1}[s] - Q[j-1+s] is one array.
        base, s_lo, w_lo = best - Q[j - 1:j - 1 + width], S[j - 1:], W[j - 1:]
        q_hi, s_hi, w_hi = Q[j:], S[j:], W[j:]

        def layer(s, t):
            total = s_hi[t] - s_lo[s]
            return base[s] + q_hi[t] - total * total / (w_hi[t] - w_lo[s])

        # Knuth/Yao: the last cluster of j clusters starts no earlier than that of j - 1 clusters
        # over the same items (layer j - 1's row t + 1 covers as many items as layer j's row t).
        floor = np.maximum(np.append(split[j - 2, 1:], split[j - 2, -1]) - 1, 0)
        best, split[j - 1] = _row_minima(layer, width, floor)
    bounds = np.empty(k + 1, dtype=np.intp)
    bounds[k], t = m, width - 1
    for j in range(k, 1, -1):
        t = int(split[j - 1, t])
        bounds[j - 1] = j - 1 + t
    bounds[0] = 0
    return bounds


def _row_minima(f, n_rows: int, floor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and leftmost argmin over s in [floor[t], t] of f(s, t) for every row t < n_rows, when the
    argmin is nondecreasing in t. Blocked divide and conquer: a level solves every open row at once
    when their candidates add up to little, else about _BLOCK evenly spread rows of every gap between
    solved rows (whose argmins bound the gap's), so a layer takes a few vectorised levels."""
    best = np.empty(n_rows)
    arg = np.zeros(n_rows, dtype=np.intp)
    solved = np.zeros(n_rows, dtype=bool)
    rows = np.arange(n_rows)
    while True:
        open_rows = np.flatnonzero(~solved)
        if open_rows.size == 0:
            return best, arg
        # Nearest solved row on each side (sentinels -1 and n_rows allow any argmin).
        left = np.maximum.accumulate(np.where(solved, rows, -1))[open_rows]
        right = np.minimum.accumulate(np.where(solved, rows, n_rows)[::-1])[::-1][open_rows]
        lo = np.maximum(np.where(left >= 0, arg[np.maximum(left, 0)], 0), floor[open_rows])
        hi = np.minimum(np.where(right < n_rows, arg[np.minimum(right, n_rows - 1)], n_rows - 1), open_rows)
        hi = np.maximum(hi, lo)  # only rounding could break monotonicity; keep a candidate
        counts = hi - lo + 1
        if counts.sum() > _BLOCK * n_rows:
            # Pick rows where a multiple of (gap + 1) / (_BLOCK + 1) falls: _BLOCK per gap, or all.
            position, gap = open_rows - left, right - left
            pick = (position * (_BLOCK + 1)) // gap > ((position - 1) * (_BLOCK + 1)) // gap
            open_rows, lo, counts = open_rows[pick], lo[pick], counts[pick]
        s = _ragged_arange(counts) + np.repeat(lo, counts)
        values = f(s, np.repeat(open_rows, counts))
        at = _segment_argmin(values, counts)
        best[open_rows], arg[open_rows] = values[at], s[at]
        solved[open_rows] = True


# --- initialisations -----------------------------------------------------------------------------


def _init_linear(data: _Sorted, k: int, seed: int) -> np.ndarray:
    """k points evenly spaced from the smallest to the largest value (Han et al.'s choice)."""
    return np.linspace(data.x[0], data.x[-1], k)


def _init_density(data: _Sorted, k: int, seed: int) -> np.ndarray:
    """The values at the (i + 1/2)/k quantiles of their weighted CDF."""
    targets = (np.arange(k) + 0.5) / k * data.W[-1]
    return data.x[np.minimum(np.searchsorted(data.W[1:], targets), data.n - 1)]


def _init_kmeanspp(data: _Sorted, k: int, seed: int) -> np.ndarray:
    """Seeded k-means++ (each next centre drawn with probability weight * distance^2). In 1-D a new
    centre only changes the distances between its neighbours' midpoints, and draws go through
    block sums, so each draw costs O(sqrt(n) + that stretch) instead of O(n)."""
    rng = np.random.default_rng(seed)
    x, w = data.x, np.diff(data.W)
    first = min(int(np.searchsorted(data.W[1:], rng.random() * data.W[-1], side="right")), data.n - 1)
    centres = [float(x[first])]
    d2 = (x - centres[0]) ** 2
    mass = w * d2  # what the next draw is proportional to
    block = max(int(np.sqrt(data.n)), 1)
    sums = np.add.reduceat(mass, np.arange(0, data.n, block))
    for _ in range(k - 1):
        cum = np.cumsum(sums)
        target = rng.random() * cum[-1]
        i = min(int(np.searchsorted(cum, target, side="right")), sums.size - 1)
        inside = np.cumsum(mass[i * block:(i + 1) * block])
        j = min(int(np.searchsorted(inside, target - (cum[i - 1] if i else 0.0), side="right")), inside.size - 1)
        if mass[i * block + j] <= 0:  # rounding at a block edge: the block's heaviest point instead
            j = int(np.argmax(mass[i * block:(i + 1) * block]))
        c = float(x[i * block + j])
        at = bisect.bisect_left(centres, c)
        left = 0 if at == 0 else int(np.searchsorted(x, 0.5 * (centres[at - 1] + c), side="right"))
        right = data.n if at == len(centres) else int(np.searchsorted(x, 0.5 * (c + centres[at]), side="right"))
        centres.insert(at, c)
        d2[left:right] = np.minimum(d2[left:right], (x[left:right] - c) ** 2)
        mass[left:right] = w[left:right] * d2[left:right]
        lo, hi = left // block, (right - 1) // block + 1
        sums[lo:hi] = np.add.reduceat(mass[lo * block:hi * block], np.arange(0, (hi - lo) * block, block))
    return np.asarray(centres)


def _bins(data: _Sorted, n_bins: int) -> np.ndarray:
    """Boundaries (indices into data.x) of at most n_bins runs: half cut at equal steps of value
    (resolution in the tails), half at equal steps of weight (resolution where values are dense)."""
    half = max(n_bins // 2, 1)
    by_weight = np.searchsorted(data.W, np.linspace(0, data.W[-1], half + 1)[1:-1], side="left")
    by_value = np.searchsorted(data.x, np.linspace(data.x[0], data.x[-1], half + 1)[1:-1], side="right")
    return np.unique(np.concatenate(([0], by_weight, by_value, [data.n])))


def _init_binned_dp(data: _Sorted, k: int, seed: int) -> np.ndarray:
    """Means of the optimal k-partition of a histogram of max(MIN_BINS, BINS_PER_CLUSTER * k) bins
    spread like the optimal centroids (cube-root density), or of the values themselves when there
    are no more of them than that (then exact): Lloyd then only polishes."""
    n_bins = max(MIN_BINS, BINS_PER_CLUSTER * k)
    if data.n <= n_bins:
        cuts = np.arange(data.n + 1)
    else:
        inner = np.searchsorted(data.x, _midpoints(_cube_root_points(data, n_bins)), side="right")
        cuts = np.unique(np.concatenate(([0], inner, [data.n])))
    b = cuts[_dp_bounds(data.W[cuts], data.S[cuts], data.Q[cuts], min(k, cuts.size - 1))]
    return data.means(b)


def _init_cube_root(data: _Sorted, k: int, seed: int) -> np.ndarray:
    """Quantiles of density^(1/3): the high-resolution optimum (Panter & Dite)."""
    return _cube_root_points(data, k)


def _cube_root_points(data: _Sorted, k: int) -> np.ndarray:
    """k points at the (i + 1/2)/k quantiles of density^(1/3), the density from a histogram of
    max(MIN_BINS, 4k) bins."""
    cuts = _bins(data, max(MIN_BINS, 4 * k))
    inner_edges = 0.5 * (data.x[cuts[1:-1] - 1] + data.x[cuts[1:-1]])
    edges = np.concatenate(([data.x[0]], inner_edges, [data.x[-1]]))
    width = np.diff(edges)
    mass = np.diff(data.W[cuts])
    cum = _prefix(np.cbrt(mass * width * width))  # (mass / width)^(1/3) * width per bin
    targets = (np.arange(k) + 0.5) / k * cum[-1]
    return np.interp(targets, cum, edges)


_INIT = {"binned-dp": _init_binned_dp, "linear": _init_linear, "density": _init_density,
         "kmeans++": _init_kmeanspp, "cube-root": _init_cube_root}


def _start(data: _Sorted, k: int, init: str, seed: int) -> np.ndarray:
    if init == "auto":
        init = "binned-dp" if k <= AUTO_DP_MAX_CLUSTERS else "cube-root"
    return _INIT[init](data, k, seed)
