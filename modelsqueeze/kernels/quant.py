"""Linear (uniform) quantization: integer grids of 2..8 bits, signed or unsigned, symmetric or
affine, one scale per tensor, per channel or per block; clipping range by min/max, percentile or
least squared error. Zero is always exactly representable, so pruned weights stay zero."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RANGES = ("minmax", "mse", "percentile")
GRANULARITIES = ("tensor", "channel", "block")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid [qmin, qmax] of a `bits`-bit value."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


@dataclass(frozen=True)
class Layout:
    """How a tensor's elements map to quantization groups: one group (axis None), one per index
    along `axis` (block_size 0), or blocks of `block_size` consecutive elements along `axis`."""

    shape: tuple[int, ...]
    axis: int | None = None
    block_size: int = 0

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the scale / zero-point arrays, as ONNX DequantizeLinear wants them."""
        if self.axis is None:
            return ()
        if self.block_size == 0:
            return (self.shape[self.axis],)
        blocked = list(self.shape)
        blocked[self.axis] = -(-self.shape[self.axis] // self.block_size)
        return tuple(blocked)

    def expand(self, params: np.ndarray) -> np.ndarray:
        """Per-group parameters broadcast / repeated to the tensor's full shape."""
        params = np.asarray(params).reshape(self.param_shape)
        if self.axis is None:
            return np.broadcast_to(params, self.shape)
        if self.block_size == 0:
            view = [1] * len(self.shape)
            view[self.axis] = self.shape[self.axis]
            return np.broadcast_to(params.reshape(view), self.shape)
        # Each element's block along the axis (not np.repeat by block_size: a block size larger
        # than the axis would allocate in proportion to it).
        return np.take(params, np.arange(self.shape[self.axis]) // self.block_size, axis=self.axis)

    def groups(self) -> np.ndarray:
        """Group id of every element (row-major over param_shape), same shape as the tensor."""
        ids = np.arange(int(np.prod(self.param_shape, dtype=np.int64))).reshape(self.param_shape)
        return np.ascontiguousarray(self.expand(ids))


def _group_reduce(values: np.ndarray, group: np.ndarray, n_groups: int, fn) -> np.ndarray:
    """fn (np.maximum / np.minimum) of the values of each group; empty groups give 0."""
    out = np.zeros(n_groups, dtype=np.float64)
    init = -np.inf if fn is np.maximum else np.inf
    out[:] = init
    fn.at(out, group, values)
    out[~np.isfinite(out)] = 0.0
    return out


def choose_params(
    weights: np.ndarray, layout: Layout, bits: int, signed: bool, symmetric: bool,
    range_method: str = "minmax", percentile: float = 99.99,
) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32, zero_point int) per group. The range always contains 0; symmetric grids put
    zero at the middle (0 signed, 2^(b-1) unsigned); `mse` shrinks each group's range to the
    clipping that minimises the squared error; `percentile` clips at that percentile of |w|."""
    if range_method not in RANGES:
        raise ValueError(f"range {range_method!r} is not one of {RANGES}")
    qmin, qmax = qrange(bits, signed)
    if range_method == "minmax":  # the default: group extremes without per-element copies
        hi = np.maximum(_extremes(weights, layout, np.maximum), 0.0)
        lo = np.minimum(_extremes(weights, layout, np.minimum), 0.0)
        scale, zp = _params(hi, lo, qmin, qmax, symmetric, signed, bits)
        return scale.reshape(layout.param_shape).astype(np.float32), zp.reshape(layout.param_shape)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    group = layout.groups().reshape(-1)
    n_groups = int(np.prod(layout.param_shape, dtype=np.int64))
    hi = np.maximum(_group_reduce(w, group, n_groups, np.maximum), 0.0)
    lo = np.minimum(_group_reduce(w, group, n_groups, np.minimum), 0.0)
    if range_method == "percentile":
        hi, lo = _percentile_range(w, group, n_groups, percentile, hi, lo)
    if range_method == "mse":
        best = np.full(n_groups, np.inf)
        best_ratio = np.ones(n_groups)
        for ratio in np.linspace(0.3, 1.0, 71):
            scale, zp = _params(hi * ratio, lo * ratio, qmin, qmax, symmetric, signed, bits)
            err = _group_error(w, group, n_groups, scale, zp, qmin, qmax)
            better = err < best
            best[better], best_ratio[better] = err[better], ratio
        hi, lo = hi * best_ratio, lo * best_ratio
    scale, zp = _params(hi, lo, qmin, qmax, symmetric, signed, bits)
    return scale.reshape(layout.param_shape).astype(np.float32), zp.reshape(layout.param_shape)


def _extremes(weights: np.ndarray, layout: Layout, fn) -> np.ndarray:
    """fn (np.maximum / np.minimum) of each group's weights as float64, flat in group order: the
    reductions run on the weights in their own dtype (exact), never on a float64 copy."""
    w = np.asarray(weights).reshape(layout.shape)
    n_groups = int(np.prod(layout.param_shape, dtype=np.int64))
    if w.size == 0:
        return np.zeros(n_groups)
    if layout.axis is None:
        return np.array([fn.reduce(w, axis=None)], dtype=np.float64)
    if layout.block_size == 0:
        others = tuple(a for a in range(w.ndim) if a != layout.axis)
        return fn.reduce(w, axis=others).astype(np.float64).reshape(-1)
    starts = np.arange(0, layout.shape[layout.axis], layout.block_size)
    return fn.reduceat(w, starts, axis=layout.axis).astype(np.float64).reshape(-1)


def _params(hi, lo, qmin, qmax, symmetric, signed, bits):
    if symmetric:
        amax = np.maximum(hi, -lo)
        half = (1 << (bits - 1)) - 1  # [-127, 127] for int8: the grid is symmetric about zero
        scale = amax / half
        zp = np.full(hi.shape, 0 if signed else 1 << (bits - 1), dtype=np.int64)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax).astype(np.int64)
    # float32 is what ONNX stores: an all-zero group still needs a positive scale, and a range of
    # denormals must not round to a zero scale.
    scale = np.where(scale > 0, np.maximum(scale, np.finfo(np.float32).tiny), 1.0)
    scale = scale.astype(np.float32).astype(np.float64)
    return scale, zp


def _group_error(w, group, n_groups, scale, zp, qmin, qmax) -> np.ndarray:
    s, z = scale[group], zp[group]
    q = np.clip(np.round(w / s) + z, qmin, qmax)
    err = (q - z) * s - w
    return np.bincount(group, weights=err * err, minlength=n_groups)


def _percentile_range(w, group, n_groups, percentile, hi, lo):
    order = np.lexsort((np.abs(w), group))
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.clip(np.ceil(percentile / 100.0 * counts).astype(np.int64) - 1, 0, None)
    limit = np.where(counts > 0, np.abs(w[order[np.minimum(starts + rank, w.size - 1)]]), 0.0)
    return np.minimum(hi, limit), np.maximum(lo, -limit)


def quantize(weights: np.ndarray, layout: Layout, scale: np.ndarray, zero_point: np.ndarray,
             bits: int, signed: bool) -> np.ndarray:
    """Integer codes (int32) on the grid: round(w / scale) + zero_point, clipped; computed in
    float64 a block of rows at a time (the grid's parameters are broadcast, not copied)."""
    qmin, qmax = qrange(bits, signed)
    w = np.asarray(weights).reshape(layout.shape)
    s = layout.expand(scale)
    z = layout.expand(np.asarray(zero_point).astype(np.int32))  # block layouts repeat it per element
    out = np.empty(layout.shape, np.int32)
    if w.ndim == 0:
        out[...] = np.clip(np.round(w.astype(np.float64) / s.astype(np.float64)) + z.astype(np.int64), qmin, qmax)
        return out
    rows = max(1, ROWS_ELEMENTS // max(1, int(np.prod(layout.shape[1:], dtype=np.int64))))
    for i in range(0, layout.shape[0], rows):
        part = slice(i, i + rows)
        out[part] = np.clip(np.round(w[part].astype(np.float64) / s[part].astype(np.float64))
                            + z[part].astype(np.int64), qmin, qmax)
    return out


ROWS_ELEMENTS = 1 << 20  # elements per block of rows in `quantize`


def dequantize(q: np.ndarray, layout: Layout, scale: np.ndarray, zero_point: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(q - zero_point) * scale in float32, exactly as ONNX DequantizeLinear computes it."""
    s = layout.expand(scale).astype(np.float32)
    z = layout.expand(zero_point).astype(np.int32)
    return ((q.astype(np.int32) - z).astype(np.float32) * s).astype(dtype)
