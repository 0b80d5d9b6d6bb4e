"""Pruning masks as pure functions: exact counts, thresholds, global ranking, channels, N:M."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from modelsqueeze.kernels import prune as k

floats = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=9), elements=floats)
fractions = st.floats(0, 1)


@settings(max_examples=200, deadline=None)
@given(arrays, fractions)
def test_magnitude_mask_zeroes_exactly_round_s_n_smallest(w, s):
    keep = k.magnitude_mask(w, s)
    n_pruned = int(round(s * w.size))
    assert keep.shape == w.shape and int((~keep).sum()) == n_pruned
    if 0 < n_pruned < w.size:  # every pruned magnitude <= every kept magnitude
        assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()


@settings(max_examples=100, deadline=None)
@given(st.lists(arrays, min_size=1, max_size=4), fractions)
def test_global_masks_share_one_ranking(ws, s):
    masks = k.global_magnitude_masks(ws, s)
    total = sum(w.size for w in ws)
    assert sum(int((~m).sum()) for m in masks) == int(round(s * total))
    pruned = np.concatenate([np.abs(w[~m]) for w, m in zip(ws, masks)])
    kept = np.concatenate([np.abs(w[m]) for w, m in zip(ws, masks)])
    if pruned.size and kept.size:
        assert pruned.max() <= kept.min()


@settings(max_examples=100, deadline=None)
@given(arrays, st.floats(0, 10))
def test_threshold_mask(w, t):
    keep = k.threshold_mask(w, t)
    assert np.array_equal(keep, np.abs(w) >= t)


def test_std_threshold_is_scale_times_std():
    w = np.random.default_rng(0).standard_normal(1000)
    assert k.std_threshold([w[:400], w[400:]], 0.7) == pytest.approx(0.7 * w.std())


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, max_side=8), elements=floats),
       st.data(), fractions, st.sampled_from(["l1", "l2"]))
def test_structured_keep_removes_lowest_norm_channels(w, data, s, norm):
    axis = data.draw(st.integers(0, w.ndim - 1))
    keep = k.structured_keep(w, axis, s, norm)
    n = w.shape[axis]
    assert keep.shape == (n,) and keep.sum() == n - min(int(round(s * n)), n - 1)
    norms = k.channel_norms(w, axis, norm)
    if (~keep).any():
        assert norms[~keep].max() <= norms[keep].min()
    mask = k.expand_channel_keep(keep, w.shape, axis)
    assert np.array_equal(np.moveaxis(mask, axis, 0).all(axis=tuple(range(1, w.ndim))), keep)
    assert np.array_equal(np.moveaxis(mask, axis, 0).any(axis=tuple(range(1, w.ndim))), keep)


def test_channel_norms():
    w = np.array([[3.0, -4.0], [1.0, 1.0]])
    assert np.allclose(k.channel_norms(w, 0, "l2"), [5.0, np.sqrt(2)])
    assert np.allclose(k.channel_norms(w, 1, "l1"), [4.0, 5.0])


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=11), elements=floats),
       st.data(), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 3)]))
def test_nm_mask_keeps_n_largest_of_every_m(w, data, nm):
    n, m = nm
    axis = data.draw(st.integers(0, w.ndim - 1))
    keep = k.nm_mask(w, n, m, axis)
    moved_w, moved_k = np.moveaxis(np.abs(w), axis, -1), np.moveaxis(keep, axis, -1)
    length = moved_w.shape[-1]
    for start in range(0, length, m):
        group_w, group_k = moved_w[..., start:start + m], moved_k[..., start:start + m]
        size = group_w.shape[-1]
        assert np.all(group_k.sum(-1) == min(n, size))
        if 0 < min(n, size) < size:  # each kept weight at least as large as each dropped one in its group
            kept_min = np.where(group_k, group_w, np.inf).min(-1)
            dropped_max = np.where(group_k, -np.inf, group_w).max(-1)
            assert np.all(dropped_max <= kept_min)


def test_bad_arguments():
    with pytest.raises(ValueError):
        k.magnitude_mask(np.ones(3), 1.5)
    with pytest.raises(ValueError):
        k.nm_mask(np.ones(4), 3, 2, 0)
    with pytest.raises(ValueError):
        k.channel_norms(np.ones((2, 2)), 0, "l3")


@given(st.lists(st.lists(st.sampled_from([0.0, -0.5, 0.5, 1.0, -2.0, 3.0, float("nan")]), min_size=1, max_size=30),
                min_size=1, max_size=4),
       st.sampled_from([0.0, 0.1, 0.33, 0.5, 0.9, 1.0]))
def test_selection_equals_a_stable_sort_of_all_magnitudes(values, sparsity):
    """The O(N) selection gives exactly what a stable argsort of every magnitude gives, ties
    (many here) and NaN included."""
    arrays = [np.array(v, dtype=np.float32) for v in values]
    flat = np.concatenate([np.abs(a) for a in arrays]).astype(np.float64)
    n = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:n]] = False
    bounds = np.cumsum([0] + [a.size for a in arrays])
    got = k.global_magnitude_masks(arrays, sparsity)
    for i, mask in enumerate(got):
        assert np.array_equal(mask, keep[bounds[i]:bounds[i + 1]])
