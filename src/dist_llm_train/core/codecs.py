"""Update compression codecs on flat float32 vectors, and worker-side error feedback.

A codec turns a vector into payload bytes plus a small `meta` dict (plain ints, floats and
strings, so it travels as msgpack next to the payload). The payload is what the network
carries and what byte counters count; nothing about the vector's size is in `meta`
because the receiver already knows it from the job's layout and must check it.

`decode` is the PS's first line of defence: any inconsistency between size, meta and
payload, and any non-finite value, is a ValueError before a single number is used.

numpy (and pydantic for the config) only: the parameter server imports this module.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I32 = np.dtype("<i4")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
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
    if not _all_finite(arr):
        raise ValueError("cannot encode a vector containing NaN or Inf")
    return arr


def _all_finite(arr: np.ndarray) -> bool:
    """One pass, no temporary: a finite sum proves every element finite (NaN/Inf propagate through
    addition); only a non-finite sum (a bad element, or finite values overflowing together) runs the
    exact element-wise check."""
    return bool(np.isfinite(arr.sum(dtype=np.float64))) or bool(np.isfinite(arr).all())


def _finite(out: np.ndarray, codec: str) -> np.ndarray:
    if not _all_finite(out):
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

    def residual(self, sent: np.ndarray, enc: Encoded) -> np.ndarray:
        """What `enc` failed to carry of `sent` (error feedback's memory); codecs may compute it faster."""
        return sent - self.decode(enc, sent.size)


class NoneCodec(Codec):
    """Raw little-endian float32: the baseline every other codec is measured against."""

    name = "none"

    def encode(self, vec: np.ndarray) -> Encoded:
        return Encoded(_as_vector(vec).astype(_F32, copy=False).tobytes())

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        _expect_len(payload, 4 * size, self.name, size)
        return np.frombuffer(payload, dtype=_F32).copy()


class FP16Codec(Codec):
    """IEEE half precision, 2x smaller. Values beyond ±65504 saturate; `meta.saturated` counts them."""

    name = "fp16"

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        saturated = 0
        # Two cheap passes (no temporary) rule out saturation; counting and clipping only when it happens.
        if arr.size and (float(arr.max()) > _FP16_MAX or float(arr.min()) < -_FP16_MAX):
            saturated = int(np.count_nonzero(np.abs(arr) > _FP16_MAX))
            arr = np.clip(arr, -_FP16_MAX, _FP16_MAX)
        return Encoded(arr.astype(_F16).tobytes(), {"saturated": saturated})

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
        blocks = _blocks(arr, self.chunk)
        if blocks.size == 0:
            return Encoded(b"", {"chunk": self.chunk})
        scales = (np.maximum(blocks.max(axis=1), -blocks.min(axis=1)) / np.float32(127.0)).astype(np.float32)
        inv = np.divide(np.float32(1.0), scales, out=np.zeros_like(scales), where=scales > 0)
        scaled = np.multiply(blocks, inv[:, None])  # one temporary, then rounded and clipped in place
        np.rint(scaled, out=scaled)
        np.clip(scaled, -127, 127, out=scaled)
        codes = scaled.astype(np.int8).ravel()[: arr.size]
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
        codes = _blocks(np.frombuffer(payload, dtype=np.int8, offset=4 * n_chunks), chunk)
        out = np.multiply(codes, scales[:, None], dtype=np.float32)  # broadcast: no repeated scale vector
        return out.ravel()[:size]


def _blocks(arr: np.ndarray, chunk: int) -> np.ndarray:
    """`arr` as (n_chunks, chunk) rows; only a ragged tail costs a copy (zero-padded)."""
    n_chunks = math.ceil(arr.size / chunk)
    if arr.size == n_chunks * chunk:
        return arr.reshape(n_chunks, chunk)
    padded = np.zeros(n_chunks * chunk, dtype=arr.dtype)
    padded[: arr.size] = arr
    return padded.reshape(n_chunks, chunk)


def top_k_indices(arr: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |arr| (exact), without partitioning the whole vector.

    A threshold estimated from a strided sample keeps ~1.5k candidates after one comparison
    pass; the exact selection then runs on the candidates only. If the estimate keeps fewer
    than k (it never changes the result, only the cost) the full argpartition runs instead.
    """
    n = arr.size
    if k == 0:
        return np.empty(0, np.int64)
    mag = np.abs(arr)
    if k < n // 8 and n >= 4096:
        sample = mag[:: max(1, n // 8192)]
        q = 1.0 - min(1.0, 1.5 * k / n)
        threshold = np.quantile(sample, q)
        cand = np.flatnonzero(mag >= threshold)
        if cand.size >= k:
            best = cand[np.argpartition(mag[cand], cand.size - k)[cand.size - k :]]
            return np.sort(best)
    return np.sort(np.argpartition(mag, n - k)[n - k :])


class TopKCodec(Codec):
    """Keep the k = ceil(ratio·d) largest-magnitude coordinates: their indices + float32 values.

    Index bytes are always on the wire and always counted. `index="int32"`: absolute int32
    indices, 8 bytes per kept coordinate (at ratio r the payload is 2r of the raw size).
    `index="delta"`: the gaps between sorted indices, as uint16 when every gap fits (the usual
    case: at r = 1 % gaps average 100) else uint32, so 6 bytes per kept coordinate. The
    decoder reads either (delta payloads say so in `meta.gap_bytes`). Pair it with
    `ErrorFeedback`, or the dropped mass is lost for good.
    """

    name = "topk"
    params = frozenset({"ratio", "index"})
    INDEX_CODINGS = ("int32", "delta")

    def __init__(self, ratio: float = 0.01, index: str = "int32") -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
        if index not in self.INDEX_CODINGS:
            raise ValueError(f"topk index coding must be one of {self.INDEX_CODINGS}, got {index!r}")
        self.ratio = float(ratio)
        self.index = index

    def k_for(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.ratio * size))) if size else 0

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"topk indices are int32; vector of {arr.size} is too long")
        k = self.k_for(arr.size)
        idx = top_k_indices(arr, k)
        values = arr[idx].astype(_F32).tobytes()
        if self.index == "int32":
            return Encoded(idx.astype(_I32).tobytes() + values, {"k": int(k)})
        gaps = np.diff(idx, prepend=0)
        gap_dtype = _U16 if k == 0 or int(gaps.max()) <= 0xFFFF else _U32
        meta = {"k": int(k), "gap_bytes": gap_dtype.itemsize}
        return Encoded(gaps.astype(gap_dtype).tobytes() + values, meta)

    def _indices(self, payload: bytes, meta: dict[str, Any], k: int, size: int) -> tuple[np.ndarray, int]:
        """The kept indices and the byte offset where the values start."""
        if "gap_bytes" not in meta:
            _expect_len(payload, 8 * k, self.name, size)
            return np.frombuffer(payload, dtype=_I32, count=k).astype(np.int64), 4 * k
        width = _meta_int(meta, "gap_bytes", self.name)
        if width not in (2, 4):
            raise ValueError(f"topk meta gap_bytes must be 2 or 4, got {width}")
        _expect_len(payload, (width + 4) * k, self.name, size)
        gaps = np.frombuffer(payload, dtype=_U16 if width == 2 else _U32, count=k).astype(np.int64)
        if k > 1 and (gaps[1:] == 0).any():
            raise ValueError("topk indices must be strictly increasing (a zero gap repeats an index)")
        return np.cumsum(gaps), width * k

    def residual(self, sent: np.ndarray, enc: Encoded) -> np.ndarray:
        """Kept values travel exactly, so the residual is `sent` with the kept coordinates zeroed."""
        idx, _ = self._indices(bytes(enc.payload), enc.meta, _meta_int(enc.meta, "k", self.name), sent.size)
        out = np.array(sent, dtype=np.float32, copy=True)
        out[idx] = 0.0
        return out

    def _decode(self, payload: bytes, meta: dict[str, Any], size: int) -> np.ndarray:
        k = _meta_int(meta, "k", self.name)
        if not 0 <= k <= size:
            raise ValueError(f"topk meta k={k} is outside [0, {size}]")
        idx, offset = self._indices(payload, meta, k, size)
        values = np.frombuffer(payload, dtype=_F32, offset=offset).astype(np.float32)
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


class CodecConfig(BaseModel):
    """How workers compress what they push (`training.codec`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["none", "fp16", "int8", "topk"] = Field("none", description="The codec")
    ratio: float = Field(0.01, gt=0, le=1, description="topk: fraction of coordinates kept")
    error_feedback: bool | None = Field(None, description="Keep what the codec dropped; None: on for topk only")
    int8_chunk: int = Field(1024, ge=1, le=1 << 24, description="int8: elements per scale")
    topk_index: Literal["int32", "delta"] = Field("delta", description="topk index coding (delta: uint16 gaps)")

    @property
    def uses_error_feedback(self) -> bool:
        return self.error_feedback if self.error_feedback is not None else self.name == "topk"

    def build(self) -> Codec:
        return get_codec(self.name, ratio=self.ratio, chunk=self.int8_chunk, index=self.topk_index)


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
        self._residual = self.codec.residual(corrected, enc)
        return enc
