"""Data-aware compression of one linear layer y = x @ W (W: K inputs x N outputs) from calibration
statistics H = X^T X: importance scores, least-squares re-fits of pruned weights and of codebooks,
GPTQ error feedback for quantization, and activation-whitened low rank. Pure numpy, no ONNX.

Shared conventions:
- The quality measure is the output error E(W') = tr((W' - W)^T H (W' - W)) = ||X W' - X W||^2.
- Damping: every solve uses H + lam I with lam = damp * mean(diag H) (lam = damp if that mean is 0),
  so dead or collinear inputs are harmless. The damping term is lam * ||W' - W||^2, a ridge pulling
  towards the *given weights*, not towards zero: a re-fit that can reproduce W returns W exactly.
- Sequential calibration (this layer's inputs come from an already-compressed model): pass
  H = Xq^T Xq (the inputs the layer will see) and C = Xq^T X (X: the original model's inputs); the
  fits then minimise ||Xq W' - X W||^2 instead. C defaults to H.
- Everything is computed in float64; functions that return weights return float32 (documented each).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse  # scipy and threadpoolctl: always installed, scikit-learn requires them
from threadpoolctl import threadpool_limits

# Peak size of each of refit_codebook's two dense temporaries (n_codes x K per column), in bytes.
CHUNK_BYTES = 128 << 20


def damping(H: np.ndarray, damp: float = 0.01) -> float:
    """lam = damp * mean(diag H), or damp itself when every input is dead (mean 0)."""
    if damp < 0:
        raise ValueError(f"damp {damp} is negative")
    mean_diag = float(np.mean(np.diag(H))) if len(H) else 0.0
    return damp * mean_diag if mean_diag > 0 else float(damp)


def saliency(W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Importance of each weight for choosing a pruning mask, W^2 * diag(H) (K x N, float64): the
    output error of zeroing that weight alone (Wanda's |w| * ||x|| squared; OBS with diagonal H)."""
    W, H = _layer(W, H)
    return W * W * np.diag(H)[:, None]


def output_error(W: np.ndarray, W2: np.ndarray, H: np.ndarray) -> float:
    """E = tr((W2 - W)^T H (W2 - W)) = ||X W2 - X W||^2, summed over output columns."""
    W, H = _layer(W, H)
    D = _matrix(W2, W.shape, "W2") - W
    return max(float(np.sum(D * (H @ D))), 0.0)  # H is PSD: a negative value is rounding


def relative_output_error(W: np.ndarray, W2: np.ndarray, H: np.ndarray) -> float:
    """E / tr(W^T H W): the output error as a fraction of the layer's output energy ||X W||^2
    (0 when both are 0, inf when only the output energy is)."""
    W, H = _layer(W, H)
    energy = max(float(np.sum(W * (H @ W))), 0.0)
    error = output_error(W, W2, H)
    if energy == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return error / energy


def refit_masked(W: np.ndarray, keep: np.ndarray, H: np.ndarray, damp: float = 0.01,
                 target: np.ndarray | None = None, C: np.ndarray | None = None) -> np.ndarray:
    """Pruned weights with the survivors re-fitted by least squares (float32, K x N).

    Column n keeps the entries S = keep[:, n]; they solve (H_SS + lam I) w'_S = (C t_n + lam w_n)_S,
    the optimum of ||Xq w' - X t_n||^2 + lam ||w' - w_n||^2 with every pruned entry exactly 0
    (t = `target`, the weights whose outputs are preserved, default W). With C = H and t = W this is
    OBS / SparseGPT's exact reconstruction; keeping everything returns W itself.

    Columns sharing a mask share one factorization (structured or channel masks cost one solve).
    A pattern that keeps more than half of the inputs is solved through its complement P instead:
    w' = u - Hinv[:, P] (Hinv_PP)^-1 u_P with u = Hinv r, an |P| x |P| system (Lagrange form)."""
    W, H = _layer(W, H)
    K, N = W.shape
    keep = _mask(keep, W.shape)
    R = _rhs(W, H, damp, target, C)
    Hd = H + damping(H, damp) * np.eye(K)
    inverse = _inverse_spd(Hd) if np.any(2 * keep.sum(0) > K) else None
    U = None if inverse is None else inverse @ R
    out = np.zeros((K, N))
    # Many small solves: with two BLAS threads they ran up to 50x slower on a busy 2-core machine
    # (threads waiting on each other) and no faster on a quiet one (K=800, N=500).
    with threadpool_limits(limits=1, user_api="blas"):
        for cols in _same_pattern_columns(keep):
            kept = keep[:, cols[0]]
            S = np.flatnonzero(kept)
            if S.size == 0:
                continue
            if 2 * S.size <= K:
                out[np.ix_(S, cols)] = np.linalg.solve(Hd[np.ix_(S, S)], R[np.ix_(S, cols)])
                continue
            P = np.flatnonzero(~kept)
            u = U[:, cols]
            if P.size:
                u = u - inverse[:, P] @ np.linalg.solve(inverse[np.ix_(P, P)], u[P])
                u[P] = 0.0  # exactly, not to rounding
            out[:, cols] = u
    return out.astype(np.float32)


def refit_codebook(W: np.ndarray, labels: np.ndarray, n_codes: int, H: np.ndarray, damp: float = 0.01,
                   C: np.ndarray | None = None, initial: np.ndarray | None = None) -> np.ndarray:
    """Codebook values (float32, n_codes) minimising the output error of W' = codebook[labels]
    (entries labelled -1 are fixed at exactly 0), labels fixed: ||Xq W' - X W||^2 + lam ||W' - W||^2.

    W' = sum_a c_a 1[labels == a] is linear in c, so the optimum solves M c = b with
    M = sum_n A_n^T (H + lam I) A_n and b = sum_n A_n^T (C + lam I) w_n, A_n the K x n_codes one-hot
    of column n. The damping makes M >= lam diag(counts) positive definite, pulls a code towards its
    members' mean, and keeps two exact answers: labels that can represent W give W's values back,
    and H = I gives every cluster's mean (the k-means centroid). Codes without members keep
    `initial`'s value (0 when no `initial` is given). Cost: K^2 N + K N n_codes multiply-adds
    (sparse one-hot products, chunked over columns)."""
    W, H = _layer(W, H)
    K, N = W.shape
    labels = np.asarray(labels)
    if labels.shape != W.shape or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape {W.shape}, got {labels.dtype} {labels.shape}")
    if n_codes < 1:
        raise ValueError(f"n_codes {n_codes} < 1")
    if labels.size and (labels.min() < -1 or labels.max() >= n_codes):
        raise ValueError(f"labels must lie in [-1, {n_codes - 1}]")
    codebook = np.zeros(n_codes)
    if initial is not None:
        initial = np.asarray(initial, dtype=np.float64).reshape(-1)
        if initial.shape != (n_codes,):
            raise ValueError(f"initial codebook has {initial.size} values, not {n_codes}")
        codebook[:] = initial
    lam = damping(H, damp)
    member = labels >= 0
    counts = np.bincount(labels[member], minlength=n_codes).astype(np.float64)
    b = np.bincount(labels[member], weights=_rhs(W, H, damp, None, C)[member], minlength=n_codes)
    M = _one_hot_gram(labels, n_codes, H) + lam * np.diag(counts)
    used = np.flatnonzero(counts)
    if used.size:
        codebook[used] = np.linalg.solve(M[np.ix_(used, used)], b[used])
    return codebook.astype(np.float32)


def gptq(W: np.ndarray, H: np.ndarray, scale, zero_point, qmin: int, qmax: int,
         keep: np.ndarray | None = None, damp: float = 0.01, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ: quantize input rows k = 0..K-1 in order onto the fixed grid (scale, zero_point),
    spreading each row's rounding error over the rows not yet quantized so as to minimise the
    output error (Frantar et al. 2022). Returns (codes int64 K x N, W_deq float32 K x N), with
    W_deq = (codes - zero_point) * scale computed in float32 exactly like quant.dequantize.

    `scale` (positive) and `zero_point` broadcast to (K, N): a scalar per tensor, (1, N) per output
    column, or (K, N) with each block's value repeated. Row k: q = clip(round(w_k / s_k) + z_k, qmin,
    qmax); the error (w_k - deq_k) / U[k, k] updates rows k+1.. through U, the upper Cholesky factor of
    (H + lam I)^-1; updates are applied lazily, `block` rows at a time (same result, matmul speed).
    With `keep`, masked entries get the code of 0 (z) and dequantize to exactly 0; as in SparseGPT,
    what their weight was at that point is fed back to the remaining kept weights like any other
    rounding error (so a dense W with `keep` prunes and quantizes in one pass, compensating both;
    updating only the kept entries measured worse, at 3 bits even worse than round-to-nearest).
    H = I (or any diagonal H) reproduces round-to-nearest exactly."""
    W, H = _layer(W, H)
    K, N = W.shape
    if qmin > qmax:
        raise ValueError(f"empty grid [{qmin}, {qmax}]")
    if block < 1:
        raise ValueError(f"block {block} < 1")
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (K, N))
    z = np.broadcast_to(np.asarray(zero_point), (K, N))
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError("scales must be positive and finite")
    if not np.all((z == np.round(z)) & (z >= qmin) & (z <= qmax)):
        raise ValueError(f"zero points must be integers in [{qmin}, {qmax}]")
    z = z.astype(np.int64)
    keep = None if keep is None else _mask(keep, W.shape)
    U = _upper_cholesky_of_inverse(H + damping(H, damp) * np.eye(K))
    work = W.copy()
    codes = np.empty((K, N), dtype=np.int64)
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        rows = work[b0:b1]  # a view: the in-block updates land in `work`
        errors = np.empty((b1 - b0, N))
        for i, k in enumerate(range(b0, b1)):
            q = np.clip(np.round(rows[i] / s[k]) + z[k], qmin, qmax).astype(np.int64)
            if keep is not None:
                q = np.where(keep[k], q, z[k])
            codes[k] = q
            errors[i] = (rows[i] - (q - z[k]) * s[k]) / U[k, k]
            rows[i + 1:] -= np.outer(U[k, k + 1:b1], errors[i])
        work[b1:] -= U[b0:b1, b1:].T @ errors
    deq = (codes.astype(np.int32) - z.astype(np.int32)).astype(np.float32) * s.astype(np.float32)
    return codes, deq


def whitened_svd(W: np.ndarray, H: np.ndarray, rank: int, damp: float = 0.01
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation-aware rank-`rank` factors A (K x r) and B (r x N), float32, with A B minimising
    ||L^T (W - A B)||_F = the damped output error over all rank-r matrices (H + lam I = L L^T):
    L^T W = U S V^T, A = L^-T U_r S_r, B = V_r^T. Also the spectrum, the squared singular values of
    L^T W (float64, min(K, N), largest first): its tail past r is the damped output error, so
    lowrank.rank_for_energy and friends choose ranks from it. H = I gives plain SVD truncation."""
    W, H = _layer(W, H)
    K, N = W.shape
    if not 1 <= rank <= min(K, N):
        raise ValueError(f"rank {rank} is not in [1, {min(K, N)}]")
    L = np.linalg.cholesky(H + damping(H, damp) * np.eye(K))
    U, S, Vt = np.linalg.svd(L.T @ W, full_matrices=False)
    A = np.linalg.solve(L.T, U[:, :rank] * S[:rank])
    with np.errstate(over="ignore"):  # weights near float32's largest value: the caller checks
        return A.astype(np.float32), Vt[:rank].astype(np.float32), S * S


def _layer(W, H) -> tuple[np.ndarray, np.ndarray]:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (K inputs x N outputs), got shape {W.shape}")
    return W, _matrix(H, (W.shape[0], W.shape[0]), "H")


def _matrix(a, shape: tuple[int, int], what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} has NaN or infinite values")
    return a


def _mask(keep, shape) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.shape != shape or keep.dtype != bool:
        raise ValueError(f"keep must be a boolean mask of shape {shape}, got {keep.dtype} {keep.shape}")
    return keep


def _rhs(W, H, damp, target, C) -> np.ndarray:
    """(C t + lam w) for every column: the right-hand side of the damped normal equations."""
    K = W.shape[0]
    t = W if target is None else _matrix(target, W.shape, "target")
    C = H if C is None else _matrix(C, (K, K), "C")
    return C @ t + damping(H, damp) * W


def _inverse_spd(A: np.ndarray) -> np.ndarray:
    Linv = np.linalg.inv(np.linalg.cholesky(A))
    return Linv.T @ Linv


def _upper_cholesky_of_inverse(Hd: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = Hd^-1 (torch.linalg.cholesky(Hinv, upper=True) in GPTQ)."""
    return np.linalg.cholesky(_inverse_spd(Hd)).T


def _same_pattern_columns(keep: np.ndarray) -> list[np.ndarray]:
    """Column indices grouped by identical mask columns, in order of first appearance."""
    patterns = np.packbits(keep.T, axis=1)
    _, first, inverse = np.unique(patterns, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    return [groups[g] for g in np.argsort(first)]


def _one_hot_gram(labels: np.ndarray, n_codes: int, H: np.ndarray) -> np.ndarray:
    """sum_n A_n^T H A_n over the columns' one-hots A_n (label -1: a zero row), a chunk of c
    columns at a time. The one-hots are sparse (one entry per weight), which makes this K^2 N +
    K N n_codes multiply-adds instead of the dense product's 2 K^2 N n_codes flops (measured at
    K=800, N=500: 1.1 s instead of 2.9 s for 256 codes, 0.14 s instead of 0.27 s for 16)."""
    K, N = labels.shape
    step = max(1, CHUNK_BYTES // (8 * K * n_codes))
    M = np.zeros((n_codes, n_codes))
    for c0 in range(0, N, step):
        chunk = labels[:, c0:c0 + step]
        c = chunk.shape[1]
        col, row = np.nonzero(chunk.T >= 0)
        code = chunk[row, col]
        ones = np.ones(code.size)
        # rows (n, a) of AH: sum of H's rows i with label a in column n, i.e. (H A_n)^T
        AH = (sparse.csr_matrix((ones, (col * n_codes + code, row)), shape=(c * n_codes, K)) @ H)
        AH = AH.reshape(c, n_codes, K).transpose(1, 0, 2).reshape(n_codes, c * K)
        A = sparse.csr_matrix((ones, (col * K + row, code)), shape=(c * K, n_codes))
        M += (A.T @ AH.T).T  # M[b, a] += sum over (n, i) labelled a of (H A_n)[i, b]
    return (M + M.T) / 2
