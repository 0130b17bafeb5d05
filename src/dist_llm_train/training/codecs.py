"""Update compression codecs on flat float32 vectors, and worker-side error feedback.

A codec turns a vector into payload bytes plus a small `meta` dict (plain ints, floats and
strings, so it travels as msgpack next to the payload). The payload is what the network
carries and what byte counters count; nothing about the vector's size is in `meta`
because the receiver already knows it from the job's layout and must check it.

`decode` is the PS's first line of defence: any inconsistency between size, meta and
payload, and any non-finite value, is a ValueError before a single number is used.

numpy only: the parameter server imports this module.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I32 = np.dtype("<i4")
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Encoded:
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the payload (meta is a handful of msgpack bytes on top)."""
        return len(self.payload)


def _as_vector(vec: np.ndarray) -> np.ndarray:
    arr = np.asarray(vec)
    if arr.ndim != 1:
        raise ValueError(f"codecs take a 1-D vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"codecs take a floating-point vector, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("cannot encode a vector containing NaN or Inf")
    return arr


def _finite(out: np.ndarray, codec: str) -> np.ndarray:
    if not np.isfinite(out).all():
        raise ValueError(f"{codec} payload decodes to NaN or Inf")
    return out


def _expect_len(payload: bytes, want: int, codec: str, size: int) -> None:
    if len(payload) != want:
        raise ValueError(f"{codec} payload is {len(payload)} bytes; a vector of {size} needs {want}")


def _meta_int(meta: dict[str, Any], key: str, codec: str) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{codec} meta needs an integer {key!r}, got {value!r}")
    return value


class Codec(ABC):
    """Encode a flat float32 vector to bytes and back. Stateless: error feedback wraps it."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def encode(self, vec: np.ndarray) -> Encoded: ...

    def decode(self, enc: Encoded, size: int) -> np.ndarray:
        """The float32 vector of length `size` that `enc` carries; ValueError if it cannot be one."""
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not isinstance(enc.meta, dict):
            raise ValueError(f"{self.name} meta must be a dict, got {type(enc.meta).__name__}")
        return _finite(self._decode(bytes(enc.payload), enc.meta, size), self.name)

    @abstractmethod
    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray: ...


class NoneCodec(Codec):
    """Raw little-endian float32: the baseline every other codec is measured against."""

    name = "none"

    def encode(self, vec: np.ndarray) -> Encoded:
        return Encoded(_as_vector(vec).astype(_F32, copy=False).tobytes())

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        _expect_len(payload, 4 * size, self.name, size)
        return np.frombuffer(payload, dtype=_F32).astype(np.float32)


class FP16Codec(Codec):
    """IEEE half precision, 2x smaller. Values beyond ±65504 saturate; `meta.saturated` counts them."""

    name = "fp16"

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        saturated = int(np.count_nonzero(np.abs(arr) > _FP16_MAX))
        half = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(_F16)
        return Encoded(half.tobytes(), {"saturated": saturated})

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        _expect_len(payload, 2 * size, self.name, size)
        return np.frombuffer(payload, dtype=_F16).astype(np.float32)


class Int8Codec(Codec):
    """Symmetric int8 with one float32 absmax scale per chunk: ~4x smaller, error ≤ absmax/254 per element.

    Per-chunk scales keep one large coordinate from flattening the resolution of the
    whole vector (the reason LLM.int8 and QSGD-style codecs block their scales).
    Payload: n_chunks float32 scales, then `size` int8 codes.
    """

    name = "int8"
    params = frozenset({"chunk"})

    def __init__(self, chunk: int = 1024) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= (1 << 24):
            raise ValueError(f"int8 chunk must be an int in [1, 2^24], got {chunk!r}")
        self.chunk = chunk

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        n_chunks = math.ceil(arr.size / self.chunk)
        padded = np.zeros(n_chunks * self.chunk, dtype=np.float32)
        padded[: arr.size] = arr
        blocks = padded.reshape(n_chunks, self.chunk)
        scales = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32)
        safe = np.where(scales > 0, scales, 1.0)[:, None]
        codes = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).ravel()[: arr.size]
        return Encoded(scales.astype(_F32).tobytes() + codes.tobytes(), {"chunk": self.chunk})

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        chunk = _meta_int(meta, "chunk", self.name)
        if chunk < 1:
            raise ValueError(f"int8 meta chunk must be >= 1, got {chunk}")
        n_chunks = math.ceil(size / chunk)
        _expect_len(payload, 4 * n_chunks + size, self.name, size)
        scales = np.frombuffer(payload, dtype=_F32, count=n_chunks).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise ValueError("int8 payload has a negative or non-finite scale")
        codes = np.frombuffer(payload, dtype=np.int8, offset=4 * n_chunks).astype(np.float32)
        return codes * np.repeat(scales, chunk)[:size]


class TopKCodec(Codec):
    """Keep the k = ceil(ratio·d) largest-magnitude coordinates as int32 indices + float32 values.

    8 bytes per kept coordinate, index bytes included: at ratio r the payload is 2r of the
    raw size, not r. Pair it with `ErrorFeedback`, or the dropped mass is lost for good.
    """

    name = "topk"
    params = frozenset({"ratio"})

    def __init__(self, ratio: float = 0.01) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def k_for(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.ratio * size))) if size else 0

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"topk indices are int32; vector of {arr.size} is too long")
        k = self.k_for(arr.size)
        idx = np.sort(np.argpartition(np.abs(arr), arr.size - k)[arr.size - k :]) if k else np.empty(0, int)
        return Encoded(idx.astype(_I32).tobytes() + arr[idx].astype(_F32).tobytes(), {"k": int(k)})

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        k = _meta_int(meta, "k", self.name)
        if not 0 <= k <= size:
            raise ValueError(f"topk meta k={k} is outside [0, {size}]")
        _expect_len(payload, 8 * k, self.name, size)
        idx = np.frombuffer(payload, dtype=_I32, count=k).astype(np.int64)
        values = np.frombuffer(payload, dtype=_F32, offset=4 * k).astype(np.float32)
        if k and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"topk index out of range for a vector of {size}")
        if k > 1 and (np.diff(idx) <= 0).any():
            raise ValueError("topk indices must be strictly increasing (sorted, no duplicates)")
        out = np.zeros(size, dtype=np.float32)
        out[idx] = values
        return out


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, FP16Codec, Int8Codec, TopKCodec)}
_ALL_PARAMS = frozenset().union(*(c.params for c in CODECS.values()))


def get_codec(name: str, **params: Any) -> Codec:
    """The codec called `name`, built with the params it takes.

    Params another codec takes are ignored (config always carries e.g. `ratio`, whatever
    the chosen codec); a param no codec knows is a ValueError, as is an unknown name.
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    unknown = sorted(set(params) - _ALL_PARAMS)
    if unknown:
        raise ValueError(f"unknown codec parameters {unknown}; known: {sorted(_ALL_PARAMS)}")
    cls = CODECS[name]
    return cls(**{k: v for k, v in params.items() if k in cls.params})


class ErrorFeedback:
    """Worker-side residual memory for a lossy codec (Seide et al. 2014; Karimireddy et al. 2019).

    Each call sends codec(update + residual) and keeps what the codec dropped, so over
    many steps the sum of what was sent tracks the sum of the true updates: the error
    stays bounded instead of accumulating.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residual: np.ndarray | None = None

    @property
    def residual(self) -> np.ndarray | None:
        return None if self._residual is None else self._residual.copy()

    def reset(self) -> None:
        self._residual = None

    def compress(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        if self._residual is not None and self._residual.shape != arr.shape:
            raise ValueError(f"update has {arr.size} elements; the residual has {self._residual.size}")
        corrected = arr if self._residual is None else arr + self._residual
        enc = self.codec.encode(corrected)
        self._residual = corrected - self.codec.decode(enc, arr.size)
        return enc
