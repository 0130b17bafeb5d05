"""The PS's only contact with training maths: decode a pushed update, aggregate a round.

`dist_llm_train.training.codecs` and `.aggregation` own the real registries. Until they
land, a minimal `none`/`fp16` decoder and a `mean` aggregator live here behind the two
functions below; switching is one line in each (marked SWITCH). Whatever backs them, the
contract the store relies on is the same: bad input raises `PSError(INVALID_ARGUMENT)`, and
a decoded update is a finite flat float32 vector of exactly the job's length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgpack
import numpy as np

from dist_llm_train.paramserver.types import ErrorCode, PSError

Buffer = bytes | bytearray | memoryview


class Aggregator(Protocol):
    def aggregate(self, updates: np.ndarray) -> np.ndarray:
        """(n, d) stacked updates -> (d,) combined update."""
        ...


class _Mean:
    name = "mean"

    def aggregate(self, updates: np.ndarray) -> np.ndarray:
        if updates.ndim != 2 or updates.shape[0] < 1:
            raise ValueError(f"mean needs a non-empty (n, d) matrix, got shape {updates.shape}")
        out: np.ndarray = updates.mean(axis=0, dtype=np.float32)
        return out


def _internal_aggregator(name: str, **params: float) -> Aggregator:
    if name != "mean":
        raise ValueError(f"unknown aggregation rule {name!r} (this build has: mean)")
    if params:
        raise ValueError(f"aggregation 'mean' takes no parameters, got {sorted(params)}")
    return _Mean()


def make_aggregator(name: str, params: Mapping[str, float]) -> Aggregator:
    """Build the job's aggregation rule; a bad name or parameter is the caller's error."""
    try:
        return _internal_aggregator(name, **params)  # SWITCH: training.aggregation.get_aggregator
    except (ValueError, TypeError) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"aggregation: {err}") from None


def _decode_internal(codec: str, meta: dict[str, Any], payload: Buffer, size: int) -> np.ndarray:
    dtype: np.dtype[Any]
    if codec == "none":
        dtype = np.dtype("<f4")
    elif codec == "fp16":
        dtype = np.dtype("<f2")
    else:
        raise ValueError(f"unknown codec {codec!r} (this build decodes: none, fp16)")
    if len(payload) != size * dtype.itemsize:
        raise ValueError(f"codec {codec!r} payload is {len(payload)} bytes, expected {size * dtype.itemsize} "
                         f"for {size} parameters")
    vec = np.frombuffer(payload, dtype=dtype)
    return vec if dtype == np.float32 else vec.astype(np.float32)


def _unpack_meta(meta: bytes) -> dict[str, Any]:
    if not meta:
        return {}
    try:
        out = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"codec_meta is not valid msgpack: {err}") from None
    if out is None:
        return {}
    if not isinstance(out, dict):
        raise PSError(ErrorCode.INVALID_ARGUMENT, "codec_meta must be a msgpack map")
    return out


def decode_update(codec: str, meta: bytes, payload: Buffer, size: int) -> np.ndarray:
    """Decode one pushed payload into a finite float32 vector of `size` elements.

    The result may be a read-only view of `payload`; callers must not write to it.
    """
    meta_dict = _unpack_meta(meta)
    try:
        vec = _decode_internal(codec, meta_dict, payload, size)  # SWITCH: training.codecs.get_codec(...).decode
    except (ValueError, TypeError, KeyError) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"cannot decode update: {err}") from None
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    if vec.shape[0] != size:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"update has {vec.shape[0]} elements, job has {size}")
    if not all_finite(vec):
        raise PSError(ErrorCode.INVALID_ARGUMENT, "update contains NaN or Inf")
    return vec


def all_finite(vec: np.ndarray) -> bool:
    """True when no element is NaN or +-Inf.

    A finite sum proves every element finite (NaN and Inf propagate through addition), and
    numpy's pairwise sum is one cheap pass with no temporary. Only when the sum is not finite
    (a bad element, or finite values that overflow float32 together) is the exact check run."""
    return bool(np.isfinite(vec.sum())) or bool(np.isfinite(vec).all())
