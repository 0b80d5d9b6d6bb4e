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


def stable_sort_masks(arrays, sparsity):
    """Reference ranking: a stable argsort of every magnitude, widened to float64 (exact for
    float16/32, so mixed dtypes compare by value; numpy sorts NaN last, all NaNs tied)."""
    flat = np.concatenate([np.zeros(0)] + [np.abs(a).astype(np.float64).reshape(-1) for a in arrays])
    n = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:n]] = False
    bounds = np.cumsum([0] + [a.size for a in arrays])
    return [keep[bounds[i]:bounds[i + 1]].reshape(a.shape) for i, a in enumerate(arrays)]


def streamed_masks(arrays, sparsity, **options):
    ranking = k.GlobalMagnitude([lambda a=a: a for a in arrays], sparsity, **options)
    return [ranking.mask(i, a) for i, a in enumerate(arrays)]


# Values that tie a lot and sit at the edges of the ranking, all exact in float16 so they tie
# across dtypes too; plus any float of the tensor's own width (subnormals, NaN, infinities).
edge_values = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 3.0, 2.0 ** -24, 65504.0, np.inf, -np.inf, np.nan]


@st.composite
def tensor(draw):
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    width = {np.float16: 16, np.float32: 32, np.float64: 64}[dtype]
    elements = st.one_of(st.sampled_from(edge_values), st.floats(width=width))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=400, deadline=None)
@given(st.lists(tensor(), min_size=0, max_size=5),
       st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]), fractions),
       st.integers(1, 8), st.sampled_from([0, 1, 4, k.COLLECT]))
def test_streamed_selection_equals_a_stable_sort(arrays, sparsity, chunk, collect):
    """GlobalMagnitude, in tiny chunks and with every selection path (four histogram passes when
    collect is 0, gathering early otherwise), gives exactly the stable sort's masks, and leaves
    the weights untouched."""
    before = [a.copy() for a in arrays]
    got = streamed_masks(arrays, sparsity, chunk=chunk, collect=collect)
    for mask, want, a, b in zip(got, stable_sort_masks(arrays, sparsity), arrays, before):
        assert mask.dtype == bool and mask.shape == a.shape and np.array_equal(mask, want)
        assert np.array_equal(a, b, equal_nan=True)


def test_tensors_larger_than_a_chunk():
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((300, 70)).astype(np.float32),
              np.round(rng.standard_normal(5000), 1).astype(np.float16),  # many ties
              rng.standard_normal((40, 50))]
    arrays[0][::7] = 0.0
    for sparsity in (0.0, 0.3, 0.5, 0.97, 1.0):
        want = stable_sort_masks(arrays, sparsity)
        for options in ({"chunk": 997, "collect": 0}, {"chunk": 1000, "collect": 500}, {}):
            got = streamed_masks(arrays, sparsity, **options)
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
    got = k.global_magnitude_masks(arrays, 0.5)
    assert all(np.array_equal(g, w) for g, w in zip(got, stable_sort_masks(arrays, 0.5)))


def counted(arrays):
    calls = [0] * len(arrays)

    def loader(i):
        def load():
            calls[i] += 1
            return arrays[i]
        return load
    return [loader(i) for i in range(len(arrays))], calls


def test_loaders_are_called_a_bounded_number_of_times():
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1000, 3000, 0, 500)]
    arrays.append(np.full(50, 1e30, np.float32))  # far above any threshold: read once only
    for sparsity, most in ((0.0, 1), (1.0, 1), (0.5, 2)):
        loaders, calls = counted(arrays)
        k.GlobalMagnitude(loaders, sparsity, chunk=256)
        assert calls[2] == 1 and calls[4] == 1 and max(calls) == most  # one histogram, one gathering pass
    loaders, calls = counted(arrays)
    k.GlobalMagnitude(loaders, 0.5, chunk=256, collect=0)  # never gathers: a pass per 16 bits
    assert max(calls) == 4 and calls[2] == 1 and calls[4] == 1


def test_re_pruning_zeros_needs_one_pass():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(1000), -np.zeros((4, 5)), rng.standard_normal(300)]
    arrays[0][::2] = 0.0
    for sparsity in (0.3, 0.39):  # no more than the 520 zeros of 1320 weights go
        loaders, calls = counted(arrays)
        ranking = k.GlobalMagnitude(loaders, sparsity, chunk=64)
        assert calls == [1, 1, 1] and ranking.magnitude == 0.0 and ranking.ties == ranking.k
        got = [ranking.mask(i, a) for i, a in enumerate(arrays)]
        assert all(np.array_equal(g, w) for g, w in zip(got, stable_sort_masks(arrays, sparsity)))


def test_threshold_magnitude():
    arrays = [np.array([3.0, -1.0, 2.0], np.float32), np.array([np.nan, -0.5, np.nan], np.float16)]
    assert k.GlobalMagnitude([lambda a=a: a for a in arrays], 0.4).magnitude == 1.0  # 2nd of 6
    assert np.isnan(k.GlobalMagnitude([lambda a=a: a for a in arrays], 0.8).magnitude)  # 5th of 6
    assert k.GlobalMagnitude([lambda a=a: a for a in arrays], 0.0).magnitude is None


def test_masks_must_come_in_order_and_match_the_ranked_tensors():
    arrays = [np.arange(4.0), np.arange(3.0)]
    ranking = k.GlobalMagnitude([lambda a=a: a for a in arrays], 0.5)
    with pytest.raises(ValueError):
        ranking.mask(1, arrays[1])
    ranking.mask(0, arrays[0])
    with pytest.raises(ValueError):
        ranking.mask(0, arrays[0])
    with pytest.raises(ValueError):
        ranking.mask(1, np.arange(5.0))  # not the tensor that was ranked
    ranking.mask(1, arrays[1])
    with pytest.raises(ValueError):
        ranking.mask(2, arrays[1])
    with pytest.raises(ValueError):
        k.GlobalMagnitude([lambda: arrays[0]], 1.5)
    with pytest.raises(ValueError):
        k.GlobalMagnitude([lambda: arrays[0]], 0.5, chunk=0)


def test_a_loader_returning_other_weights_is_caught():
    versions = iter([np.full(10, 2.0), np.arange(10.0)])
    with pytest.raises(RuntimeError):
        k.GlobalMagnitude([lambda: next(versions)], 0.5)


def test_nans_of_any_payload_or_sign_tie():
    nans = np.array([0x7FF8_0000_0000_0007, 0xFFF8_0000_0000_0000, 0x7FF0_0000_0000_0001, 0x7FF8_0000_0000_0000],
                    np.uint64).view(np.float64)
    arrays = [np.array([1.0, np.inf]), nans, nans[::-1].copy()]
    for sparsity in (0.4, 0.5, 0.7, 0.9):
        for collect in (0, k.COLLECT):
            got = streamed_masks(arrays, sparsity, chunk=3, collect=collect)
            assert all(np.array_equal(g, w) for g, w in zip(got, stable_sort_masks(arrays, sparsity)))


def test_magnitude_keys_order_like_magnitudes():
    values = np.array([-np.inf, -3.0, -0.0, 0.0, 1e-310, 2.0, np.inf, np.nan, -np.nan], np.float64)
    keys = k.magnitude_keys(values)
    assert keys[2] == keys[3] == 0 and keys[7] == keys[8] > keys[0] == keys[6] > keys[1] > keys[5] > keys[4]
    assert np.array_equal(k.magnitude_keys(values.astype(np.float16))[[1, 5, 6]], keys[[1, 5, 6]])
