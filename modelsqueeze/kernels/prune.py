"""Pruning masks: unstructured magnitude (by count, threshold or std scale; per tensor or global),
structured (whole output channels by L1/L2 norm) and N:M. Masks are boolean keep-masks."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

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
    if threshold > float(np.finfo(weights.dtype).max):  # above every finite weight (no overflow warning)
        return ~np.isfinite(weights)
    return np.abs(weights) >= threshold


def std_threshold(arrays: Sequence[np.ndarray], scale: float) -> float:
    """Han et al.'s threshold: `scale` times the standard deviation of the weights."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])
    return float(scale * values.std()) if values.size else 0.0


CHUNK = 1 << 22  # elements per flat chunk: a 32 MiB float64 key copy at a time
COLLECT = 1 << 21  # a candidate bucket this small is gathered and partitioned, not histogrammed again
_DIGIT = 16  # radix bits per histogram pass: 65536 bins, at most four passes over 64-bit keys
_ABS = np.uint64(0x7FFF_FFFF_FFFF_FFFF)
_NAN_KEY = np.uint64(0x7FF0_0000_0000_0001)  # one above +inf's bits: every NaN ties here


def magnitude_keys(values: np.ndarray) -> np.ndarray:
    """uint64 sort keys of |values|, flat and freshly allocated: the bits of float64(|v|) (non-negative
    float64 bit patterns order like the numbers; float16/32 widen exactly, so mixed dtypes compare
    by value), every NaN mapped to one key above +inf so that NaNs tie and rank last."""
    keys = np.asarray(values).astype(np.float64).reshape(-1).view(np.uint64)  # astype copies
    np.bitwise_and(keys, _ABS, out=keys)  # |v| as bits: clears the sign, -0.0 becomes 0.0
    return np.minimum(keys, _NAN_KEY, out=keys)  # NaN bits all exceed +inf's: clamp them to one key


def flat_chunks(array: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """Consecutive flat slices of at most `chunk` elements (views when the array is contiguous)."""
    flat = np.asarray(array).reshape(-1)
    for start in range(0, flat.size, chunk):
        yield flat[start:start + chunk]


def bucket_histogram(keys: np.ndarray, lo: int, width: int) -> np.ndarray:
    """Counts of the next 16-bit radix digit over the keys in the bucket [lo, lo + 2**width), in
    place on `keys` (which it consumes), allocating nothing per key: the subtraction wraps keys
    below lo to huge values, and clamping at 2**width sends every key outside to one spare bin."""
    keys -= np.uint64(lo)
    if width < 64:
        np.minimum(keys, np.uint64(1 << width), out=keys)
    keys >>= np.uint64(width - _DIGIT)
    digits = keys.view(np.int64)  # every value < 2**63, so the same numbers; bincount wants signed
    return np.bincount(digits, minlength=(1 << _DIGIT) + 1)[:1 << _DIGIT]


def bucket_offsets(keys: np.ndarray, lo: int, width: int) -> np.ndarray:
    """key - lo for the keys in the bucket [lo, lo + 2**width), in place on `keys` (which it consumes)."""
    keys -= np.uint64(lo)
    return keys[keys < np.uint64(1 << width)]


def key_summary(array: np.ndarray, chunk: int) -> tuple[int, int | None, int | None, int, np.ndarray]:
    """One tensor's size, smallest and largest key (None when empty), number of exact zeros and
    top-digit histogram, read chunk by chunk (the first pass of the selection)."""
    size, low, high, zeros = 0, None, None, 0
    hist = np.zeros(1 << _DIGIT, dtype=np.int64)
    for part in flat_chunks(array, chunk):
        keys = magnitude_keys(part)
        if keys.size:
            small, large = int(keys.min()), int(keys.max())
            low, high = (small, large) if low is None else (min(low, small), max(high, large))
        size += keys.size
        zeros += int(np.count_nonzero(keys == 0))
        hist += bucket_histogram(keys, 0, 64)
        del keys  # before the next chunk's keys exist: one chunk of keys at a time
    return size, low, high, zeros, hist


def pick_digit(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the 0-based `rank`-th element of a histogram, and how many lie in lower bins."""
    cum = np.cumsum(hist)
    digit = int(np.searchsorted(cum, rank, side="right"))
    return digit, int(cum[digit] - hist[digit])


def _changed(seen: int, expected: int) -> RuntimeError:
    """A later pass must see the bucket the earlier one counted, or a loader returned other data."""
    return RuntimeError(f"a loader returned different weights between passes ({seen} != {expected} in a bucket)")


def gather(parts: Iterator[np.ndarray], count: int) -> np.ndarray:
    """The parts laid end to end in one array of the `count` elements they must add up to (no list
    of parts plus a concatenated copy)."""
    out, filled = np.empty(count, dtype=np.uint64), 0
    for part in parts:
        if filled + part.size > count:
            raise _changed(filled + part.size, count)
        out[filled:filled + part.size] = part
        filled += part.size
    if filled != count:
        raise _changed(filled, count)
    return out


def drop_earliest_ties(drop: np.ndarray, keys: np.ndarray, threshold: np.uint64, quota: int) -> int:
    """Marks in `drop` the first `quota` (at most) keys equal to the threshold and returns how many
    it marked. Consumes `keys`: where the quota ends inside the chunk, the running count of ties
    is written over them, so nothing bigger than one bool per key is allocated."""
    ties = keys == threshold
    n = int(np.count_nonzero(ties))
    if n > quota:
        running = keys.view(np.int64)
        np.copyto(running, ties)  # cast in small buffers; a cumsum of the bools would copy them whole
        np.cumsum(running, out=running)
        end = int(np.searchsorted(running, quota)) + 1  # just past the quota-th tie
        ties[end:] = False
        n = quota
    np.logical_or(drop, ties, out=drop)
    return n


class GlobalMagnitude:
    """One magnitude ranking over many tensors, computed streaming: memory stays at one chunk of
    one tensor (plus a 65536-bin histogram and at most `collect` candidates), never all weights.

    The exact k-th smallest magnitude (k = n_to_prune(total, sparsity)) is found by radix
    selection on the uint64 keys of `magnitude_keys`: a histogram of the top 16 bits picks the
    bucket holding rank k - 1, each later pass histograms the next 16 bits inside it, and once the
    bucket holds at most `collect` keys they are gathered and partitioned. The bins passed over
    count the keys strictly below the threshold, so the ties to drop are known without a pass.

    `loaders[i]()` returns tensor i. It is called once per pass: at most four passes, usually two,
    one when k is 0, every weight, or no more than the exact zeros; later passes skip the tensors
    whose key range misses the bucket. A C-contiguous tensor is read through views of `chunk`
    elements; any other is first flattened to one copy in its own dtype.

    `mask(i, array)`, called for i = 0, 1, 2, ... in order, returns tensor i's keep-mask: what a
    stable sort of all magnitudes gives. Everything below the threshold goes, and of the weights
    equal to it the earliest (by tensor, then flat position) go until k are gone."""

    def __init__(self, loaders: Sequence[Callable[[], np.ndarray]], sparsity: float, *,
                 chunk: int = CHUNK, collect: int = COLLECT):
        if chunk < 1:
            raise ValueError(f"chunk {chunk} is not positive")
        n_to_prune(0, sparsity)  # validates the fraction before any tensor is read
        self.loaders, self.chunk = list(loaders), chunk
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        self.sizes, self.lows, self.highs, zeros = [], [], [], 0
        for load in self.loaders:  # pass 1: sizes, key ranges, zeros and the top-digit histogram
            size, low, high, tensor_zeros, tensor_hist = key_summary(load(), chunk)
            self.sizes.append(size)
            self.lows.append(low)
            self.highs.append(high)
            zeros += tensor_zeros
            hist += tensor_hist
        self.total = sum(self.sizes)
        self.k = n_to_prune(self.total, sparsity)
        self.threshold: int | None = None  # the k-th smallest key; None when k is 0 or every weight
        self.ties = 0  # how many weights equal to the threshold are zeroed
        if 0 < self.k < self.total:
            # re-pruning a sparse model, the threshold is often 0: then no second pass
            self.threshold, below = (0, 0) if self.k <= zeros else self._select(hist, collect)
            self.ties = self.k - below
        self._next, self._quota = 0, self.ties

    def _select(self, hist: np.ndarray, collect: int) -> tuple[int, int]:
        """The k-th smallest key and how many keys lie strictly below it."""
        rank, lo, width, below = self.k - 1, 0, 64, 0
        while True:
            digit, lower = pick_digit(hist, rank)
            width -= _DIGIT
            lo += digit << width
            rank -= lower
            below += lower
            if width == 0:
                return lo, below
            count = int(hist[digit])
            if count <= collect:
                offsets = gather(self._pass(bucket_offsets, lo, width), count)
                offsets.partition(rank)
                value = offsets[rank]
                return lo + int(value), below + int(np.count_nonzero(offsets < value))
            hist = np.zeros(1 << _DIGIT, dtype=np.int64)
            for counts in self._pass(bucket_histogram, lo, width):
                hist += counts
            if int(hist.sum()) != count:
                raise _changed(int(hist.sum()), count)

    def _pass(self, extract: Callable[[np.ndarray, int, int], np.ndarray], lo: int,
              width: int) -> Iterator[np.ndarray]:
        """extract(keys, lo, width) for every chunk of every tensor whose key range meets the bucket."""
        for load, low, high in zip(self.loaders, self.lows, self.highs):
            if low is None or high < lo or low >= lo + (1 << width):
                continue
            # a generator expression, so that no chunk of this tensor outlives it into the next load
            yield from (extract(magnitude_keys(part), lo, width) for part in flat_chunks(load(), self.chunk))

    def mask(self, index: int, array: np.ndarray) -> np.ndarray:
        """Keep-mask of tensor `index` (the array `loaders[index]` returns), in its shape. Called
        for 0, 1, 2, ... in order: the weights tying with the threshold are dropped earliest first."""
        if index != self._next or index >= len(self.sizes):
            raise ValueError(f"mask({index}) out of order: tensor {self._next} is next")
        array = np.asarray(array)
        if array.size != self.sizes[index]:
            raise ValueError(f"tensor {index} has {array.size} weights, {self.sizes[index]} when ranked")
        self._next += 1
        if self.threshold is None:
            return np.full(array.shape, self.k == 0, dtype=bool)
        drop = np.empty(array.size, dtype=bool)
        t = np.uint64(self.threshold)
        for start, part in zip(range(0, array.size, self.chunk), flat_chunks(array, self.chunk)):
            keys = magnitude_keys(part)
            out = drop[start:start + keys.size]
            np.less(keys, t, out=out)
            if self._quota:
                self._quota -= drop_earliest_ties(out, keys, t, self._quota)
            del keys
        return np.logical_not(drop, out=drop).reshape(array.shape)

    @property
    def magnitude(self) -> float | None:
        """The threshold as a number (nan when NaNs must go; None when k is 0 or every weight)."""
        if self.threshold is None:
            return None
        return float(np.array(self.threshold, np.uint64).view(np.float64))


def global_magnitude_masks(arrays: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """Keep-masks for several tensors sharing one magnitude ranking: exactly round(sparsity * N)
    of all N weights are zeroed, the smallest first, ties broken by tensor then position (what a
    stable sort of all magnitudes gives). NaN weights rank above every number (kept unless more
    weights must go than there are numbers), all NaNs tie; infinities are numbers; mixed float
    dtypes compare by value. O(N) streaming radix selection, see GlobalMagnitude."""
    ranking = GlobalMagnitude([lambda a=a: a for a in arrays], sparsity)
    return [ranking.mask(i, a) for i, a in enumerate(arrays)]


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
