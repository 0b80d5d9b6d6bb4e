"""Pruning masks: unstructured magnitude (by count, threshold or std scale; per tensor or global),
structured (whole output channels by L1/L2 norm) and N:M. Masks are boolean keep-masks."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def n_to_prune(n: int, sparsity: float) -> int:
    """How many of n weights a sparsity fraction zeroes (rounded to nearest, ties to even)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity {sparsity} is not in [0, 1]")
    return int(round(sparsity * n))


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing exactly round(sparsity * n) weights of smallest magnitude (ties broken by
    position, so the result is deterministic)."""
    return global_magnitude_masks([weights], sparsity)[0]


def threshold_mask(weights: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-mask zeroing every weight with |w| < threshold."""
    return np.abs(weights) >= threshold


def std_threshold(arrays: Sequence[np.ndarray], scale: float) -> float:
    """Han et al.'s threshold: `scale` times the standard deviation of the weights."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    return float(scale * values.std()) if values.size else 0.0


def global_magnitude_masks(arrays: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks for several tensors sharing one magnitude ranking: exactly round(sparsity * N)
    of all N weights are zeroed, the smallest first, ties broken by tensor then position (what a
    stable sort of all magnitudes gives). O(N) selection, no sort: the k-th smallest magnitude t
    is found with a partition of one scratch copy; everything below t goes, and of the weights
    equal to t the earliest go until k are gone. NaN weights rank above every number (kept)."""
    mags = [np.abs(np.asarray(a)).reshape(-1) for a in arrays]
    total = sum(m.size for m in mags)
    k = n_to_prune(total, sparsity)
    if k == 0:
        return [np.ones(a.shape, dtype=bool) for a in arrays]
    if k >= total:
        return [np.zeros(a.shape, dtype=bool) for a in arrays]
    scratch = np.concatenate(mags) if len(mags) > 1 else mags[0].copy()
    scratch.partition(k - 1)  # NaN sorts last, as in a sort
    t = scratch[k - 1]
    del scratch
    if np.isnan(t):  # more weights to zero than numbers: every number goes, then the earliest NaNs
        below = [~np.isnan(m) for m in mags]
        ties = [np.isnan(m) for m in mags]
    else:
        below = [m < t for m in mags]
        ties = [m == t for m in mags]
    need = k - sum(int(np.count_nonzero(b)) for b in below)
    masks = []
    for a, b, tie in zip(arrays, below, ties):
        drop = b
        if need > 0:
            positions = np.flatnonzero(tie)[:need]
            drop[positions] = True
            need -= positions.size
        masks.append(~drop.reshape(a.shape))
    return masks


def channel_norms(weights: np.ndarray, axis: int, norm: str = "l2") -> np.ndarray:
    """L1 or L2 norm of every slice along `axis` (one per output channel)."""
    moved = np.moveaxis(np.asarray(weights, dtype=np.float64), axis, 0).reshape(weights.shape[axis], -1)
    if norm == "l1":
        return np.abs(moved).sum(axis=1)
    if norm == "l2":
        return np.sqrt((moved * moved).sum(axis=1))
    raise ValueError(f"norm {norm!r} is not l1 or l2")


def structured_keep(weights: np.ndarray, axis: int, sparsity: float, norm: str = "l2") -> np.ndarray:
    """Boolean keep-vector over the channels along `axis`: round(sparsity * channels) of the
    lowest-norm channels are removed, always leaving at least one."""
    norms = channel_norms(weights, axis, norm)
    n = norms.size
    k = min(n_to_prune(n, sparsity), n - 1) if n else 0
    keep = np.ones(n, dtype=bool)
    if k > 0:
        keep[np.argsort(norms, kind="stable")[:k]] = False
    return keep


def expand_channel_keep(keep: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """A per-channel keep-vector broadcast to a full keep-mask of `shape`."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(keep.reshape(view), shape).copy()


def nm_mask(weights: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """N:M keep-mask: in every group of m consecutive weights along `axis` keep the n largest in
    magnitude. A last group shorter than m keeps at most n of its weights."""
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    moved = np.moveaxis(np.abs(weights), axis, -1)
    length = moved.shape[-1]
    n_groups = -(-length // m)
    pad = n_groups * m - length
    # Padding with -1 (below any magnitude) so pad slots are never chosen over real weights.
    padded = np.concatenate([moved, np.full(moved.shape[:-1] + (pad,), -1.0, moved.dtype)], axis=-1)
    groups = padded.reshape(moved.shape[:-1] + (n_groups, m))
    # Rank inside each group: stable sort descending by magnitude, ties to the earlier position.
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep_sorted = np.zeros_like(groups, dtype=bool)
    keep_sorted[..., :n] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    keep = keep.reshape(moved.shape[:-1] + (n_groups * m,))[..., :length]
    return np.moveaxis(keep, -1, axis)
