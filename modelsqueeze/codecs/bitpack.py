"""Unsigned integers packed at exactly `bits` bits each (1..16), least significant bit first.

Value i occupies stream bits [i*bits, (i+1)*bits); stream bit j is bit j % 8 of byte j // 8.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from modelsqueeze.codecs import StreamCodec, check_n_bytes, int_param
from modelsqueeze.errors import ModelSqueezeError

MAX_BITS = 16
# Eight values of at most 16 bits fill at most 128 bits: two little-endian uint64 words per group.
_GROUP = 8


def packed_n_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ModelSqueezeError(f"bit width must be an integer in 1..{MAX_BITS}, got {bits!r}")


def _unsigned_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def _lane_slots(bits: int) -> list[tuple[int, int, bool]]:
    """For each of the 8 values of a group: (word, bit offset in word, whether it spills into word 1)."""
    slots = []
    for lane in range(_GROUP):
        word, offset = divmod(lane * bits, 64)
        slots.append((word, offset, offset + bits > 64))
    return slots


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers below 2**bits into ceil(len*bits/8) bytes."""
    _check_bits(bits)
    values = np.asarray(values)
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_):
        raise ModelSqueezeError(f"bit packing needs a 1-D integer array, got {values.dtype} with shape {values.shape}")
    count = values.size
    if count and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ModelSqueezeError(
            f"values span {int(values.min())}..{int(values.max())}, which does not fit in {bits} unsigned bits"
        )
    n_groups = -(-count // _GROUP)
    lanes = np.zeros(n_groups * _GROUP, dtype=_unsigned_dtype(bits))
    lanes[:count] = values
    lanes = lanes.reshape(n_groups, _GROUP)
    words = np.zeros((n_groups, 2), dtype=np.uint64)
    for lane, (word, offset, spills) in enumerate(_lane_slots(bits)):
        lane_values = lanes[:, lane].astype(np.uint64)
        words[:, word] |= lane_values << np.uint64(offset)
        if spills:
            words[:, 1] |= lane_values >> np.uint64(64 - offset)
    group_bytes = words.astype("<u8", copy=False).view(np.uint8)[:, :bits]  # a group is exactly `bits` bytes
    return np.ascontiguousarray(group_bytes).reshape(-1)[: packed_n_bytes(count, bits)].tobytes()


def unpack_bits(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """The `count` values packed in `data` (uint8 up to 8 bits, else uint16); the length must be exact."""
    _check_bits(bits)
    n_bytes = packed_n_bytes(count, bits)
    check_n_bytes(data, n_bytes, f"{count} values at {bits} bits")
    stream = np.frombuffer(data, dtype=np.uint8, count=n_bytes)
    used_bits = count * bits % 8
    if used_bits and stream[-1] >> used_bits:
        raise ModelSqueezeError("bit-packed stream has non-zero bits after its last value")
    n_groups = -(-count // _GROUP)
    padded = np.zeros(n_groups * bits, dtype=np.uint8)
    padded[:n_bytes] = stream
    group_bytes = np.zeros((n_groups, 16), dtype=np.uint8)
    group_bytes[:, :bits] = padded.reshape(n_groups, bits)
    words = group_bytes.view("<u8")
    mask = np.uint64((1 << bits) - 1)
    lanes = np.empty((n_groups, _GROUP), dtype=_unsigned_dtype(bits))
    for lane, (word, offset, spills) in enumerate(_lane_slots(bits)):
        lane_values = words[:, word] >> np.uint64(offset)
        if spills:
            lane_values |= words[:, 1] << np.uint64(64 - offset)
        lanes[:, lane] = lane_values & mask
    return lanes.reshape(-1)[:count]


class BitpackCodec(StreamCodec, key="bitpack"):
    param_names = ("bits",)

    @classmethod
    def encode(cls, array: np.ndarray, *, bits: int | None = None, **_hints: Any) -> tuple[bytes, dict[str, Any]]:
        if bits is None:
            raise ModelSqueezeError("the bitpack codec needs a bit width")
        return pack_bits(array, bits), {"bits": bits}

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        return unpack_bits(data, count, int_param(params, "bits", 1, MAX_BITS))
