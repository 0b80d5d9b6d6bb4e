"""Raw little-endian numeric arrays: the stored form of float values and codebooks."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from modelsqueeze.codecs import StreamCodec, check_n_bytes
from modelsqueeze.errors import ModelSqueezeError

RAW_DTYPES = (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
)  # fmt: skip


def _little_endian(dtype: str) -> np.dtype:
    if dtype not in RAW_DTYPES:
        raise ModelSqueezeError(f"raw dtype {dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    return np.dtype(dtype).newbyteorder("<")


def encode_raw(array: np.ndarray, dtype: str) -> bytes:
    """`array` flattened and stored as little-endian `dtype`.

    Floats may be rounded to a narrower float (values are stored in the tensor's dtype), but an
    integer that does not fit, or a float stored as an integer, is an error rather than a wrap.
    """
    array = np.asarray(array).reshape(-1)
    stored_dtype = _little_endian(dtype)
    integer_target = stored_dtype.kind in "iu"
    if array.dtype.kind not in ("biu" if integer_target else "biuf"):
        raise ModelSqueezeError(f"cannot store {array.dtype} values as raw {dtype}")
    if integer_target:
        limits = np.iinfo(stored_dtype)
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            raise ModelSqueezeError(f"values span {int(array.min())}..{int(array.max())}, outside raw {dtype}")
    return array.astype(stored_dtype, copy=False).tobytes()


def decode_raw(data: bytes | memoryview, count: int, dtype: str) -> np.ndarray:
    """`count` values of `dtype`, copied out of `data`: a decoded record must not keep the whole
    sidecar's bytes alive (a few small codebooks would otherwise hold hundreds of MB)."""
    stored_dtype = _little_endian(dtype)
    check_n_bytes(data, count * stored_dtype.itemsize, f"{count} raw {dtype} values")
    return np.frombuffer(data, dtype=stored_dtype, count=count).astype(np.dtype(dtype), copy=True)


class RawCodec(StreamCodec, key="raw"):
    param_names = ("dtype",)

    @classmethod
    def encode(cls, array: np.ndarray, *, dtype: str | None = None, **_hints: Any) -> tuple[bytes, dict[str, Any]]:
        dtype = dtype or np.asarray(array).dtype.name
        return encode_raw(array, dtype), {"dtype": dtype}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        dtype = params.get("dtype")
        if not isinstance(dtype, str):
            raise ModelSqueezeError(f"parameter 'dtype' must be a string, got {dtype!r}")
        return decode_raw(data, count, dtype)
