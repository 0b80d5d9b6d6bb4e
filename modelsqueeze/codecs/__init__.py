"""Stream codecs: each stored form of a 1-D array is an encode/decode pair registered under a key.

A sidecar stream descriptor names its codec by key, so adding a form touches only its own module.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from modelsqueeze.errors import ModelSqueezeError

_CODECS: dict[str, type["StreamCodec"]] = {}


class StreamCodec:
    """One stored form of a 1-D array; subclasses register with ``class X(StreamCodec, key="x")``.

    ``encode(array, **hints)`` gets the hints the container knows for the stream's role (``dtype``,
    ``bits``, ``size``), takes the ones it needs and returns the bytes plus the descriptor
    parameters (named in ``param_names``) a reader needs. ``decode(data, count, params)`` reads
    them back. Its input may come from a corrupt or hostile file, so it checks ``params`` and the
    byte length before allocating, and reports every inconsistency as a ModelSqueezeError.
    """

    key: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, *, key: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key in _CODECS:
            raise TypeError(f"stream codec {key!r} is registered twice")  # a programming error
        cls.key = key
        _CODECS[key] = cls

    @classmethod
    def encode(cls, array: np.ndarray, **hints: Any) -> tuple[bytes, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes | memoryview, count: int, params: Mapping[str, Any]) -> np.ndarray:
        raise NotImplementedError


def get_codec(key: str) -> type[StreamCodec]:
    """The codec registered under `key`; an unknown key is a ModelSqueezeError listing the known ones."""
    try:
        return _CODECS[key]
    except (KeyError, TypeError):
        raise ModelSqueezeError(
            f"unknown stream codec {key!r}; this modelsqueeze knows {', '.join(codec_keys())}"
        ) from None


def codec_keys() -> tuple[str, ...]:
    return tuple(sorted(_CODECS))


def int_param(params: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int:
    """Descriptor parameter `name` as an int in [low, high], or a ModelSqueezeError saying what is wrong."""
    value = params.get(name)
    # bool is an int subclass, but `true` in a descriptor is a corrupt file, not the number 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelSqueezeError(f"parameter {name!r} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in {low}..{high}"
        raise ModelSqueezeError(f"parameter {name!r} is {value}, must be {bounds}")
    return value


def check_n_bytes(data: bytes | memoryview, n_bytes: int, what: str) -> None:
    """A stream's length must be exactly what its count and parameters imply."""
    if len(data) != n_bytes:
        raise ModelSqueezeError(f"{what} needs {n_bytes} bytes, the stream has {len(data)}")


# Importing the built-in codecs registers them; they import StreamCodec from here, defined above.
from modelsqueeze.codecs import bitpack, huffman, raw, sparse  # noqa: E402,F401
