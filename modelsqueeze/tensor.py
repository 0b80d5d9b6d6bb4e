"""The compressed-tensor record: the one truth that the ONNX writer and the sidecar writer both render.

A record holds whichever parts a tensor has (sparse positions, raw values, codebook + indices) and
`decode()` turns them back into the dense array every consumer sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from modelsqueeze.errors import ModelSqueezeError
from modelsqueeze.kernels.quant import Layout, qrange

FLOAT_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """One weight tensor in compressed form.

    Stored entries are either every element (``positions is None``) or only the elements at
    ``positions`` (sorted, unique flat indices; all other elements are exactly zero). Each stored
    entry's value is ``values[i]`` (raw) or ``codebook[indices[i]]`` (weight sharing).
    ``stream_codecs`` lets a later step (Huffman) choose how a stream is stored, by role name.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    values: np.ndarray | None = None
    codebook: np.ndarray | None = None
    indices: np.ndarray | None = None
    index_bits: int = 0
    positions: np.ndarray | None = None
    stream_codecs: Mapping[str, str] = field(default_factory=dict)
    # Linear quantization: entry i is (indices[i] + qmin - zero_point[g]) * scale[g] for its group g
    # (one group, one per channel along quant_axis, or blocks of block_size along quant_axis).
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    quant_axis: int | None = None
    block_size: int = 0
    signed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in FLOAT_DTYPES:
            raise ModelSqueezeError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {FLOAT_DTYPES}")
        if any(d < 0 for d in self.shape):
            raise ModelSqueezeError(f"tensor {self.name!r}: negative dimension in shape {self.shape}")
        forms = sum(part is not None for part in (self.values, self.codebook, self.scale))
        if forms != 1:
            raise ModelSqueezeError(f"tensor {self.name!r}: needs exactly one of raw values, a codebook or quantization scales")
        if (self.values is None) != (self.indices is not None):
            raise ModelSqueezeError(f"tensor {self.name!r}: a codebook or quantization needs indices, raw values none")
        if self.scale is not None:
            self._check_quant()
        n_stored = self.n_stored
        if self.positions is not None:
            pos = self.positions
            if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer):
                raise ModelSqueezeError(f"tensor {self.name!r}: positions must be a 1-D integer array")
            # Signed (unsigned diffs would wrap and hide unsorted positions), 4 bytes where they fit.
            target = np.int32 if self.n_params <= 2**31 else np.int64
            if pos.dtype != target:
                if pos.size and (int(pos.max()) >= min(self.n_params, 2**63) or int(pos.min()) < 0):
                    raise ModelSqueezeError(f"tensor {self.name!r}: a position lies outside the tensor")
                pos = pos.astype(target)
                object.__setattr__(self, "positions", pos)
            if pos.size and (pos[0] < 0 or pos[-1] >= self.n_params or np.any(np.diff(pos) <= 0)):
                raise ModelSqueezeError(f"tensor {self.name!r}: positions must be sorted, unique and inside the tensor")
        stored = self.values if self.values is not None else self.indices
        if stored.ndim != 1 or stored.size != n_stored:
            raise ModelSqueezeError(
                f"tensor {self.name!r}: {stored.size} stored entries, expected {n_stored} as a 1-D array"
            )
        if self.scale is not None:
            if not 1 <= self.index_bits <= 16:
                raise ModelSqueezeError(f"tensor {self.name!r}: quantization to {self.index_bits} bits is outside 1..16")
            if self.indices.size and int(self.indices.max()) >= (1 << self.index_bits):
                raise ModelSqueezeError(f"tensor {self.name!r}: a code does not fit in {self.index_bits} bits")
        if self.codebook is not None:
            if self.codebook.ndim != 1:
                raise ModelSqueezeError(f"tensor {self.name!r}: the codebook must be a 1-D array")
            k = self.codebook.size
            if not 1 <= self.index_bits <= 16 or k > (1 << self.index_bits):
                raise ModelSqueezeError(
                    f"tensor {self.name!r}: {k} centroids do not fit in {self.index_bits}-bit indices"
                )
            if self.indices.size and int(self.indices.max()) >= k:
                raise ModelSqueezeError(f"tensor {self.name!r}: an index points past the {k}-entry codebook")

    def _check_quant(self) -> None:
        axis, rank = self.quant_axis, len(self.shape)
        if axis is not None and not 0 <= axis < rank:
            raise ModelSqueezeError(f"tensor {self.name!r}: quantization axis {axis} outside its {rank} dimensions")
        if self.block_size < 0 or (self.block_size and axis is None):
            raise ModelSqueezeError(f"tensor {self.name!r}: a block size needs an axis and must be positive")
        want = self.layout.param_shape
        if self.zero_point is None or self.scale.shape != want or self.zero_point.shape != want:
            raise ModelSqueezeError(f"tensor {self.name!r}: scales and zero points must both have shape {want}")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ModelSqueezeError(f"tensor {self.name!r}: quantization scales must be finite and positive")
        qmin, qmax = qrange(self.index_bits, self.signed) if 1 <= self.index_bits <= 16 else (0, 0)
        if self.zero_point.size and (self.zero_point.min() < qmin or self.zero_point.max() > qmax):
            raise ModelSqueezeError(f"tensor {self.name!r}: a zero point lies outside the {self.index_bits}-bit grid")

    @property
    def layout(self) -> Layout:
        return Layout(self.shape, self.quant_axis, self.block_size)

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)  # Python ints: no silent overflow

    @property
    def n_stored(self) -> int:
        return self.n_params if self.positions is None else int(self.positions.size)

    @property
    def kind(self) -> str:
        """A short human name for the composition: dense, sparse, codebook or sparse+codebook."""
        base = "codebook" if self.codebook is not None else "quant" if self.scale is not None else "raw"
        return f"sparse+{base}" if self.positions is not None else base

    def stored_values(self) -> np.ndarray:
        """The value of every stored entry, in storage order."""
        if self.codebook is not None:
            return self.codebook.astype(self.dtype, copy=False)[self.indices.astype(np.intp)]
        if self.scale is None:
            return self.values.astype(self.dtype, copy=False)
        with np.errstate(over="ignore"):  # scales that are finite but huge: checked below
            if self.positions is None:  # the grid broadcast, not gathered per element
                q = self.indices.reshape(self.shape).astype(np.int32) + qrange(self.index_bits, self.signed)[0]
                q -= self.layout.expand(self.zero_point.astype(np.int32))
                values = q.astype(np.float32)
                del q
                values *= self.layout.expand(self.scale.astype(np.float32))
                values = values.astype(self.dtype, copy=False).reshape(-1)
            else:
                q = self.indices.astype(np.int32) + qrange(self.index_bits, self.signed)[0]
                groups = self.layout.groups().reshape(-1)[self.positions]
                s = self.scale.astype(np.float32).reshape(-1)[groups]
                z = self.zero_point.astype(np.int32).reshape(-1)[groups]
                # (q - zero_point) * scale in float32: what ONNX DequantizeLinear computes.
                values = ((q - z).astype(np.float32) * s).astype(self.dtype)
        if self._may_overflow() and not np.isfinite(values).all():  # finite scales whose products are not
            raise ModelSqueezeError(f"tensor {self.name!r}: its scales times its codes overflow {self.dtype} "
                                    f"(a crafted or corrupt record)")
        return values

    def _may_overflow(self) -> bool:
        """Whether some (code - zero point) x scale could pass float16's range, from the parameters
        alone (a few numbers per group): only then is every decoded value checked."""
        qmin, qmax = qrange(self.index_bits, self.signed)
        z = self.zero_point.astype(np.float64)
        reach = np.maximum(qmax - z, z - qmin) * self.scale.astype(np.float64)
        return bool(reach.size) and float(reach.max()) > float(np.finfo(np.float16).max)

    def decode(self) -> np.ndarray:
        """The dense tensor these parts describe."""
        stored = self.stored_values()
        if self.positions is None:
            return stored.reshape(self.shape)
        dense = np.zeros(self.n_params, dtype=self.dtype)
        dense[self.positions] = stored
        return dense.reshape(self.shape)

    @classmethod
    def raw(cls, name: str, array: np.ndarray) -> "CompressedTensor":
        """A record that stores `array` as it is."""
        array = np.asarray(array)
        return cls(name=name, shape=array.shape, dtype=array.dtype.name, values=array.reshape(-1))


_ARRAY_FIELDS = ("values", "codebook", "indices", "positions", "scale", "zero_point")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8))


def share_arrays(record: CompressedTensor, *others: CompressedTensor | None) -> CompressedTensor:
    """`record` (a fresh object: it is changed in place) with each of its arrays replaced by a
    bit-identical one of `others`, where there is one: a decoded copy of a record, or a step's
    output that kept its input's positions, then takes no memory of its own."""
    for field_name in _ARRAY_FIELDS:
        mine = getattr(record, field_name)
        if mine is None:
            continue
        for other in others:
            theirs = getattr(other, field_name, None) if other is not None else None
            if theirs is not None and theirs is not mine and _same_bits(mine, theirs):
                object.__setattr__(record, field_name, theirs)
                break
    return record
