"""Data-aware kernels: each re-fit is exact when exactness is possible, reduces to the data-free
method when the inputs are uncorrelated (H = I), satisfies its optimality conditions, and beats the
data-free result on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsqueeze.kernels import calibrated as cal
from modelsqueeze.kernels import quant


def layer(k: int = 48, n: int = 32, rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, X, H = X^T X) with correlated input columns: X = Z M, so re-fits have work to do."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k) + 0.3 * np.eye(k))
    W = rng.standard_normal((k, n)) * 0.1
    return W, X, X.T @ X


def error(W, W2, H) -> float:
    return cal.output_error(W, W2, H)


# --- shared helpers -----------------------------------------------------------------------------

def test_output_error_is_the_squared_output_difference():
    W, X, H = layer()
    W2 = W + np.random.default_rng(1).standard_normal(W.shape) * 0.01
    assert error(W, W2, H) == pytest.approx(np.sum((X @ W2 - X @ W) ** 2), rel=1e-9)
    assert cal.relative_output_error(W, W2, H) == pytest.approx(error(W, W2, H) / np.sum((X @ W) ** 2), rel=1e-9)
    assert cal.relative_output_error(np.zeros((3, 2)), np.zeros((3, 2)), np.eye(3)) == 0.0


def test_saliency_is_the_error_of_zeroing_one_weight():
    W, _, H = layer(k=12, n=5)
    s = cal.saliency(W, H)
    for k, n in [(0, 0), (7, 3), (11, 4)]:
        W2 = W.copy()
        W2[k, n] = 0.0
        assert s[k, n] == pytest.approx(error(W, W2, H), rel=1e-9)


def test_damping_is_relative_to_the_mean_diagonal_and_absolute_for_dead_inputs():
    assert cal.damping(np.diag([1.0, 3.0]), 0.1) == pytest.approx(0.2)
    assert cal.damping(np.zeros((4, 4)), 0.1) == 0.1


# --- refit_masked -------------------------------------------------------------------------------

def naive_refit(W, keep, H, lam, target=None, C=None):
    """Column by column, straight from the definition."""
    t = W if target is None else target
    C = H if C is None else C
    out = np.zeros_like(W)
    for n in range(W.shape[1]):
        S = np.flatnonzero(keep[:, n])
        rhs = (C @ t[:, n] + lam * W[:, n])[S]
        out[S, n] = np.linalg.solve(H[np.ix_(S, S)] + lam * np.eye(S.size), rhs)
    return out


def mixed_mask(shape, seed=0):
    """Columns kept from 0% to 100%, so both the direct and the complement solve are used, plus
    two identical columns and an all-pruned one."""
    rng = np.random.default_rng(seed)
    keep = rng.random(shape) < np.linspace(0, 1, shape[1])[None, :]
    keep[:, 3] = keep[:, 4]
    keep[:, 0] = False
    keep[:, -1] = True
    return keep


def test_refit_masked_solves_the_damped_normal_equations_on_the_kept_set():
    W, _, H = layer()
    keep = mixed_mask(W.shape)
    lam = cal.damping(H)
    W2 = cal.refit_masked(W, keep, H).astype(np.float64)
    assert np.all(W2[~keep] == 0.0) and np.all(W2[:, 0] == 0.0)
    residual = (H + lam * np.eye(len(H))) @ W2 - (H @ W + lam * W)
    assert np.abs(residual[keep]).max() < 1e-5 * np.abs(H @ W).max()
    np.testing.assert_allclose(W2, naive_refit(W, keep, H, lam), rtol=1e-5, atol=1e-6)


def test_refit_masked_undamped_is_the_least_squares_optimum():
    W, X, H = layer()
    keep = mixed_mask(W.shape, seed=1)
    W2 = cal.refit_masked(W, keep, H, damp=0.0).astype(np.float64)
    gradient = H @ (W2 - W)  # zero on every free (kept) entry at the optimum
    assert np.abs(gradient[keep]).max() < 1e-4 * np.abs(H @ W).max()
    for n in (5, 20, 31):
        S = np.flatnonzero(keep[:, n])
        best, *_ = np.linalg.lstsq(X[:, S], X @ W[:, n], rcond=None)
        np.testing.assert_allclose(W2[S, n], best, rtol=1e-4, atol=1e-6)


def test_refit_masked_keeping_everything_returns_w():
    W, _, H = layer()
    np.testing.assert_allclose(cal.refit_masked(W, np.ones(W.shape, bool), H), W, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.9])
def test_refit_masked_beats_zeroing_on_correlated_inputs(sparsity):
    W, _, H = layer(seed=2)
    keep = np.abs(W) > np.quantile(np.abs(W), sparsity)
    refit = cal.refit_masked(W, keep, H)
    assert error(W, refit, H) < 0.9 * error(W, W * keep, H)


def test_refit_masked_sequential_form():
    W, X, H = layer()
    keep = mixed_mask(W.shape, seed=3)
    np.testing.assert_array_equal(cal.refit_masked(W, keep, H, C=H), cal.refit_masked(W, keep, H))
    # inputs from an already-compressed model: fit Xq w' to the original outputs X w
    Xq = X + np.random.default_rng(4).standard_normal(X.shape) * 0.1
    Hq, C = Xq.T @ Xq, Xq.T @ X
    W2 = cal.refit_masked(W, keep, Hq, damp=0.0, C=C).astype(np.float64)
    for n in (7, 25):
        S = np.flatnonzero(keep[:, n])
        best, *_ = np.linalg.lstsq(Xq[:, S], X @ W[:, n], rcond=None)
        np.testing.assert_allclose(W2[S, n], best, rtol=1e-4, atol=1e-6)
    target = W + 0.05
    np.testing.assert_allclose(cal.refit_masked(W, keep, Hq, target=target, C=C),
                               naive_refit(W, keep, Hq, cal.damping(Hq), target, C), rtol=1e-5, atol=1e-6)


def test_refit_masked_structured_masks_and_dead_inputs():
    W, _, H = layer()
    H[5, :] = H[:, 5] = 0.0  # a dead input: singular H
    keep = np.ones(W.shape, bool)
    keep[::3] = False  # whole input rows pruned: every column has the same pattern
    W2 = cal.refit_masked(W, keep, H)
    assert np.all(np.isfinite(W2)) and np.all(W2[::3] == 0)
    np.testing.assert_allclose(W2, naive_refit(W, keep, H, cal.damping(H)), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_refit_masked_matches_the_definition_on_any_shape(k, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((max(1, k // 2), k))  # often rank-deficient: damping must cope
    W = rng.standard_normal((k, n))
    keep = rng.random((k, n)) < rng.random()
    H = X.T @ X
    np.testing.assert_allclose(cal.refit_masked(W, keep, H), naive_refit(W, keep, H, cal.damping(H)),
                               rtol=1e-4, atol=1e-5)


# --- refit_codebook -----------------------------------------------------------------------------

def codebook_layer(n_codes=8, seed=0):
    """W, H and a 1-D nearest-value clustering of W: labels (with pruned -1s) and its codebook."""
    W, _, H = layer(seed=seed)
    values = np.quantile(W, (np.arange(n_codes) + 0.5) / n_codes)
    labels = np.abs(W[..., None] - values).argmin(-1)
    labels[np.abs(W) < 0.02] = -1
    W = np.where(labels >= 0, W, 0.0)
    return W, H, labels, values


def test_refit_codebook_reproduces_a_representable_w():
    _, H, labels, values = codebook_layer()
    W = np.where(labels >= 0, values[labels], 0.0)  # exactly representable
    np.testing.assert_allclose(cal.refit_codebook(W, labels, len(values), H), values, rtol=1e-5)
    np.testing.assert_allclose(cal.refit_codebook(W, labels, len(values), H, damp=0.0), values, rtol=1e-5)


def test_refit_codebook_with_uncorrelated_inputs_is_the_cluster_mean():
    W, _, labels, _ = codebook_layer()
    member = labels >= 0
    means = np.bincount(labels[member], W[member]) / np.bincount(labels[member])
    np.testing.assert_allclose(cal.refit_codebook(W, labels, len(means), np.eye(len(W))), means, rtol=1e-5)


@pytest.mark.parametrize("n_codes", [2, 8, 32])
def test_refit_codebook_beats_the_data_free_codebook(n_codes):
    W, H, labels, values = codebook_layer(n_codes, seed=1)
    refit = cal.refit_codebook(W, labels, n_codes, H)
    before = error(W, np.where(labels >= 0, values[labels], 0.0), H)
    after = error(W, np.where(labels >= 0, refit[labels], 0.0), H)
    assert after < 0.99 * before


def test_refit_codebook_undamped_is_the_least_squares_optimum():
    W, H, labels, _ = codebook_layer(seed=2)
    refit = cal.refit_codebook(W, labels, 8, H, damp=0.0).astype(np.float64)
    G = H @ (np.where(labels >= 0, refit[labels], 0.0) - W)  # dE/dc_a = 2 sum of G over a's members
    member = labels >= 0
    gradient = np.bincount(labels[member], G[member], minlength=8)
    assert np.abs(gradient).max() < 1e-4 * np.abs(np.bincount(labels[member], (H @ W)[member])).max()


def test_refit_codebook_matches_the_per_column_definition_and_sequential_form():
    W, H, labels, values = codebook_layer(n_codes=5, seed=3)
    K, N = W.shape
    lam = cal.damping(H)
    Hd = H + lam * np.eye(K)
    M, b = np.zeros((5, 5)), np.zeros(5)
    for n in range(N):
        A = np.zeros((K, 5))
        A[labels[:, n] >= 0, labels[labels[:, n] >= 0, n]] = 1.0
        M += A.T @ Hd @ A
        b += A.T @ Hd @ W[:, n]
    expected = np.linalg.solve(M, b)
    np.testing.assert_allclose(cal.refit_codebook(W, labels, 5, H), expected, rtol=1e-5)
    np.testing.assert_array_equal(cal.refit_codebook(W, labels, 5, H, C=H), cal.refit_codebook(W, labels, 5, H))


def test_refit_codebook_unused_codes_keep_their_initial_value():
    W, H, labels, values = codebook_layer(n_codes=4)
    labels = np.where(labels == 2, 1, labels)  # code 2 loses its members
    refit = cal.refit_codebook(W, labels, 4, H, initial=values)
    assert refit[2] == np.float32(values[2])
    assert cal.refit_codebook(W, labels, 4, H)[2] == 0.0
    assert refit.dtype == np.float32


# --- gptq ---------------------------------------------------------------------------------------

def rtn(W, s, z, qmin, qmax):
    return np.clip(np.round(W / s) + z, qmin, qmax).astype(np.int64)


def naive_gptq(W, H, s, z, qmin, qmax, damp=0.01):
    """The GPTQ recurrence one row at a time, no lazy blocks."""
    K, N = W.shape
    s, z = np.broadcast_to(s, W.shape), np.broadcast_to(z, W.shape)
    Hinv = np.linalg.inv(H + cal.damping(H, damp) * np.eye(K))
    U = np.linalg.cholesky(Hinv).T
    w = W.copy()
    codes = np.zeros(W.shape, np.int64)
    for k in range(K):
        codes[k] = rtn(w[k], s[k], z[k], qmin, qmax)
        w[k + 1:] -= np.outer(U[k, k + 1:], (w[k] - (codes[k] - z[k]) * s[k]) / U[k, k])
    return codes


def grids(W):
    """(scale, zero_point, qmin, qmax): per tensor, per output column, and per block of 16 input
    rows (asymmetric, unsigned), as quant.py lays them out."""
    K, N = W.shape
    yield np.abs(W).max() / 3, 0, -4, 3
    yield np.abs(W).max(0, keepdims=True) / 7, 0, -8, 7
    blocks = W.reshape(K // 16, 16, N)
    lo, hi = np.minimum(blocks.min(1), 0), np.maximum(blocks.max(1), 0)
    scale = (hi - lo) / 15
    yield np.repeat(scale, 16, axis=0), np.repeat(np.round(-lo / scale), 16, axis=0).astype(np.int64), 0, 15


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    W, _, _ = layer()
    for H in (np.eye(len(W)), np.diag(np.arange(1.0, len(W) + 1))):
        for s, z, qmin, qmax in grids(W):
            codes, deq = cal.gptq(W, H, s, z, qmin, qmax)
            np.testing.assert_array_equal(codes, rtn(W, s, z, qmin, qmax))


def test_gptq_follows_the_recurrence_and_blocks_change_nothing():
    W, _, H = layer()
    for s, z, qmin, qmax in grids(W):
        expected = naive_gptq(W, H, s, z, qmin, qmax)
        for block in (1, 5, 16, 128):
            codes, deq = cal.gptq(W, H, s, z, qmin, qmax, block=block)
            np.testing.assert_array_equal(codes, expected)
            assert codes.min() >= qmin and codes.max() <= qmax
            s32, z32 = np.broadcast_to(s, W.shape).astype(np.float32), np.broadcast_to(z, W.shape)
            np.testing.assert_array_equal(deq, ((codes - z32).astype(np.float32) * s32))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    W, _, H = layer(k=96, n=48, rows=800, seed=5)
    qmax = (1 << (bits - 1)) - 1
    scale = np.abs(W).max(0, keepdims=True) / qmax
    codes, deq = cal.gptq(W, H, scale, 0, -qmax - 1, qmax)
    assert codes.min() >= -qmax - 1 and codes.max() <= qmax
    nearest = rtn(W, scale, 0, -qmax - 1, qmax) * scale
    assert error(W, deq, H) < 0.8 * error(W, nearest, H)


def test_gptq_codes_match_quant_dequantize():
    W, _, H = layer()
    layout = quant.Layout(W.shape, axis=1)
    scale = (np.abs(W).max(0) / 7).astype(np.float32)
    zero_point = np.zeros(W.shape[1], np.int64)
    codes, deq = cal.gptq(W, H, scale[None, :], zero_point[None, :], -8, 7)
    np.testing.assert_array_equal(deq, quant.dequantize(codes, layout, scale, zero_point))


def test_gptq_masked_entries_are_exactly_zero():
    W, _, H = layer(seed=6)
    keep = np.abs(W) > np.quantile(np.abs(W), 0.5)
    scale, z = np.abs(W).max() / 15, 8
    for w in (W * keep, W):  # already pruned, or pruned and quantized in one go (SparseGPT)
        codes, deq = cal.gptq(w, H, scale, z, 0, 15, keep=keep)
        assert np.all(codes[~keep] == z) and np.all(deq[~keep] == 0.0)
        assert error(W, deq, H) < error(W, (rtn(W, scale, z, 0, 15) - z) * scale * keep, H)


def test_gptq_refuses_bad_grids():
    W, _, H = layer(k=4, n=3)
    with pytest.raises(ValueError, match="positive"):
        cal.gptq(W, H, 0.0, 0, -8, 7)
    with pytest.raises(ValueError, match="zero points"):
        cal.gptq(W, H, 0.1, 9, -8, 7)


# --- whitened_svd -------------------------------------------------------------------------------

def truncated_svd(W, rank):
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vt[:rank]


def test_whitened_svd_full_rank_reproduces_w():
    W, _, H = layer()
    A, B, spectrum = cal.whitened_svd(W, H, min(W.shape))
    assert A.dtype == B.dtype == np.float32 and A.shape == (48, 32) and B.shape == (32, 32)
    np.testing.assert_allclose(A.astype(np.float64) @ B, W, rtol=1e-5, atol=1e-5)
    assert spectrum.shape == (32,) and np.all(np.diff(spectrum) <= 0)


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_whitened_svd_beats_plain_truncation_on_correlated_inputs(rank):
    W, _, H = layer(seed=7)
    A, B, spectrum = cal.whitened_svd(W, H, rank)
    AB = A.astype(np.float64) @ B
    assert error(W, AB, H) < 0.95 * error(W, truncated_svd(W, rank), H)
    # the spectrum's tail is the damped output error of this truncation
    damped = H + cal.damping(H) * np.eye(len(H))
    assert error(W, AB, damped) == pytest.approx(spectrum[rank:].sum(), rel=1e-4)


def test_whitened_svd_with_uncorrelated_inputs_is_plain_truncation():
    W, _, _ = layer()
    A, B, _ = cal.whitened_svd(W, np.eye(len(W)), 8)
    np.testing.assert_allclose(A.astype(np.float64) @ B, truncated_svd(W, 8), rtol=1e-5, atol=1e-6)
