"""Update compression codecs on flat float32 vectors, and worker-side error feedback.

A codec turns a vector into payload bytes plus a small `meta` dict (plain ints, floats and
strings, so it travels as msgpack next to the payload). The payload is what the network
carries and what byte counters count; nothing about the vector's size is in `meta`
because the receiver already knows it (the job's parameter count, or the strategy's region of
it: `JobState.update_size`) and must check it.

`decode` is the PS's first line of defence: any inconsistency between size, meta and
payload, and any non-finite value, is a ValueError before a single number is used.

numpy (and pydantic for the config) only: the parameter server imports this module. The hottest loops
(fp16, int8, int4 and int2 both ways, top-k's candidate scan, SparseLoCo's encode, decode and residual) run
in `_kernels.c` when the install compiled it (`core/kernels.py`), with byte-identical results; the numpy code
below is the reference and the fallback.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dist_llm_train.core.kernels import NATIVE, address

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I32 = np.dtype("<i4")
_U16 = np.dtype("<u2")
_U32 = np.dtype("<u4")
_FP16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Encoded:
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire for the payload (meta is a handful of msgpack bytes on top)."""
        return len(self.payload)


Piece = tuple[Buffer, dict[str, Any]]
"""One slice's payload and its meta, as `Codec.split` cuts them."""


def _pairs(bounds: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _cuts_whole_chunks(bounds: Sequence[int], chunk: int) -> bool:
    """True when every inner bound falls between two chunks of `chunk` elements."""
    return all(b % chunk == 0 for b in bounds[1:-1])


def _split_fixed(payload: Buffer, meta: dict[str, Any], bounds: Sequence[int], width: int) -> list[Piece]:
    """Pieces of a payload of one `width`-byte value per element: views of its bytes, no copy."""
    data = memoryview(payload).cast("B")
    return [(data[width * a : width * b], meta) for a, b in _pairs(bounds)]


def _split_dense(payload: Buffer, meta: dict[str, Any], bounds: Sequence[int], chunk: int, bits: int) -> list[Piece]:
    """Pieces of a payload laid out as one float32 scale per chunk, then one `bits`-bit code per element packed
    back to back: each piece is its chunks' scales and its elements' code bytes (bounds on chunk bounds whose
    codes start on a byte, so nothing is re-packed; the last piece keeps the stream's zero padding)."""
    data = memoryview(payload).cast("B")
    codes_at = 4 * math.ceil(bounds[-1] / chunk)
    pieces: list[Piece] = []
    for a, b in _pairs(bounds):
        scales = data[4 * (a // chunk) : 4 * math.ceil(b / chunk)]
        codes = data[codes_at + a * bits // 8 : codes_at + _packed_len(b, bits)]
        pieces.append((bytes(scales) + codes, meta))
    return pieces


def _as_float32(vec: np.ndarray) -> np.ndarray:
    """`vec` as a contiguous 1-D float32 array (a copy only when it is not one already); values unchecked."""
    arr = np.asarray(vec)
    if arr.ndim != 1:
        raise ValueError(f"codecs take a 1-D vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"codecs take a floating-point vector, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_vector(vec: np.ndarray) -> np.ndarray:
    arr = _as_float32(vec)
    if not all_finite(arr):
        raise ValueError("cannot encode a vector containing NaN or Inf")
    return arr


def _range(arr: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty vector: two reductions at memory speed, and exact as a finiteness check —
    NaN propagates through both and an infinity is the min or the max."""
    return float(np.minimum.reduce(arr)), float(np.maximum.reduce(arr))


def all_finite(vec: np.ndarray) -> bool:
    """True when no element is NaN or ±Inf.

    A finite sum of squares proves every element finite: NaN and Inf propagate through the products and
    the sum. `np.dot(v, v)` is that sum as one BLAS pass with no temporary, the cheapest full read numpy
    offers (0.06 ms for 4 MB here, against 0.08 for `np.isfinite(v).all()` and its bool array, 0.10 for a
    min and a max, 0.16 for the pairwise `sum`). Only when it is not finite (a bad element, or finite
    values whose squares overflow float32 together) does the exact element-wise check tell the two apart.
    """
    flat = vec.reshape(-1)
    if flat.dtype != np.float32 or flat.size == 0:
        return bool(np.isfinite(flat).all())
    with np.errstate(over="ignore", invalid="ignore"):  # overflow here is expected, not an error
        squares = np.dot(flat, flat)
    return bool(np.isfinite(squares)) or bool(np.isfinite(flat).all())


def _finite(out: np.ndarray, codec: str) -> np.ndarray:
    if not all_finite(out):
        raise ValueError(f"{codec} payload decodes to NaN or Inf")
    return out


class _Scratch(threading.local):
    """Per-thread temporaries reused from call to call.

    A fresh multi-MB numpy array costs a page fault per 4 KiB touched (the allocator hands big blocks
    back to the kernel when freed), which takes longer than the arithmetic on it: the fp16 encoder's
    passes measured 0.1 ms each on a reused 4 MB buffer and 0.3-2 ms on a new one. Codecs therefore
    keep their intermediates here and allocate only what they return. One set per thread, because the
    PS decodes on several. Element-wise passes work in blocks of at most `_BLOCK` elements (4 MiB of
    float32 per buffer, whatever the model size); error feedback's corrected vector is the one whole
    vector kept here, 4 bytes per parameter in the thread that encodes (the worker's training thread).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, tag: str, count: int, dtype: np.dtype[Any] | type) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = count * dt.itemsize
        buf = self.buffers.get(tag)
        if buf is None or buf.nbytes < nbytes:
            buf = self.buffers[tag] = np.empty(nbytes, np.uint8)
        return buf[:nbytes].view(dt)


_SCRATCH = _Scratch()
_BLOCK = 1 << 20  # elements per block of element-wise work: 4 MiB of float32


def _block_starts(size: int) -> range:
    return range(0, size, _BLOCK)


def _expect_len(payload: Buffer, want: int, codec: str, size: int) -> None:
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
    # Whether `training.codec.error_feedback: null` turns error feedback on: yes for codecs whose
    # per-step error is a large share of the value (sparsifiers, <= 4-bit quantisers).
    feedback_by_default: ClassVar[bool] = False
    # True when `_decode` itself proves its output finite (it checks the few numbers the output is made
    # of: per-chunk scales against the largest code, or the kept values), so `decode` skips a full pass.
    decodes_finite: ClassVar[bool] = False
    # Bytes per element when the payload is one fixed-width value per element, in order (else None): a slice of
    # elements is then a slice of bytes, and each value stands alone, so a receiver of a slice checks it alone.
    element_bytes: ClassVar[int | None] = None

    @abstractmethod
    def encode(self, vec: np.ndarray) -> Encoded: ...

    def decode(self, enc: Encoded, size: int) -> np.ndarray:
        """The float32 vector of length `size` that `enc` carries; ValueError if it cannot be one."""
        return self.decode_payload(enc.payload, enc.meta, size)

    def decode_payload(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        """`decode` of a payload as it was received: a `memoryview` of a transport's frame is read in place,
        not copied first."""
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        if not isinstance(meta, dict):
            raise ValueError(f"{self.name} meta must be a dict, got {type(meta).__name__}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"{self.name} payload must be bytes, got {type(payload).__name__}")
        if isinstance(payload, memoryview) and (payload.ndim != 1 or payload.itemsize != 1):
            payload = payload.cast("B")  # len() must count bytes
        out = self._decode(payload, meta, size)
        return out if self.decodes_finite else _finite(out, self.name)

    @abstractmethod
    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray: ...

    def residual(self, sent: np.ndarray, enc: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        """What `enc` failed to carry of `sent` (error feedback's memory); codecs may compute it faster.

        `out`, if given, is a float32 array of `sent`'s shape that receives it (and is returned); it may
        not be `sent` itself."""
        return np.subtract(sent, self.decode(enc, sent.size), out=out)

    def payload_nbytes(self, size: int) -> int | None:
        """This codec's payload length for a vector of `size`, or None when it depends on the values."""
        return None

    def split(self, payload: Buffer, meta: dict[str, Any], bounds: Sequence[int]) -> list[Piece] | None:
        """`payload` (one that decodes: check it first) cut into pieces, piece i carrying elements
        [bounds[i], bounds[i + 1]) of the vector of bounds[-1] elements, so that decoding piece i at its length
        gives exactly those elements of the whole decode: the same codes and scales, not a re-encoding. None when
        this codec cannot cut there (a bound inside one of its chunks). Sharded parameter servers push the
        pieces, so each shard receives its slice as compressed as the worker sent it. Fixed-width codecs cut
        anywhere, as views of the bytes (each piece keeps the whole payload's meta)."""
        return None if self.element_bytes is None else _split_fixed(payload, meta, bounds, self.element_bytes)


class NoneCodec(Codec):
    """Raw little-endian float32: the baseline every other codec is measured against."""

    name = "none"
    element_bytes = 4

    def encode(self, vec: np.ndarray) -> Encoded:
        return Encoded(_as_vector(vec).astype(_F32, copy=False).tobytes())

    def payload_nbytes(self, size: int) -> int:
        return 4 * size

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        _expect_len(payload, self.payload_nbytes(size), self.name, size)
        return np.frombuffer(payload, dtype=_F32).copy()


class FP16Codec(Codec):
    """IEEE half precision, 2x smaller. Values beyond ±65504 saturate; `meta.saturated` counts them.

    The bytes are exactly numpy's `astype(float16)` (round to nearest, ties to even) and its way back,
    computed by the CPU's F16C conversions in one pass each way (`_kernels.c`), or without them by integer
    and float32 passes (`_float32_to_half_bits`, `_half_bits_to_float32`): numpy's own casts run one
    element at a time, 10-20x slower.
    """

    name = "fp16"
    decodes_finite = True  # `_decode` refuses the infinity / NaN codes before converting
    element_bytes = 2

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_float32(vec)
        if arr.size == 0:
            return Encoded(b"", {"saturated": 0})
        if NATIVE is not None:  # one pass: checks, saturates and converts
            out = np.empty(arr.size, _U16)
            saturated = int(NATIVE.dlt_f32_to_f16(address(arr), address(out), arr.size))
            if saturated < 0:
                raise ValueError("cannot encode a vector containing NaN or Inf")
            return Encoded(out.tobytes(), {"saturated": saturated})
        lo, hi = _range(arr)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("cannot encode a vector containing NaN or Inf")
        saturated = 0
        if hi > _FP16_MAX or lo < -_FP16_MAX:  # rare: counting and clipping only when it happens
            saturated = int(np.count_nonzero(np.abs(arr) > _FP16_MAX))
            arr = np.clip(arr, -_FP16_MAX, _FP16_MAX)
        out = np.empty(arr.size, _U16)
        for start in _block_starts(arr.size):
            _float32_to_half_bits(arr[start : start + _BLOCK], out[start : start + _BLOCK])
        return Encoded(out.tobytes(), {"saturated": saturated})

    def payload_nbytes(self, size: int) -> int:
        return 2 * size

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        _expect_len(payload, self.payload_nbytes(size), self.name, size)
        half = np.frombuffer(payload, dtype=_U16)
        out = np.empty(size, np.float32)
        if NATIVE is not None and size:
            if NATIVE.dlt_f16_to_f32(address(half), address(out), size) < 0:
                raise ValueError(f"{self.name} payload decodes to NaN or Inf")
            return out
        for start in _block_starts(size):
            chunk = half[start : start + _BLOCK]
            magnitude = _SCRATCH.get("fp16.magnitude", chunk.size, _U16)
            np.bitwise_and(chunk, np.uint16(0x7FFF), out=magnitude)
            if magnitude.size and int(np.maximum.reduce(magnitude)) >= 0x7C00:  # exponent all ones
                raise ValueError(f"{self.name} payload decodes to NaN or Inf")
            _half_bits_to_float32(chunk, out[start : start + _BLOCK])
        return out


def _float32_to_half_bits(arr: np.ndarray, out: np.ndarray) -> None:
    """`out` (uint16) = the IEEE half bits of finite float32 `arr`, |arr| <= 65504, rounded to nearest even.

    The rounding is float32's own (Maratyszcza's FP16 method): adding M = 2^(max(e, −14) + 13) to |x|
    (e its binary exponent) leaves the sum an ulp of 2^(max(e, −14) − 10), exactly half precision's
    spacing at x, including the subnormal halves below 2^−14; subtracting M again gives |x| rounded,
    exactly. Scaled by 2^−112, a rounded value of half exponent E becomes the float32 of exponent E
    (or the float32 subnormal that holds a subnormal half's code), so its bits >> 13 are the half's bits.
    """
    n = arr.size
    bits = arr.view(_U32)
    magic = _SCRATCH.get("fp16.magic", n, _U32)
    np.bitwise_and(bits, np.uint32(0x7F800000), out=magic)  # 2^e as float32 (0 for zero / subnormals)
    np.maximum(magic, np.uint32(113 << 23), out=magic)  # e >= -14: half's smallest normal exponent
    magic += np.uint32(13 << 23)  # · 2^13
    magic_f = magic.view(np.float32)
    rounded = _SCRATCH.get("fp16.rounded", n, np.float32)
    np.abs(arr, out=rounded)
    rounded += magic_f
    rounded -= magic_f
    rounded *= np.float32(2.0**-112)
    half = rounded.view(_U32)
    half >>= np.uint32(13)
    sign = magic  # reused: the magic numbers are spent
    np.right_shift(bits, np.uint32(31), out=sign)
    sign <<= np.uint32(15)
    half |= sign
    np.copyto(out, half, casting="unsafe")  # the codes are < 2^16: the narrowing keeps them whole


def _half_bits_to_float32(half: np.ndarray, out: np.ndarray) -> None:
    """`out` (float32) = the values of the finite IEEE half bits `half` (uint16), exactly.

    Sign-extending the 16 bits to 32 and shifting them left by 13 puts exponent and mantissa where a
    float32 keeps them, a negative half's sign at bit 31 and three copies of it in bits 28-30, which
    the mask clears; that float32 times 2^112 (re-biasing the exponent, and turning the float32
    subnormal that a subnormal half becomes into its normal value) is the half's value.
    """
    word = out.view(np.int32)
    np.copyto(word, half.view(np.int16))
    word <<= np.int32(13)
    word &= np.int32(-0x70000001)  # 0x8FFFFFFF
    out *= np.float32(2.0**112)


class Int8Codec(Codec):
    """Symmetric int8 with one float32 absmax scale per chunk: ~4x smaller, error ≤ absmax/254 per element.

    Per-chunk scales keep one large coordinate from flattening the resolution of the
    whole vector (the reason LLM.int8 and QSGD-style codecs block their scales).
    Payload: n_chunks float32 scales, then `size` int8 codes.
    """

    name = "int8"
    params = frozenset({"chunk"})
    decodes_finite = True  # finite, non-negative scales whose 128-fold is finite, times codes in [-128, 127]

    def __init__(self, chunk: int = 1024) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= (1 << 24):
            raise ValueError(f"int8 chunk must be an int in [1, 2^24], got {chunk!r}")
        self.chunk = chunk

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_float32(vec)  # no finiteness pass of its own: a NaN or Inf shows in its chunk's scale
        size, chunk = arr.size, self.chunk
        if size == 0:
            return Encoded(b"", {"chunk": chunk})
        n_full, n_chunks = size // chunk, math.ceil(size / chunk)
        payload = np.empty(4 * n_chunks + size, np.uint8)
        if NATIVE is not None:  # the same arithmetic as below, one fused pass per chunk
            scales = payload[: 4 * n_chunks].view(_F32)
            codes = payload[4 * n_chunks :]
            if NATIVE.dlt_int8_encode(address(arr), size, chunk, address(scales), address(codes)) < 0:
                raise ValueError("cannot encode a vector containing NaN or Inf")
            return Encoded(payload.tobytes(), {"chunk": chunk})
        absmax = np.empty(n_chunks, np.float32)
        rows = arr[: n_full * chunk].reshape(n_full, chunk)
        if n_full:
            np.maximum(np.maximum.reduce(rows, axis=1), -np.minimum.reduce(rows, axis=1), out=absmax[:n_full])
        if n_full < n_chunks:
            tail = arr[n_full * chunk :]
            absmax[n_full] = np.maximum(tail.max(), -tail.min())
        if not np.isfinite(absmax).all():
            raise ValueError("cannot encode a vector containing NaN or Inf")
        absmax += np.float32(0.0)  # an all-zero chunk's -0.0 becomes +0.0, the native kernel's absmax
        scales = payload[: 4 * n_chunks].view(_F32)
        np.divide(absmax, np.float32(127.0), out=scales)
        # A normal scale s gives |x|·(1/s) <= 127·(1 + 2^-24)^3 < 127.5, so rounding stays in [-127, 127]
        # with no clip pass. A subnormal one (absmax below ~1.5e-36) has no such bound and its reciprocal can
        # overflow: those chunks get 0 here and are divided, rounded and clipped one by one below.
        normal = scales >= np.finfo(np.float32).tiny
        inv = np.divide(np.float32(1.0), scales, out=np.zeros_like(absmax), where=normal)
        codes = payload[4 * n_chunks :].view(np.int8)
        rows_per_block = max(1, _BLOCK // chunk)
        for first in range(0, n_full, rows_per_block):
            block = rows[first : first + rows_per_block]
            scaled = _SCRATCH.get("int8.scaled", block.size, np.float32).reshape(block.shape)
            np.multiply(block, inv[first : first + block.shape[0], None], out=scaled)
            np.rint(scaled, out=scaled)
            np.copyto(codes[first * chunk : first * chunk + block.size], scaled.reshape(-1), casting="unsafe")
        if n_full < n_chunks:
            tail = arr[n_full * chunk :]
            scaled = _SCRATCH.get("int8.scaled", tail.size, np.float32)
            np.multiply(tail, inv[n_full], out=scaled)
            np.rint(scaled, out=scaled)
            np.copyto(codes[n_full * chunk :], scaled, casting="unsafe")
        for row in np.flatnonzero(~normal & (scales > 0)):  # tiny chunks: rare, bounded by the chunk count
            part = arr[row * chunk : (row + 1) * chunk]
            codes[row * chunk : row * chunk + part.size] = np.clip(np.rint(part / scales[row]), -127, 127)
        return Encoded(payload.tobytes(), {"chunk": chunk})

    def payload_nbytes(self, size: int) -> int:
        return 4 * math.ceil(size / self.chunk) + size

    def split(self, payload: Buffer, meta: dict[str, Any], bounds: Sequence[int]) -> list[Piece] | None:
        """At chunk bounds: each piece is its chunks' scales and its elements' codes."""
        chunk = _meta_int(meta, "chunk", self.name)
        return _split_dense(payload, meta, bounds, chunk, 8) if _cuts_whole_chunks(bounds, chunk) else None

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        chunk = _meta_int(meta, "chunk", self.name)
        if chunk < 1:
            raise ValueError(f"int8 meta chunk must be >= 1, got {chunk}")
        n_chunks = math.ceil(size / chunk)
        _expect_len(payload, 4 * n_chunks + size, self.name, size)
        scales = _scales(payload, n_chunks, self.name)
        with np.errstate(over="ignore"):  # overflow is what this looks for
            too_large = n_chunks > 0 and not np.isfinite(np.multiply(scales.max(), np.float32(128.0), dtype=np.float32))
        if too_large:
            raise ValueError(f"{self.name} payload decodes to NaN or Inf (a scale too large for its codes)")
        codes = np.frombuffer(payload, dtype=np.int8, offset=4 * n_chunks)
        out = np.empty(size, np.float32)
        if NATIVE is not None and size:
            NATIVE.dlt_int8_decode(address(codes), address(scales), size, chunk, address(out))
            return out
        n_full = size // chunk
        body = n_full * chunk
        np.copyto(out, codes)  # int8 -> float32, then scaled in place by one broadcast
        rows = out[:body].reshape(n_full, chunk)
        rows *= scales[:n_full, None]
        if body < size:
            out[body:] *= scales[n_full]
        return out


# -- bit packing: codes narrower than a byte, and top-k indices local to a chunk ------------------

_WORD: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _packed_len(count: int, width: int) -> int:
    """Bytes that `count` codes of `width` bits take packed back to back (the last byte zero-padded)."""
    return (count * width + 7) // 8


def _pack(codes: np.ndarray, width: int) -> bytes:
    """Unsigned `width`-bit codes back to back, little-endian: code i holds bits [i·width, (i+1)·width) of
    the stream, bit 0 being the lowest bit of the first byte. Unused bits of the last byte are zero."""
    nbytes = _packed_len(codes.size, width)
    if 8 % width:  # e.g. 12-bit indices (few of them): through one bit per byte
        bits = (codes.astype(np.uint32)[:, None] >> np.arange(width, dtype=np.uint32)) & np.uint32(1)
        return np.packbits(bits.astype(np.uint8).ravel(), bitorder="little").tobytes()
    per = 8 // width
    lanes = codes.astype(np.uint8, copy=False)
    if lanes.size != nbytes * per:
        lanes = np.zeros(nbytes * per, np.uint8)
        lanes[: codes.size] = codes
    if per == 1:
        return lanes.tobytes()
    # The `per` codes of one output byte, read as one little-endian word, sit 8 bits apart; shifting
    # code j down by j·(8 − width) lines it up at bit j·width. Codes < 2^width, so nothing overlaps.
    word = lanes.view(_WORD[per])
    packed = word.copy()
    for lane in range(1, per):  # over the lanes of a byte (at most 8), not over elements
        packed |= word >> np.uint8(lane * (8 - width))
    return packed.astype(np.uint8).tobytes()


def _check_padding(packed: np.ndarray, count: int, width: int, what: str) -> None:
    """A set bit after the last code means `_pack` did not write this: refused, which also keeps the
    encoding canonical (one vector, one payload)."""
    used = (count * width) % 8
    if used and packed[-1] >> np.uint8(used):
        raise ValueError(f"{what}: padding bits after the last code must be zero")


def _unpack(packed: np.ndarray, count: int, width: int, what: str) -> np.ndarray:
    """The `count` codes `_pack` wrote into `packed` (uint8, exactly `_packed_len` bytes), as int64."""
    _check_padding(packed, count, width, what)
    bits = np.unpackbits(packed, count=count * width, bitorder="little")
    weights = np.left_shift(np.int64(1), np.arange(width, dtype=np.int64))
    return bits.reshape(count, width).astype(np.int64) @ weights


# -- symmetric low-bit level sets ------------------------------------------------------------------


@dataclass(frozen=True)
class _Levels:
    """The symmetric levels a `bits`-bit code names, in units of a per-chunk step u = absmax / divisor.

    4 and 8 bits are mid-tread: the integers −L..L (L = 2^(b−1) − 1: 7, 127), so zero is exact (a
    gradient's untouched rows stay zero) and the one spare code, 0 (it would be −2^(b−1)), is never
    written and is refused. Two bits cannot afford a zero level (that leaves three levels, or an
    asymmetric four), so 2-bit is mid-rise: the centres of four equal cells over [−absmax, absmax],
    {−3, −1, +1, +3}·u with u = absmax/4 — sign × {small, large}, large = 3·small, the shape of the
    4-level Lloyd–Max quantiser for a Gaussian (±0.45σ, ±1.51σ), with worst-case error u.

    Rounding is deterministic, to the nearest level. Its per-element bias (what stochastic rounding
    would remove, at the price of variance) is removed over steps by error feedback instead.
    """

    bits: int

    @property
    def midrise(self) -> bool:
        return self.bits == 2

    @property
    def top(self) -> int:
        """The largest level, in units of u."""
        return 3 if self.midrise else (1 << (self.bits - 1)) - 1

    @property
    def divisor(self) -> np.float32:
        return np.float32(4.0 if self.midrise else self.top)

    @cached_property
    def table(self) -> np.ndarray:
        """The level each code names, in units of u (a mid-tread set's code 0 names −top − 1: invalid)."""
        codes = np.arange(1 << self.bits, dtype=np.float32)
        return 2 * codes - 3 if self.midrise else codes - np.float32(self.top + 1)

    @cached_property
    def byte_table(self) -> np.ndarray:
        """The levels each of the 256 packed bytes holds, one opaque item of 8/bits float32 per byte,
        so `byte_table[packed].view(np.float32)` unpacks and dequantises in one gather."""
        shifts = np.arange(0, 8, self.bits, dtype=np.uint8)
        codes = (np.arange(256, dtype=np.uint8)[:, None] >> shifts) & np.uint8((1 << self.bits) - 1)
        rows = np.ascontiguousarray(self.table[codes])
        return rows.view(np.dtype((np.void, rows.shape[1] * 4))).ravel()

    def units(self, absmax: np.ndarray) -> np.ndarray:
        units = (absmax / self.divisor).astype(np.float32)
        # Near float32's max, top·u can round past it to inf; one ulp less keeps every level finite.
        with np.errstate(over="ignore"):
            overflows = np.isinf(units * np.float32(self.top))
        return np.where(overflows, np.nextafter(units, np.float32(0)), units)

    def codes(self, flat: np.ndarray, chunk: int, units: np.ndarray, pad_to: int) -> np.ndarray:
        """uint8 codes of the level nearest each element of `flat`, whose runs of `chunk` elements (the last
        one possibly shorter) have steps `units`; zero-filled to `pad_to` codes, so packing copies nothing."""
        step = np.where(units > 0, units, np.float32(1.0))  # an all-zero chunk: codes of 0, which decode to 0·u
        if self.midrise:
            step = step * np.float32(2.0)  # cells of width 2u; exact
        # A correctly rounded division, not a multiply by 1/u: a value a hair below u/2 then never
        # rounds up to u, so every nonzero mid-tread level q satisfies q/2 <= x <= 2q and x − q is
        # exact in float32 (Sterbenz): the residual that error feedback keeps loses nothing.
        scaled = np.empty(flat.size, np.float32)
        _per_chunk(np.divide, flat, chunk, step, out=scaled)
        if self.midrise:
            np.floor(scaled, out=scaled)  # cell -2..1 (2 only at x = absmax, clipped)
            np.clip(scaled, -2, 1, out=scaled)
            scaled += np.float32(2.0)
        else:
            np.rint(scaled, out=scaled)
            np.clip(scaled, -self.top, self.top, out=scaled)
            scaled += np.float32(self.top + 1)
        codes = np.zeros(pad_to, np.uint8)
        codes[: flat.size] = scaled
        return codes

    def check(self, levels: np.ndarray, what: str) -> None:
        """Refuse a mid-tread code 0 (its level is below −top)."""
        if not self.midrise and levels.size and levels.min() < -self.top:
            raise ValueError(f"{what}: code 0 names no level of the {self.bits}-bit set")



_LEVELS = {bits: _Levels(bits) for bits in (2, 4, 8)}  # their tables are built once, on first use

def _per_chunk(op: np.ufunc, flat: np.ndarray, chunk: int, per_chunk: np.ndarray, out: np.ndarray) -> None:
    """out = op(flat, the value of each element's chunk), chunk by chunk as one broadcast: whole chunks as
    rows, a shorter last chunk on its own, so a ragged length costs no padded copy."""
    n_full = flat.size // chunk
    body = n_full * chunk
    op(flat[:body].reshape(n_full, chunk), per_chunk[:n_full, None], out=out[:body].reshape(n_full, chunk))
    if body < flat.size:
        op(flat[body:], per_chunk[n_full], out=out[body : flat.size])


def _scales(payload: Buffer, count: int, codec: str) -> np.ndarray:
    scales = np.frombuffer(payload, dtype=_F32, count=count).astype(np.float32)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"{codec} payload has a negative or non-finite scale")
    return scales


class _LowBitCodec(Codec):
    """Dense `bits`-bit quantisation with one float32 step u per chunk of `chunk` elements.

    Payload: ⌈d/chunk⌉ float32 steps, then d codes of `bits` bits packed back to back:
    4·⌈d/chunk⌉ + ⌈d·bits/8⌉ bytes. Chunk 128 by default: a chunk's absmax grows with its length
    (for Gaussian values ~2.6σ at 128, ~3.2σ at 1024) and an outlier coarsens only its own chunk,
    while the float32 step costs 32/128 = 0.25 bit per element (6 % on top of 4-bit codes, 12.5 %
    on top of 2-bit ones).
    """

    bits: ClassVar[int]
    params = frozenset({"chunk"})
    feedback_by_default = True

    def __init__(self, chunk: int = 128) -> None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 1 <= chunk <= (1 << 24):
            raise ValueError(f"{self.name} chunk must be an int in [1, 2^24], got {chunk!r}")
        self.chunk = chunk
        self.levels = _LEVELS[self.bits]

    @classmethod
    def nbytes_for(cls, size: int, chunk: int) -> int:
        return 4 * math.ceil(size / chunk) + _packed_len(size, cls.bits)

    def payload_nbytes(self, size: int) -> int:
        return self.nbytes_for(size, self.chunk)

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        if arr.size == 0:
            return Encoded(b"", {"chunk": self.chunk})
        if NATIVE is not None:  # the same arithmetic as below, fused per chunk
            n_chunks = math.ceil(arr.size / self.chunk)
            payload = np.empty(self.nbytes_for(arr.size, self.chunk), np.uint8)
            units_out = payload[: 4 * n_chunks].view(_F32)
            packed = payload[4 * n_chunks :]
            if NATIVE.dlt_lowbit_encode(address(arr), arr.size, self.chunk, self.bits, address(units_out),
                                        address(packed)) < 0:
                raise ValueError("cannot encode a vector containing NaN or Inf")
            return Encoded(payload.tobytes(), {"chunk": self.chunk})
        starts = np.arange(0, arr.size, self.chunk)  # reduceat on the flat vector: 2x a row-wise max
        absmax = np.maximum(np.maximum.reduceat(arr, starts), -np.minimum.reduceat(arr, starts))
        absmax += np.float32(0.0)  # an all-zero chunk's -0.0 becomes +0.0, the native kernel's absmax
        units = self.levels.units(absmax)
        codes = self.levels.codes(arr, self.chunk, units, pad_to=_packed_len(arr.size, self.bits) * 8 // self.bits)
        return Encoded(units.astype(_F32).tobytes() + _pack(codes, self.bits), {"chunk": self.chunk})

    def split(self, payload: Buffer, meta: dict[str, Any], bounds: Sequence[int]) -> list[Piece] | None:
        """At chunk bounds whose codes start on a byte: each piece is its chunks' steps and its code bytes."""
        chunk = _meta_int(meta, "chunk", self.name)
        on_bytes = all(b * self.bits % 8 == 0 for b in bounds[1:-1])
        if not (_cuts_whole_chunks(bounds, chunk) and on_bytes):
            return None
        return _split_dense(payload, meta, bounds, chunk, self.bits)

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        chunk = _meta_int(meta, "chunk", self.name)
        if not 1 <= chunk <= (1 << 24):
            raise ValueError(f"{self.name} meta chunk must be in [1, 2^24], got {chunk}")
        n_chunks = math.ceil(size / chunk)
        _expect_len(payload, self.nbytes_for(size, chunk), self.name, size)
        units = _scales(payload, n_chunks, self.name)
        packed = np.frombuffer(payload, dtype=np.uint8, offset=4 * n_chunks)
        _check_padding(packed, size, self.bits, f"{self.name} codes")
        if NATIVE is not None and size:
            out = np.empty(size, np.float32)
            if NATIVE.dlt_lowbit_decode(address(packed), address(units), size, chunk, self.bits, address(out)) < 0:
                raise ValueError(f"{self.name} payload: code 0 names no level of the {self.bits}-bit set")
            return out
        levels = self.levels.byte_table[packed].view(np.float32)[:size]
        self.levels.check(levels, f"{self.name} payload")
        _per_chunk(np.multiply, levels, chunk, units, out=levels)  # level · u, in place
        return levels


class Int4Codec(_LowBitCodec):
    """4-bit mid-tread quantisation (levels −7..7 · absmax/7, two codes a byte): ~7.5x smaller at chunk
    128, error ≤ absmax/14 per element; the residual x − q is exact in float32."""

    name = "int4"
    bits = 4


class Int2Codec(_LowBitCodec):
    """2-bit mid-rise quantisation (levels ±1, ±3 · absmax/4, four codes a byte): ~14x smaller at chunk
    128, error ≤ absmax/4 per element. Meant for error feedback (on by default)."""

    name = "int2"
    bits = 2


def _kept(ratio: float, size: int) -> int:
    """How many of `size` coordinates a top-k codec keeps at `ratio`: at least one of a non-empty vector."""
    return min(size, max(1, math.ceil(ratio * size))) if size else 0


def top_k_indices(arr: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |arr| (exact), without partitioning the whole vector.

    A threshold estimated from a strided sample keeps ~1.5k candidates after one comparison
    pass, found in index order; the k-th largest candidate magnitude τ then picks the answer out of
    them, still in order (no sort). With ties at τ it keeps everything above τ and the first ties that
    fit. If the estimate keeps fewer than k (it never changes the result, only the cost) the full
    partition runs instead.
    """
    n = arr.size
    if k == 0:
        return np.empty(0, np.int64)
    if k < n // 8 and n >= 4096:
        q = 1.0 - min(1.0, 1.5 * k / n)
        sample = np.abs(arr[:: max(1, n // 8192)])
        rank = min(sample.size - 1, int(q * sample.size))
        threshold = np.partition(sample, rank)[rank]  # the sample's q-quantile, to within one element
        cand = _at_least(arr, threshold, 2 * k + 1024)
        if cand.size >= k:
            return cand[_top_k_in_order(np.abs(arr[cand]), k)]
    return _top_k_in_order(np.abs(arr), k)


def _at_least(arr: np.ndarray, threshold: float, expect: int) -> np.ndarray:
    """Ascending positions of the elements with |arr| >= threshold (about `expect` of them)."""
    if NATIVE is not None and arr.dtype == _F32 and arr.flags.c_contiguous and arr.size < 2**31:
        # float32 comparison (the numpy path compares in float64): the set may differ at the threshold, which
        # changes only how many candidates the exact selection looks at, never the result
        limit = np.float32(threshold)
        for room in (expect, arr.size):  # almost always once: the estimate keeps ~1.5k of them
            cand = np.empty(room, np.int32)
            count = int(NATIVE.dlt_at_least(address(arr), arr.size, limit, address(cand), room))
            if count <= room:
                return cand[:count].astype(np.int64)
    parts = []
    for start in _block_starts(arr.size):  # magnitudes a block at a time, in a scratch buffer of one block
        block = arr[start : start + _BLOCK]
        mag = _SCRATCH.get("topk.magnitude", block.size, arr.dtype)
        np.abs(block, out=mag)
        parts.append(np.flatnonzero(mag >= threshold) + start)
    return np.concatenate(parts)


def _top_k_in_order(mag: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions of the k largest entries of `mag` (no NaN), the first of any ties at the k-th."""
    tau = np.partition(mag, mag.size - k)[mag.size - k]
    keep = np.flatnonzero(mag >= tau)
    if keep.size > k:  # ties at τ: everything above it, then the first tied positions that fit
        above = mag[keep] > tau
        keep = keep[above | (np.cumsum(~above) <= k - np.count_nonzero(above))]
    return keep


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
    feedback_by_default = True
    decodes_finite = True  # `_decode` checks the k values; every other coordinate is zero
    INDEX_CODINGS = ("int32", "delta")

    def __init__(self, ratio: float = 0.01, index: str = "int32") -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
        if index not in self.INDEX_CODINGS:
            raise ValueError(f"topk index coding must be one of {self.INDEX_CODINGS}, got {index!r}")
        self.ratio = float(ratio)
        self.index = index

    def k_for(self, size: int) -> int:
        return _kept(self.ratio, size)

    def payload_nbytes(self, size: int) -> int | None:
        """int32 indices: 8 bytes per kept value; delta: the gap width depends on where the values are."""
        return 8 * self.k_for(size) if self.index == "int32" else None

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

    def _indices(self, payload: Buffer, meta: dict[str, Any], k: int, size: int) -> tuple[np.ndarray, int]:
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

    def split(self, payload: Buffer, meta: dict[str, Any], bounds: Sequence[int]) -> list[Piece]:
        """Anywhere: each piece keeps the kept coordinates inside its slice, indices made local, values as they
        were, in the payload's index coding (its own k, and its own gap width when delta-coded)."""
        k = _meta_int(meta, "k", self.name)
        idx, offset = self._indices(payload, meta, k, bounds[-1])
        values = np.frombuffer(payload, dtype=_F32, offset=offset, count=k)
        cuts = np.searchsorted(idx, bounds)
        pieces: list[Piece] = []
        for (a, _), lo, hi in zip(_pairs(bounds), cuts[:-1], cuts[1:], strict=True):
            local = idx[lo:hi] - a
            if "gap_bytes" not in meta:
                pieces.append((local.astype(_I32).tobytes() + values[lo:hi].tobytes(), {"k": int(hi - lo)}))
                continue
            gaps = np.diff(local, prepend=0)
            gap_dtype = _U16 if hi == lo or int(gaps.max()) <= 0xFFFF else _U32
            piece_meta = {"k": int(hi - lo), "gap_bytes": gap_dtype.itemsize}
            pieces.append((gaps.astype(gap_dtype).tobytes() + values[lo:hi].tobytes(), piece_meta))
        return pieces

    def residual(self, sent: np.ndarray, enc: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        """Kept values travel exactly, so the residual is `sent` with the kept coordinates zeroed."""
        idx, _ = self._indices(enc.payload, enc.meta, _meta_int(enc.meta, "k", self.name), sent.size)
        if out is None:
            out = np.array(sent, dtype=np.float32, copy=True)
        else:
            np.copyto(out, sent)
        out[idx] = 0.0
        return out

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        k = _meta_int(meta, "k", self.name)
        if not 0 <= k <= size:
            raise ValueError(f"topk meta k={k} is outside [0, {size}]")
        idx, offset = self._indices(payload, meta, k, size)
        values = np.frombuffer(payload, dtype=_F32, offset=offset).astype(np.float32)
        if not all_finite(values):
            raise ValueError(f"{self.name} payload decodes to NaN or Inf")
        if k and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"topk index out of range for a vector of {size}")
        if k > 1 and (np.diff(idx) <= 0).any():
            raise ValueError("topk indices must be strictly increasing (sorted, no duplicates)")
        out = np.zeros(size, dtype=np.float32)
        out[idx] = values
        return out


def _top_k_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Per row, the sorted column indices of its k largest |values|.

    One partition of every row finds its k-th largest magnitude τ (cheaper than an argpartition);
    the elements >= τ, read in order, are then the answer, already sorted. A row with ties at τ has
    more than k of those: it keeps everything above τ and the first ties that fit.
    """
    n, width = rows.shape
    mag = np.abs(rows)
    tau = np.partition(mag, width - k, axis=1)[:, width - k, None]
    keep = mag >= tau
    if np.count_nonzero(keep) != n * k:
        above = mag > tau
        room = k - np.count_nonzero(above, axis=1, keepdims=True)
        tied = keep & ~above
        keep = above | (tied & (np.cumsum(tied, axis=1) <= room))
    return (np.flatnonzero(keep) % width).reshape(n, k)


_SparseFields = tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]


class SparseLoCoCodec(Codec):
    """Chunk-wise top-k with low-bit values (SparseLoCo; Sarfi, Thérien, Lidin & Belilovsky, 2025).

    The vector is cut into chunks of `chunk` elements (a power of two; 4096 by default, as in the
    paper). Each chunk keeps its k = ⌈ratio·chunk⌉ largest |x|; a last, shorter chunk of r elements
    keeps ⌈k·r/chunk⌉, the same density, derived from k so the receiver can check it. Indices are
    local to their chunk, log2(chunk) bits each (12 for 4096); values are quantised to `bits` bits
    (2 by default; 4 or 8) with one float32 step per chunk from the kept values' absmax (levels as
    in `_Levels`). With T kept values over n chunks the payload is 4n (steps) + ⌈T·bits/8⌉ (codes)
    + ⌈T·log2(chunk)/8⌉ (indices) bytes: at 1 %, chunk 4096 and 2 bits, 41 × 14 bits + 4 bytes =
    75.75 bytes per 16 KiB chunk, 216x smaller than float32.

    Equal chunks make the indices short and the selection one batched partition, and every
    chunk gets a share (a global top-k can spend the whole budget on one layer). Pair it with
    `ErrorFeedback` (on by default): in the paper the error-feedback accumulator is what lets 1–3 %
    of 2-bit values match or beat dense DiLoCo.
    """

    name = "sparseloco"
    params = frozenset({"ratio", "chunk", "bits"})
    feedback_by_default = True
    VALUE_BITS = (2, 4, 8)
    MAX_CHUNK = 1 << 16  # local indices fit 16 bits

    def __init__(self, ratio: float = 0.01, chunk: int = 4096, bits: int = 2) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
            raise ValueError(f"sparseloco ratio must be in (0, 1], got {ratio!r}")
        _check_sparse_chunk(chunk, "sparseloco chunk")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in self.VALUE_BITS:
            raise ValueError(f"sparseloco bits must be one of {self.VALUE_BITS}, got {bits!r}")
        self.ratio = float(ratio)
        self.chunk = chunk
        self.bits = bits

    @property
    def k(self) -> int:
        """Coordinates kept per full chunk."""
        return _kept(self.ratio, self.chunk)

    @staticmethod
    def tail_k(size: int, chunk: int, k: int) -> int:
        """Coordinates kept in the last, partial chunk (0 when `size` is a multiple of `chunk`)."""
        return -(-k * (size % chunk) // chunk)

    @classmethod
    def nbytes_for(cls, size: int, chunk: int, k: int, bits: int) -> int:
        kept = (size // chunk) * k + cls.tail_k(size, chunk, k)
        index_bits = chunk.bit_length() - 1
        return 4 * math.ceil(size / chunk) + _packed_len(kept, bits) + _packed_len(kept, index_bits)

    def payload_nbytes(self, size: int) -> int:
        return self.nbytes_for(size, self.chunk, self.k, self.bits)

    def encode(self, vec: np.ndarray) -> Encoded:
        arr = _as_vector(vec)
        chunk, k = self.chunk, self.k
        meta = {"chunk": chunk, "k": k, "bits": self.bits}
        if NATIVE is not None and arr.size:  # the same selection, steps and codes as below, chunk by chunk
            payload = np.empty(self.payload_nbytes(arr.size), np.uint8)
            n_chunks = math.ceil(arr.size / chunk)
            code_bytes = _packed_len((arr.size // chunk) * k + self.tail_k(arr.size, chunk, k), self.bits)
            body = payload[4 * n_chunks :]
            scratch, local = np.empty(chunk + 8 + k, np.float32), np.empty(k, np.uint32)
            mag, pos = np.empty(chunk + 8, np.float32), np.empty(chunk + 8, np.uint32)  # a chunk's candidates
            status = NATIVE.dlt_sparse_encode(
                address(arr), arr.size, chunk, k, self.bits, chunk.bit_length() - 1,
                address(payload[: 4 * n_chunks].view(_F32)), address(body), address(body[code_bytes:]),
                address(scratch), address(local), address(mag), address(pos),
            )
            if status < 0:
                raise ValueError(f"sparseloco kernel refused chunk={chunk}, k={k}, bits={self.bits}")
            return Encoded(payload.tobytes(), meta)
        tail_k = self.tail_k(arr.size, chunk, k)
        n_full = arr.size // chunk
        full = arr[: n_full * chunk].reshape(n_full, chunk)
        local = _top_k_rows(full, k) if n_full else np.empty((0, k), np.int64)
        values = np.take_along_axis(full, local, axis=1)
        if tail_k:  # the short last chunk as one more row, its unused slots zero (they never raise absmax)
            tail = arr[n_full * chunk :]
            tail_local = np.zeros((1, k), np.int64)
            tail_local[0, :tail_k] = top_k_indices(tail, tail_k)
            local = np.vstack([local, tail_local])
            values = np.vstack([values, np.zeros((1, k), np.float32)])
            values[-1, :tail_k] = tail[tail_local[0, :tail_k]]
        kept = n_full * k + tail_k
        levels = _LEVELS[self.bits]
        units = levels.units(np.abs(values).max(axis=1, initial=0.0))
        codes = levels.codes(values.ravel(), k, units, pad_to=values.size)[:kept]
        packed = (
            units.astype(_F32).tobytes() + _pack(codes, self.bits) + _pack(local.ravel()[:kept], chunk.bit_length() - 1)
        )
        return Encoded(packed, meta)

    def _fields(self, payload: Buffer, meta: dict[str, Any], size: int) -> _SparseFields:
        """(chunk, k, bits, per-chunk steps, value codes, chunk-local indices) as `payload` holds them."""
        chunk, k, bits, units, code_buf, index_buf, kept = self._streams(payload, meta, size)
        codes = _unpack(code_buf, kept, bits, "sparseloco value codes")
        local = _unpack(index_buf, kept, chunk.bit_length() - 1, "sparseloco indices")
        return chunk, k, bits, units, codes, local

    def _streams(
        self, payload: Buffer, meta: dict[str, Any], size: int
    ) -> tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray, int]:
        """(chunk, k, bits, per-chunk steps, code bytes, index bytes, kept count), meta and lengths checked."""
        chunk = _meta_int(meta, "chunk", self.name)
        _check_sparse_chunk(chunk, "sparseloco meta chunk")
        bits = _meta_int(meta, "bits", self.name)
        if bits not in self.VALUE_BITS:
            raise ValueError(f"sparseloco meta bits must be one of {self.VALUE_BITS}, got {bits}")
        k = _meta_int(meta, "k", self.name)
        if not 0 <= k <= chunk:
            raise ValueError(f"sparseloco meta k={k} is outside [0, {chunk}]")
        _expect_len(payload, self.nbytes_for(size, chunk, k, bits), self.name, size)
        n_chunks = math.ceil(size / chunk)
        kept = (size // chunk) * k + self.tail_k(size, chunk, k)
        units = _scales(payload, n_chunks, self.name)
        buf = np.frombuffer(payload, dtype=np.uint8, offset=4 * n_chunks)
        code_bytes = _packed_len(kept, bits)
        return chunk, k, bits, units, buf[:code_bytes], buf[code_bytes:], kept

    def _native_kept(
        self, payload: Buffer, meta: dict[str, Any], size: int, out: np.ndarray, sent: np.ndarray | None = None
    ) -> bool:
        """With the native kernel: the kept values written into `out` (zeros elsewhere), or with `sent`, `out` set
        to `sent` minus them; False when the kernel is not in use. The same checks as `_kept_values`, a
        ValueError before `out` is touched."""
        if NATIVE is None or size == 0:
            return False
        chunk, k, bits, units, code_buf, index_buf, kept = self._streams(payload, meta, size)
        index_bits = chunk.bit_length() - 1
        _check_padding(code_buf, kept, bits, "sparseloco value codes")
        _check_padding(index_buf, kept, index_bits, "sparseloco indices")
        status = NATIVE.dlt_sparse_decode(address(code_buf), address(index_buf), address(units), size, chunk, k, bits,
                                          index_bits, None if sent is None else address(sent), address(out))
        if status == -1:
            raise ValueError(f"sparseloco payload: code 0 names no level of the {bits}-bit set")
        if status == -2:
            raise ValueError("sparseloco indices must be strictly increasing within each chunk (sorted, no duplicates)")
        if status == -3:
            raise ValueError(f"sparseloco index out of range for the last chunk of {size % chunk}")
        return True

    def split(self, payload: Buffer, meta: dict[str, Any], bounds: Sequence[int]) -> list[Piece] | None:
        """At chunk bounds: each piece is its chunks' steps, value codes and local indices, re-packed as they
        were (a piece of a bit stream need not start on a byte)."""
        if not _cuts_whole_chunks(bounds, _meta_int(meta, "chunk", self.name)):
            return None
        chunk, k, bits, units, codes, local = self._fields(payload, meta, bounds[-1])
        pieces: list[Piece] = []
        for a, b in _pairs(bounds):
            first, last = a // chunk, math.ceil(b / chunk)
            lo, hi = first * k, min(last * k, codes.size)
            body = _pack(codes[lo:hi], bits) + _pack(local[lo:hi], chunk.bit_length() - 1)
            pieces.append((units[first:last].astype(_F32).tobytes() + body, meta))
        return pieces

    def _kept_values(self, payload: Buffer, meta: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
        """(global indices, reconstructed float32 values) of the coordinates `payload` carries."""
        chunk, k, bits, units, codes, local = self._fields(payload, meta, size)
        tail, kept, n_full = size % chunk, codes.size, size // chunk
        tail_k = kept - n_full * k
        levels = _LEVELS[bits]
        kept_levels = levels.table[codes]
        levels.check(kept_levels, "sparseloco payload")
        row = np.arange(kept) // k if k else np.zeros(0, np.int64)
        # Within a chunk, indices strictly increase (sorted, no duplicates); a chunk boundary resets them.
        if kept > 1 and ((np.diff(local) <= 0) & (row[1:] == row[:-1])).any():
            raise ValueError("sparseloco indices must be strictly increasing within each chunk (sorted, no duplicates)")
        if tail_k and local[n_full * k :].max() >= tail:
            raise ValueError(f"sparseloco index out of range for the last chunk of {tail}")
        return row * chunk + local, np.multiply(kept_levels, units[row], dtype=np.float32)

    def _decode(self, payload: Buffer, meta: dict[str, Any], size: int) -> np.ndarray:
        out = np.zeros(size, np.float32)
        if self._native_kept(payload, meta, size, out):
            return out
        index, values = self._kept_values(payload, meta, size)
        out[index] = values
        return out

    def residual(self, sent: np.ndarray, enc: Encoded, out: np.ndarray | None = None) -> np.ndarray:
        """Unsent coordinates whole, kept ones minus what their codes reconstruct: exactly sent − decode."""
        if NATIVE is not None and sent.size:  # the kernel checks, then copies `sent` into `out` and subtracts
            base = np.ascontiguousarray(sent, dtype=np.float32)
            target = np.empty(sent.shape, np.float32) if out is None else out
            self._native_kept(enc.payload, enc.meta, sent.size, target, base)
            return target
        index, values = self._kept_values(enc.payload, enc.meta, sent.size)
        if out is None:
            out = np.array(sent, dtype=np.float32, copy=True)
        else:
            np.copyto(out, sent)
        out[index] -= values
        return out


def _check_sparse_chunk(chunk: Any, what: str) -> None:
    ok = isinstance(chunk, int) and not isinstance(chunk, bool) and 2 <= chunk <= SparseLoCoCodec.MAX_CHUNK
    if not ok or chunk & (chunk - 1):
        raise ValueError(f"{what} must be a power of two in [2, 65536] (indices are log2(chunk) bits), got {chunk!r}")


CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (NoneCodec, FP16Codec, Int8Codec, Int4Codec, Int2Codec, TopKCodec, SparseLoCoCodec)
}
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
    """How workers compress what they push (`training.codec`). Each codec reads only its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Literal["none", "fp16", "int8", "int4", "int2", "topk", "sparseloco"] = Field("none", description="The codec")
    ratio: float = Field(0.01, gt=0, le=1, description="topk: fraction of coordinates kept; sparseloco: per chunk")
    error_feedback: bool | None = Field(
        None, description="Keep what the codec dropped; None: on for topk, sparseloco, int4 and int2"
    )
    int8_chunk: int = Field(1024, ge=1, le=1 << 24, description="int8: elements per scale")
    topk_index: Literal["int32", "delta"] = Field("delta", description="topk index coding (delta: uint16 gaps)")
    lowbit_chunk: int = Field(128, ge=1, le=1 << 24, description="int4, int2: elements per float32 step")
    sparse_chunk: int = Field(4096, description="sparseloco: elements per top-k chunk, a power of two in [2, 65536]")
    sparse_bits: Literal[2, 4, 8] = Field(2, description="sparseloco: bits per kept value")

    @field_validator("sparse_chunk")
    @classmethod
    def _power_of_two(cls, chunk: int) -> int:
        _check_sparse_chunk(chunk, "sparse_chunk")
        return chunk

    @property
    def uses_error_feedback(self) -> bool:
        return self.error_feedback if self.error_feedback is not None else CODECS[self.name].feedback_by_default

    def codec_params(self) -> dict[str, int | float | str]:
        """The chosen codec's parameters other than `ratio`, as `get_codec` (and the simulator's payload) take them."""
        by_codec: dict[str, dict[str, int | float | str]] = {
            "int8": {"chunk": self.int8_chunk},
            "int4": {"chunk": self.lowbit_chunk},
            "int2": {"chunk": self.lowbit_chunk},
            "topk": {"index": self.topk_index},
            "sparseloco": {"chunk": self.sparse_chunk, "bits": self.sparse_bits},
        }
        return by_codec.get(self.name, {})

    def build(self) -> Codec:
        return get_codec(self.name, ratio=self.ratio, **self.codec_params())


class ErrorFeedback:
    """Worker-side residual memory for a lossy codec (Seide et al. 2014; Karimireddy et al. 2019).

    Each call sends codec(update + residual) and keeps what the codec dropped, so over
    many steps the sum of what was sent tracks the sum of the true updates: the error
    stays bounded instead of accumulating.
    """

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"error feedback decay must be in (0, 1], got {decay}")
        self.codec = codec
        self.decay = np.float32(decay)  # β: e ← β·e + u (SparseLoCo); 1 is classic error feedback
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
        if self._residual is None:
            corrected = arr
        else:  # a scratch buffer: the residual is replaced only once the encoding has succeeded
            corrected = _SCRATCH.get("feedback.corrected", arr.size, np.float32)
            if self.decay == 1:
                np.add(arr, self._residual, out=corrected)
            else:
                np.multiply(self._residual, self.decay, out=corrected)
                corrected += arr
        enc = self.codec.encode(corrected)
        # The residual is this object's own array (the property hands out copies), so it is rewritten in place.
        self._residual = self.codec.residual(corrected, enc, out=self._residual)
        return enc
