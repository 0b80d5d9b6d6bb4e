"""1-D k-means kernel: WCSS against scikit-learn from the same start, exact optimum against brute
force, properties of centroids and labels, the lookup-grid assign, and bad arguments."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.cluster import KMeans

from modelsqueeze.kernels import kmeans1d as km

LLOYD_INITS = km.INITS
SETTINGS = settings(max_examples=60, deadline=None)


def distributions(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "normal": rng.normal(0, 1, n),
        "laplace": rng.laplace(0, 0.05, n),
        "uniform": rng.uniform(-1, 1, n),
        "bimodal": np.concatenate([rng.normal(-1, 0.2, n // 2), rng.normal(1.5, 0.5, n - n // 2)]),
        "duplicates": np.round(rng.normal(0, 1, n), 1),  # about 70 distinct values, heavy ties
    }


def sklearn_wcss(values: np.ndarray, start: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # repeated starting centroids make sklearn warn
        model = KMeans(n_clusters=start.size, init=start.reshape(-1, 1), n_init=1, random_state=0)
        model.fit(values.reshape(-1, 1))
    return float(model.inertia_)


@pytest.mark.parametrize("name", list(distributions(10)))
@pytest.mark.parametrize("k", [2, 7, 40])
def test_wcss_at_most_sklearn_from_the_same_start(name, k):
    values = distributions(3000)[name]
    for init in LLOYD_INITS:
        start = km.init_centroids(values, k, init=init)
        centroids, labels = km.kmeans1d(values, k, init=init)
        ours = km.wcss(values, centroids, labels)
        assert ours <= sklearn_wcss(values, start) * 1.01, (name, k, init)


def brute_force_optimum(values: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    """Least WCSS over every split of the sorted distinct values into k contiguous groups."""
    weights = np.ones(values.size) if weights is None else weights
    distinct, inverse = np.unique(values, return_inverse=True)
    w = np.bincount(inverse, weights=weights)
    k = min(k, distinct.size)
    best = np.inf
    for cuts in itertools.combinations(range(1, distinct.size), k - 1):
        total = 0.0
        for part in np.split(np.arange(distinct.size), cuts):
            mean = np.dot(w[part], distinct[part]) / w[part].sum()
            total += np.dot(w[part], (distinct[part] - mean) ** 2)
        best = min(best, total)
    return best


small_values = hnp.arrays(np.float64, st.integers(1, 9), elements=st.floats(
    -100, 100, allow_nan=False, allow_subnormal=False))


@SETTINGS
@given(small_values, st.integers(1, 6), st.booleans(), st.data())
def test_optimal_matches_brute_force(values, k, weighted, data):
    weights = None
    if weighted:
        weights = data.draw(hnp.arrays(np.float64, values.size, elements=st.floats(0.1, 10)))
    centroids, labels = km.kmeans1d(values, k, method="optimal", sample_weight=weights)
    expected = brute_force_optimum(values, k, weights)
    got = km.wcss(values, centroids, labels, weights)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # With no more distinct values than bins, the default start is that same optimum.
    centroids, labels = km.kmeans1d(values, k, sample_weight=weights)
    assert km.wcss(values, centroids, labels, weights) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_optimal_finds_obvious_groups():
    # Two tight groups and a far point: the optimum for k=3 is exactly these groups.
    values = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 10.2, 100.0])
    centroids, labels = km.kmeans1d(values, 3, method="optimal")
    np.testing.assert_allclose(centroids, [0.1, 10.1, 100.0])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2])


def test_default_is_within_one_percent_of_the_optimum():
    values = np.random.default_rng(3).laplace(0, 0.05, 20_000)
    optimum = km.wcss(values, *km.kmeans1d(values, 64, method="optimal"))
    for init in ("auto", "binned-dp"):
        assert km.wcss(values, *km.kmeans1d(values, 64, init=init)) <= optimum * 1.01


clusterable = hnp.arrays(
    st.sampled_from([np.float16, np.float32, np.float64]),
    hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
    elements=st.floats(-1000, 1000, allow_nan=False, allow_subnormal=False, width=16),
)


def check_result(values, k, centroids, labels, weights=None):
    flat = values.reshape(-1).astype(np.float64)
    n_distinct = np.unique(flat if weights is None else flat[weights > 0]).size
    assert centroids.dtype == np.float64 and labels.dtype == np.intp
    assert centroids.shape == (min(k, n_distinct),) and labels.shape == (flat.size,)
    assert (np.diff(centroids) > 0).all()
    # The nearest centroid by float64 distance, ties to the lower one: the first argmin.
    np.testing.assert_array_equal(labels, np.abs(flat[:, None] - centroids[None, :]).argmin(axis=1))
    w = np.ones(flat.size) if weights is None else weights
    assert (np.bincount(labels, weights=w, minlength=centroids.size) > 0).all()


@SETTINGS
@given(clusterable, st.integers(1, 20), st.sampled_from(LLOYD_INITS), st.integers(0, 3))
def test_lloyd_properties(values, k, init, seed):
    centroids, labels = km.kmeans1d(values, k, init=init, seed=seed)
    check_result(values, k, centroids, labels)
    # Converged: each centroid is the mean of its members.
    flat = values.reshape(-1).astype(np.float64)
    means = np.bincount(labels, weights=flat) / np.bincount(labels)
    np.testing.assert_allclose(centroids, means, rtol=1e-9, atol=1e-9)
    again = km.kmeans1d(values, k, init=init, seed=seed)
    np.testing.assert_array_equal(again[0], centroids)
    np.testing.assert_array_equal(again[1], labels)


@SETTINGS
@given(clusterable, st.integers(1, 8))
def test_optimal_properties(values, k):
    centroids, labels = km.kmeans1d(values, k, method="optimal")
    check_result(values, k, centroids, labels)


@SETTINGS
@given(clusterable, st.integers(1, 8), st.data())
def test_weighted_properties(values, k, data):
    weights = data.draw(hnp.arrays(np.float64, values.size, elements=st.sampled_from([0.0, 0.5, 1.0, 3.0])))
    if not (weights > 0).any():
        weights[0] = 1.0
    centroids, labels = km.kmeans1d(values, k, sample_weight=weights.reshape(values.shape))
    check_result(values, k, centroids, labels, weights)
    flat = values.reshape(-1).astype(np.float64)
    fitted = weights > 0
    means = (np.bincount(labels[fitted], weights=(weights * flat)[fitted], minlength=centroids.size)
             / np.bincount(labels[fitted], weights=weights[fitted], minlength=centroids.size))
    np.testing.assert_allclose(centroids, means, rtol=1e-9, atol=1e-9)


def test_edge_sizes():
    for init in LLOYD_INITS:
        c, labels = km.kmeans1d(np.array([3.5]), 4, init=init)
        assert c.tolist() == [3.5] and labels.tolist() == [0]
        c, labels = km.kmeans1d(np.full(10, -2.0, np.float32), 3, init=init)
        assert c.tolist() == [-2.0] and (labels == 0).all()
        values = np.array([1.0, 2.0, 2.0, 6.0])
        c, labels = km.kmeans1d(values, 1, init=init)
        assert c.tolist() == [2.75] and (labels == 0).all()
        c, labels = km.kmeans1d(values, 5, init=init)  # k >= distinct: every value its own centroid
        assert c.tolist() == [1.0, 2.0, 6.0] and labels.tolist() == [0, 1, 1, 2]
    c, labels = km.kmeans1d(np.zeros((0, 3)), 4)
    assert c.shape == (0,) and labels.shape == (0,) and labels.dtype == np.intp
    assert km.init_centroids(np.zeros(0), 4).shape == (0,)


def test_float16_and_float32_inputs():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, (64, 50))
    for dtype in (np.float16, np.float32):
        values = base.astype(dtype)
        c, labels = km.kmeans1d(values, 16)
        check_result(values, 16, c, labels)
        ref_c, ref_labels = km.kmeans1d(values.astype(np.float64), 16)
        np.testing.assert_array_equal(c, ref_c)
        np.testing.assert_array_equal(labels, ref_labels)


def test_kmeanspp_depends_on_seed_only():
    values = np.random.default_rng(2).laplace(0, 1, 5000)
    starts = [km.init_centroids(values, 32, init="kmeans++", seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(starts[0], starts[1])
    assert not np.array_equal(starts[0], starts[2])
    assert np.isin(starts[0], values).all() and np.unique(starts[0]).size == 32


def test_out_of_steps_still_no_empty_cluster():
    # A linear start into many clusters over a heavy-tailed sample leaves most tail clusters empty,
    # and 5 Lloyd steps are far from convergence.
    values = np.random.default_rng(4).standard_cauchy(20_000)
    for init in ("linear", "auto"):
        c, labels = km.kmeans1d(values, 2000, init=init, max_iter=5)
        sizes = np.bincount(labels, minlength=c.size)
        assert c.size == 2000 and (sizes > 0).all() and (np.diff(c) > 0).all()
        assert first_nearest(values, c, labels)


@pytest.mark.parametrize("init", LLOYD_INITS)
def test_k_clusters_whenever_there_are_k_distinct_values(init):
    # Two values hold almost all the weight, 1500 rare ones the rest: histogram bins and quantiles
    # collapse, yet every start must end with exactly k non-empty clusters.
    rng = np.random.default_rng(6)
    values = np.concatenate([np.zeros(50_000), np.ones(50_000), rng.normal(0, 3, 1500)])
    for k in (3, 700, 1400):
        c, labels = km.kmeans1d(values, k, init=init)
        assert c.size == k and (np.diff(c) > 0).all()
        assert (np.bincount(labels, minlength=k) > 0).all()


def test_assign_ties_go_to_the_lower_centroid():
    centroids = np.array([0.0, 2.0, 4.0])
    np.testing.assert_array_equal(km.assign(np.array([[1.0, 3.0], [-5.0, 9.0]]), centroids), [[0, 1], [0, 2]])


def first_nearest(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every label is the first nearest centroid: distances along sorted centroids fall
    then rise, so being strictly nearer than the left neighbour and no farther than the right one
    is enough."""
    v = values.astype(np.float64)
    d = np.abs(v - centroids[labels])
    left = np.abs(v - centroids[np.maximum(labels - 1, 0)])
    right = np.abs(v - centroids[np.minimum(labels + 1, centroids.size - 1)])
    return bool((((labels == 0) | (left > d)) & ((labels == centroids.size - 1) | (right >= d))).all())


def test_assign_grid_gives_the_first_nearest_centroid():
    rng = np.random.default_rng(5)
    for k in (2, 256, 7000):
        values = rng.laplace(0, 0.05, 300_000).astype(np.float32)
        centroids = np.unique(rng.laplace(0, 0.05, k))
        midpoints = 0.5 * (centroids[1:] + centroids[:-1])
        values[:midpoints.size] = midpoints.astype(np.float32)  # values on (rounded) midpoints
        values[-2:] = [values.min() - 1, values.max() + 1]
        for v in (values, values.astype(np.float64)):
            labels = km.assign(v, centroids)
            assert first_nearest(v, centroids, labels)
            clear = np.abs(v[:, None] - midpoints[np.clip(labels[:, None] + [-1, 0], 0, k - 2)]).min(1) > 1e-9
            np.testing.assert_array_equal(labels[clear], np.searchsorted(midpoints, v[clear]))
    values = rng.normal(size=200_000)
    centroids = np.array([-1.0, 0.0, 0.0, 1.0])  # repeated centroids are allowed: the first wins
    labels = km.assign(values, centroids)
    assert first_nearest(values, centroids, labels) and not (labels == 2).any()


def test_values_an_ulp_apart_stay_apart():
    a = 0.1
    values = np.array([a, np.nextafter(a, 1), np.nextafter(np.nextafter(a, 1), 1), 5.0])
    for method in ("lloyd", "optimal"):
        centroids, labels = km.kmeans1d(values, 4, method=method)
        np.testing.assert_array_equal(centroids, values)
        np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    centroids, labels = km.kmeans1d(np.repeat(values, 3), 3)
    check_result(np.repeat(values, 3), 3, centroids, labels)


def test_wcss_matches_definition():
    values = np.array([0.0, 1.0, 5.0, 6.0])
    assert km.wcss(values, np.array([0.5, 5.5]), np.array([0, 0, 1, 1])) == 1.0
    assert km.wcss(values, np.array([0.5, 5.5]), np.array([0, 0, 1, 1]), np.array([1, 2, 3, 0])) == 1.5


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "k must be at least 1"),
    ({"k": -3}, "k must be at least 1"),
    ({"init": "random"}, "unknown init"),
    ({"method": "elkan"}, "unknown method"),
    ({"values": np.array([1.0, np.nan])}, "NaN or infinity"),
    ({"values": np.array([1.0, np.inf])}, "NaN or infinity"),
    ({"values": np.array([np.nan])}, "NaN or infinity"),
    ({"values": np.zeros(0), "k": 0}, "k must be at least 1"),
    ({"sample_weight": np.ones(2)}, "sample_weight has 2 entries"),
    ({"sample_weight": np.array([1.0, -1.0, 1.0])}, "must not be negative"),
    ({"sample_weight": np.zeros(3)}, "zero everywhere"),
    ({"sample_weight": np.array([1.0, np.nan, 1.0])}, "NaN or infinity"),
    ({"max_iter": 0}, "max_iter"),
])
def test_bad_arguments(kwargs, message):
    args = {"values": np.array([1.0, 2.0, 3.0]), "k": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        km.kmeans1d(args.pop("values"), args.pop("k"), **args)


def test_optimal_refuses_large_inputs():
    values = np.arange(km.MAX_OPTIMAL_DISTINCT + 1, dtype=np.float64)
    with pytest.raises(ValueError, match="limited to"):
        km.kmeans1d(values, 4, method="optimal")


def test_assign_bad_arguments():
    with pytest.raises(ValueError, match="ascending"):
        km.assign(np.zeros(3), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="non-empty"):
        km.assign(np.zeros(3), np.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        km.assign(np.array([np.nan]), np.array([0.0]))
