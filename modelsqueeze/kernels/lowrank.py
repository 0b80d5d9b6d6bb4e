"""Low-rank factorization of a 2-D weight W (K x N) into A (K x r) . B (r x N) by truncated SVD,
the rank choices (rank, kept energy, parameter ratio, relative error), and a rank allocator for a
parameter budget across several matrices. Pure numpy, plus scikit-learn's randomized SVD.

Conventions: a matrix's *energy* is ||W||_F^2 = sum of its squared singular values; the singular
values are split as square roots into both factors (A = U sqrt(S), B = sqrt(S) V^T), so A and B
have equal spectral norms and similar ranges, which suits quantizing or clustering them later.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.utils.extmath import randomized_svd, svd_flip

METHODS = ("auto", "exact", "randomized")

# Measured (benchmarks/bench_svd_speed.py, "factorization" table, 2 cores): from a smaller side of
# 256 and up to ranks of 10% of it, the randomized SVD is 1.5-10x faster than LAPACK's full SVD
# (one exception: 512x512 at rank 51 with two BLAS threads, 0.13 s against 0.11 s), always within
# 0.01% of the optimal error; at 20% it loses with two threads. Below 256 both take milliseconds.
RANDOMIZED_MIN_SIDE = 256
RANDOMIZED_MAX_RANK_FRACTION = 0.1
# "Equal error": a randomized factorization is kept when its relative Frobenius error is within
# this fraction of the optimal (Eckart-Young) error; otherwise the exact SVD is computed instead.
ERROR_TOLERANCE = 1e-3
RANDOM_STATE = 0


def energies(w: np.ndarray) -> np.ndarray:
    """The squared singular values of a 2-D `w`, largest first (float64, min(K, N) of them).
    Eigenvalues of the smaller Gram matrix: several times cheaper than an SVD without vectors,
    and each is off by at most ~1e-16 of the largest, which no rank choice can notice."""
    w = np.asarray(w, dtype=np.float64)
    k, n = w.shape
    gram = w.T @ w if k >= n else w @ w.T
    values = np.linalg.eigvalsh(gram)[::-1]
    return np.maximum(values, 0.0)


def tails(spectrum: np.ndarray) -> np.ndarray:
    """tails[r] = the energy a rank-r truncation discards (sum of spectrum[r:]), for r = 0..len."""
    return np.concatenate([np.cumsum(spectrum[::-1])[::-1], [0.0]])


def factor_params(k: int, n: int, rank: int) -> int:
    return rank * (k + n)


def saving_rank_limit(k: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the K x N matrix (0: none)."""
    if k <= 0 or n <= 0:
        return 0
    return (k * n - 1) // (k + n)


def rank_for_energy(spectrum: np.ndarray, keep: float) -> int:
    """The smallest rank (>= 1) whose truncation keeps at least fraction `keep` of the energy."""
    if not 0 < keep <= 1:
        raise ValueError(f"energy {keep} is not in (0, 1]")
    discarded = tails(spectrum)
    allowed = (1.0 - keep) * discarded[0]
    return _first_at_most(discarded, allowed)


def rank_for_error(spectrum: np.ndarray, max_error: float) -> int:
    """The smallest rank (>= 1) whose relative Frobenius error ||W - A B|| / ||W|| is at most `max_error`."""
    if not 0 <= max_error < 1:
        raise ValueError(f"max error {max_error} is not in [0, 1)")
    discarded = tails(spectrum)
    return _first_at_most(discarded, max_error**2 * discarded[0])


def _first_at_most(discarded: np.ndarray, allowed: float) -> int:
    ok = np.flatnonzero(discarded[1:] <= allowed)  # ranks 1..len
    return int(ok[0]) + 1 if ok.size else discarded.size - 1


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """The largest rank whose factors hold at most fraction `ratio` of the K x N parameters (may be 0)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio {ratio} is not in (0, 1]")
    return min(int(np.floor(ratio * k * n / (k + n))), k, n)


def prefers_randomized(k: int, n: int, rank: int) -> bool:
    side = min(k, n)
    return side >= RANDOMIZED_MIN_SIDE and rank <= RANDOMIZED_MAX_RANK_FRACTION * side


@dataclass(frozen=True)
class Factors:
    """W ~= a @ b, with how they were found and how close they are (relative to ||W||_F)."""

    a: np.ndarray  # K x r
    b: np.ndarray  # r x N
    method: str  # "exact" or "randomized"
    kept_energy: float  # ||A B||^2 / ||W||^2 of the factorization (before rounding to the dtype)
    relative_error: float  # ||W - A B||_F / ||W||_F, measured on the factors as stored
    optimal_error: float  # sqrt(discarded squared singular values) / ||W||_F (Eckart-Young)

    @property
    def rank(self) -> int:
        return self.a.shape[1]


def factorize(
    w: np.ndarray, rank: int, spectrum: np.ndarray | None = None, method: str = "auto",
    random_state: int = RANDOM_STATE,
) -> Factors:
    """The best rank-`rank` factorization of 2-D `w` (factors in w's dtype). `spectrum` (from
    `energies`) saves recomputing it. "auto" uses the randomized SVD where it is faster
    (`prefers_randomized`) and keeps its result only when its error is within ERROR_TOLERANCE
    of the optimal one, else the exact SVD: the same result quality either way, deterministically."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {w.shape}")
    k, n = w.shape
    if not 1 <= rank <= min(k, n):
        raise ValueError(f"rank {rank} is not in 1..{min(k, n)} for a {k} x {n} matrix")
    w64 = w.astype(np.float64)
    if spectrum is None:
        spectrum = energies(w64)
    total = float(np.sum(w64 * w64))
    optimal = float(tails(spectrum)[rank])
    chosen = method if method != "auto" else ("randomized" if prefers_randomized(k, n, rank) else "exact")
    if chosen == "randomized":
        u, s, vt = randomized_svd(w64, rank, n_oversamples=max(10, rank // 2), n_iter=7,
                                  random_state=random_state)
        discarded = max(total - float(np.sum(s * s)), 0.0)
        if method == "auto" and discarded > optimal * (1 + ERROR_TOLERANCE) ** 2 + 1e-12 * total:
            chosen = "exact"
    if chosen == "exact":
        u, s, vt = np.linalg.svd(w64, full_matrices=False)
        u, vt = svd_flip(u, vt)  # deterministic signs
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    root = np.sqrt(s)
    a = (u * root).astype(w.dtype)
    b = (root[:, None] * vt).astype(w.dtype)
    if total > 0:
        error = float(np.linalg.norm(w64 - a.astype(np.float64) @ b.astype(np.float64)) / np.sqrt(total))
        kept = min(float(np.sum(s * s)) / total, 1.0)
    else:
        error, kept = 0.0, 1.0
    return Factors(a, b, chosen, kept, error, float(np.sqrt(optimal / total)) if total > 0 else 0.0)


def allocate_ranks(spectra: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]], budget: int) -> list[int]:
    """Ranks for several K x N matrices whose parameters total at most `budget`, minimising the sum
    over matrices of the energy discarded *relative to each matrix's own energy* (every layer's
    relative error counts alike, whatever its scale: a layer before a normalisation can be rescaled
    at will). 0 means the matrix stays whole (K*N parameters, nothing discarded).

    Greedy on the marginal relative energy per parameter, from rank 1 everywhere: each step adds
    the next singular value (K+N parameters) or, from the largest saving rank, restores the whole
    matrix. Steps that gain nothing are not taken. Needs budget >= sum of (K+N)."""
    if len(spectra) != len(shapes):
        raise ValueError("one spectrum per shape")
    ranks = [1] * len(shapes)
    spent = sum(k + n for k, n in shapes)
    if spent > budget:
        raise ValueError(f"budget {budget} is below {spent}, the parameters of rank 1 everywhere")
    relative = [s / s.sum() if s.sum() > 0 else np.zeros_like(s) for s in spectra]
    limits = [saving_rank_limit(k, n) for k, n in shapes]
    heap: list[tuple[float, int, int, int]] = []  # (-gain per parameter, layer, cost, next rank; 0 = whole)

    def push(i: int) -> None:
        k, n = shapes[i]
        r = ranks[i]
        if r == 0:
            return
        if r < limits[i]:
            gain, cost, nxt = float(relative[i][r]), k + n, r + 1
        else:
            gain, cost, nxt = float(relative[i][r:].sum()), k * n - r * (k + n), 0
        if gain > 0:
            heapq.heappush(heap, (-gain / cost, i, cost, nxt))

    for i in range(len(shapes)):
        push(i)
    while heap:
        _, i, cost, nxt = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer's later steps cost as much or more per gain: it stops here
        spent += cost
        ranks[i] = nxt
        push(i)
    return ranks
