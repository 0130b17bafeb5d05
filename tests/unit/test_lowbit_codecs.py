"""Low-bit codecs: int4, int2 and SparseLoCo-style chunk-wise top-k with 2-bit values (core.codecs).

The payload layout is rebuilt here from its documented description (float32 steps, then codes and
local indices packed little-endian, bit 0 first), independently of the module's packer, so the
tests pin the wire format and not only the round trip.
"""

from __future__ import annotations

import functools
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from dist_llm_train.core.codecs import Codec, CodecConfig, Encoded, ErrorFeedback, get_codec
from dist_llm_train.sim.config import PayloadModel
from dist_llm_train.sim.metrics import codec_payload_bytes

pytestmark = pytest.mark.usefixtures("codec_path")  # every test with the native kernels and with numpy

SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096, 4097, 10_001]
LEVELS = {"int4": np.arange(-7, 8, dtype=np.float32), "int2": np.array([-3, -1, 1, 3], np.float32)}
DIVISOR = {"int4": 7.0, "int2": 4.0}
MAX_ERROR = {"int4": 0.5, "int2": 1.0}  # in units of the chunk's step u
BITS = {"int4": 4, "int2": 2}


def rand(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def pack_le(codes: np.ndarray | list[int], width: int) -> bytes:
    """The documented packing: code i in bits [i·width, (i+1)·width), little-endian, zero-padded."""
    codes = np.asarray(codes, dtype=np.int64)
    bits = ((codes[:, None] >> np.arange(width)) & 1).astype(np.uint8).ravel()
    return np.packbits(bits, bitorder="little").tobytes()


def sparse_payload(scales: list[float], codes: list[int], local: list[int], bits: int, chunk: int) -> bytes:
    return np.array(scales, "<f4").tobytes() + pack_le(codes, bits) + pack_le(local, chunk.bit_length() - 1)


def sparse_kept(size: int, chunk: int, ratio: float) -> tuple[int, int]:
    k = min(chunk, max(1, math.ceil(ratio * chunk)))
    return k, (size // chunk) * k + math.ceil(k * (size % chunk) / chunk)


# -- byte counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4", "int2"])
@pytest.mark.parametrize("chunk", [1, 3, 64, 128])
def test_dense_payload_is_one_float32_step_per_chunk_plus_packed_codes(name: str, chunk: int) -> None:
    codec = get_codec(name, chunk=chunk)
    for size in SIZES:
        enc = codec.encode(rand(size, seed=size))
        want = 4 * math.ceil(size / chunk) + math.ceil(size * BITS[name] / 8)
        assert enc.nbytes == want == codec.payload_nbytes(size), (size, chunk)
        assert enc.meta == {"chunk": chunk}


@pytest.mark.parametrize("chunk,ratio,bits", [(4096, 0.01, 2), (4096, 0.03, 2), (64, 0.1, 4), (8, 0.5, 8), (2, 1.0, 2)])
def test_sparse_payload_is_steps_plus_packed_codes_plus_local_indices(chunk: int, ratio: float, bits: int) -> None:
    codec = get_codec("sparseloco", ratio=ratio, chunk=chunk, bits=bits)
    for size in SIZES:
        enc = codec.encode(rand(size, seed=size))
        k, kept = sparse_kept(size, chunk, ratio)
        index_bits = int(math.log2(chunk))
        want = 4 * math.ceil(size / chunk) + math.ceil(kept * bits / 8) + math.ceil(kept * index_bits / 8)
        assert enc.nbytes == want == codec.payload_nbytes(size), (size, chunk)
        assert enc.meta == {"chunk": chunk, "k": k, "bits": bits}
        assert np.count_nonzero(codec.decode(enc, size)) <= kept


def test_compression_against_float32_for_the_defaults() -> None:
    d = 1 << 20
    ratios = {name: 4 * d / get_codec(name).payload_nbytes(d) for name in ("int4", "int2", "sparseloco")}
    # int4: 4.25 bits/element at chunk 128; int2: 2.25; SparseLoCo 1 % of 4096, 2-bit values,
    # 12-bit indices, one float32 step: 41·14 bits + 32 bits = 75.75 bytes per 16 KiB chunk.
    assert ratios["int4"] == pytest.approx(32 / 4.25)
    assert ratios["int2"] == pytest.approx(32 / 2.25)
    assert ratios["sparseloco"] == pytest.approx(4 * 4096 / 75.75)


# -- dense round trips --------------------------------------------------------------------------------

vectors = hnp.arrays(
    np.float32,
    st.integers(0, 2000),
    elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
)


@pytest.mark.parametrize("name", ["int4", "int2"])
@given(vec=vectors, chunk=st.integers(1, 300))
@settings(max_examples=60, deadline=None)
def test_dense_round_trip_lands_on_a_level_within_half_a_step(name: str, vec: np.ndarray, chunk: int) -> None:
    codec = get_codec(name, chunk=chunk)
    enc = codec.encode(vec)
    out = codec.decode(Encoded(enc.payload, msgpack.unpackb(msgpack.packb(enc.meta))), vec.size)
    assert out.dtype == np.float32 and out.shape == vec.shape
    n_chunks = math.ceil(vec.size / chunk)
    steps = np.frombuffer(enc.payload, "<f4", count=n_chunks)
    padded = np.zeros(n_chunks * chunk, np.float32)
    padded[: vec.size] = vec
    absmax = np.abs(padded.reshape(n_chunks, chunk)).max(axis=1, initial=0.0)
    assert np.array_equal(steps, absmax / np.float32(DIVISOR[name]))
    u = np.repeat(steps, chunk)[: vec.size]
    # + a few subnormal ulps: below absmax ~ 2^-146, absmax/divisor underflows and the step is inexact.
    assert (np.abs(out - vec) <= MAX_ERROR[name] * u * (1 + 1e-6) + 16 * 2.0**-149).all()
    on_a_level = (out[:, None] == LEVELS[name][None, :] * u[:, None]).any(axis=1)
    assert on_a_level.all()
    assert np.array_equal(codec.residual(vec, enc), vec - out)


def test_int4_keeps_zeros_exact_and_int2_zero_chunks_exact() -> None:
    vec = np.zeros(300, np.float32)
    vec[[5, 77, 200]] = [1.0, -2.0, 0.5]
    int4 = get_codec("int4", chunk=64)
    assert np.array_equal(int4.decode(int4.encode(vec), 300)[vec == 0], np.zeros(297))
    zeros = np.zeros(257, np.float32)
    int2 = get_codec("int2")
    assert np.array_equal(int2.decode(int2.encode(zeros), 257), zeros)


def test_int2_levels_are_the_four_cell_centres() -> None:
    # absmax 4 -> u = 1: cells [-4,-2), [-2,0), [0,2), [2,4] reconstruct at -3, -1, 1, 3.
    vec = np.array([-4.0, -2.5, -2.0, -0.1, 0.0, 0.1, 1.9, 2.0, 3.0, 4.0], np.float32)
    out = get_codec("int2", chunk=16).decode(get_codec("int2", chunk=16).encode(vec), vec.size)
    assert out.tolist() == [-3, -3, -1, -1, 1, 1, 1, 3, 3, 3]


def test_per_chunk_steps_protect_small_chunks() -> None:
    vec = np.concatenate([np.full(128, 1000.0), rand(128, scale=1e-3)]).astype(np.float32)
    for name in ("int4", "int2"):
        c = get_codec(name)
        out = c.decode(c.encode(vec), vec.size)
        assert np.abs(out[128:] - vec[128:]).max() <= np.abs(vec[128:]).max() / DIVISOR[name] * MAX_ERROR[name] * 1.0001


def test_dense_layout_matches_the_documented_format() -> None:
    vec = np.array([3.0, 3 / 7, -1 / 7, 1 / 7], np.float32)  # chunk 2: absmax 3, then 1/7
    absmax = np.array([3.0, 1 / 7], np.float32)
    # int4: u = absmax/7, code = level + 8: levels 7, 1 | -7, 7 -> codes 15, 9 | 1, 15, two a byte, low nibble first.
    int4 = get_codec("int4", chunk=2).encode(vec)
    assert int4.payload == (absmax / np.float32(7)).astype("<f4").tobytes() + bytes([0x9F, 0xF1])
    # int2: u = absmax/4, cells of 2u: 3 -> +3u (code 3), 3/7 -> +u (2) | -1/7 -> -3u (0), 1/7 -> +3u (3).
    int2 = get_codec("int2", chunk=2).encode(vec)
    assert int2.payload == (absmax / np.float32(4)).astype("<f4").tobytes() + bytes([3 | 2 << 2 | 0 << 4 | 3 << 6])


# -- SparseLoCo -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,max_error", [(2, 0.25), (4, 1 / 14), (8, 1 / 254)])
def test_sparse_keeps_each_chunks_largest_and_leaves_the_rest_in_the_residual(bits: int, max_error: float) -> None:
    chunk, size = 256, 256 * 7 + 100
    codec = get_codec("sparseloco", ratio=0.03, chunk=chunk, bits=bits)
    vec = rand(size, seed=4) * np.repeat(np.geomspace(1e-3, 1e3, 8), chunk)[:size].astype(np.float32)
    enc = codec.encode(vec)
    out = codec.decode(enc, size)
    residual = codec.residual(vec, enc)
    assert np.array_equal(residual, vec - out)
    k = math.ceil(0.03 * chunk)
    for start in range(0, size, chunk):
        part = vec[start : start + chunk]
        sent = out[start : start + chunk] != 0
        want_k = k if part.size == chunk else math.ceil(k * part.size / chunk)
        kept = np.sort(np.argsort(-np.abs(part), kind="stable")[:want_k])
        assert np.flatnonzero(sent).tolist() == kept.tolist()
        unsent = ~sent
        assert np.array_equal(residual[start : start + chunk][unsent], part[unsent])  # whole, bit for bit
        absmax = np.abs(part[kept]).max()
        assert np.abs(out[start : start + chunk][kept] - part[kept]).max() <= max_error * absmax * (1 + 1e-6)


@given(
    vec=vectors,
    log_chunk=st.integers(1, 10),
    ratio=st.floats(0.001, 1.0),
    bits=st.sampled_from([2, 4, 8]),
)
@settings(max_examples=80, deadline=None)
def test_sparse_round_trip_property(vec: np.ndarray, log_chunk: int, ratio: float, bits: int) -> None:
    chunk = 1 << log_chunk
    codec = get_codec("sparseloco", ratio=ratio, chunk=chunk, bits=bits)
    enc = codec.encode(vec)
    out = codec.decode(Encoded(enc.payload, msgpack.unpackb(msgpack.packb(enc.meta))), vec.size)
    k, kept = sparse_kept(vec.size, chunk, ratio)
    assert enc.nbytes == codec.payload_nbytes(vec.size)
    residual = codec.residual(vec, enc)
    assert np.array_equal(residual, vec - out)
    half_step = {2: 0.25, 4: 1 / 14, 8: 1 / 254}[bits]
    for start in range(0, vec.size, chunk):
        part, got = vec[start : start + chunk], out[start : start + chunk]
        top = np.sort(np.abs(part))[::-1]
        want_k = k if part.size == chunk else math.ceil(k * part.size / chunk)
        sent = np.abs(got) > 0
        # Never more than the chunk's budget; unsent coordinates are no larger than the smallest kept one.
        assert np.count_nonzero(sent) <= want_k
        assert np.array_equal(residual[start : start + chunk][~sent], part[~sent])
        if want_k and top[0] > 0:  # a kept value errs by half a step; an unsent one by at most the k-th largest
            unsent_max = top[want_k] if want_k < part.size else 0.0
            tiny = 16 * 2.0**-149  # a step that underflows below absmax ~ 2^-146 is inexact
            assert np.abs(got - part).max() <= max(half_step * top[0] * (1 + 1e-6) + tiny, unsent_max)


# -- error feedback -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [
        get_codec("int4"),
        get_codec("int4", chunk=7),
        get_codec("sparseloco"),
        get_codec("sparseloco", ratio=0.03, chunk=512, bits=4),
    ],
    ids=["int4", "int4-chunk7", "sparseloco", "sparseloco-3pct-512-4bit"],
)
def test_error_feedback_identity_is_bit_exact(codec: Codec) -> None:
    """sent + residual == what was compressed, in float32, every step: x − q is exact (Sterbenz) because
    int4 picks q within [x/2, 2x] or 0, and the kept values of Gaussian chunks are all ≥ u/2."""
    ef = ErrorFeedback(codec)
    size, prev = 10_000, np.zeros(10_000, np.float32)
    sent_total, true_total = np.zeros(size), np.zeros(size)
    for step in range(20):
        g = rand(size, seed=step, scale=10.0 ** (step % 5 - 2))
        corrected = g + prev
        sent = codec.decode(ef.compress(g), size)
        residual = ef.residual
        assert residual is not None
        assert np.array_equal(sent + residual, corrected)
        prev = residual
        sent_total += sent
        true_total += g
    assert np.allclose(sent_total + prev, true_total, rtol=0, atol=1e-4)


def test_int2_error_feedback_identity_exact_except_below_half_the_smallest_level() -> None:
    """Mid-rise 2-bit has no zero: x with |x| < u/2 is sent as ±u and x − q needs more than 24 bits, so
    the residual rounds, by at most half an ulp of u (and fl(sent + residual) by half an ulp of x)."""
    codec = get_codec("int2", chunk=128)
    vec = rand(128 * 40 + 3, seed=7)
    enc = codec.encode(vec)
    sent, residual = codec.decode(enc, vec.size), codec.residual(vec, enc)
    u = np.repeat(np.frombuffer(enc.payload, "<f4", count=41), 128)[: vec.size]
    small = np.abs(vec) < u / 2
    assert np.array_equal((sent + residual)[~small], vec[~small])
    assert np.abs((sent + residual) - vec)[small].max() <= np.spacing(u[small]).max()


@functools.cache
def least_squares() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """½‖Ax − b‖² with A 1024×256 Gaussian (AᵀA's eigenvalues in ~[0.25, 2.3]): Hessian, AᵀA x*, x*, L."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1024, 256)) / np.sqrt(1024)
    x_star = rng.normal(size=256)
    hessian = a.T @ a
    return hessian, hessian @ x_star, x_star, float(np.linalg.eigvalsh(hessian).max())


def descend(codec_name: str, params: dict[str, object], lr_times_l: float, steps: int, feedback: bool) -> float:
    """Gradient descent on the least-squares problem with every gradient compressed: final ‖x − x*‖ / ‖x*‖."""
    hessian, linear, x_star, lipschitz = least_squares()
    codec = get_codec(codec_name, **params)
    ef = ErrorFeedback(codec)
    x = np.zeros(256)
    for _ in range(steps):
        g = (hessian @ x - linear).astype(np.float32)
        enc = ef.compress(g) if feedback else codec.encode(g)
        x -= lr_times_l / lipschitz * codec.decode(enc, 256).astype(np.float64)
    return float(np.linalg.norm(x - x_star) / np.linalg.norm(x_star))


def test_error_feedback_with_int2_converges_on_least_squares() -> None:
    assert descend("int2", {"chunk": 64}, 1.0, 200, feedback=True) < 1e-9


def test_error_feedback_with_sparseloco_converges_and_without_it_stalls() -> None:
    # 4 of each 128-chunk (3 %) with 2-bit values: 8 of 256 coordinates per step, ~1 % of the float32
    # bytes. Error feedback delays what it holds back, so its step must be smaller than plain GD's
    # (at 0.5/L it diverges here, as top-k with error feedback does).
    params = {"ratio": 0.03, "chunk": 128, "bits": 2}
    with_ef = descend("sparseloco", params, 0.25, 600, feedback=True)
    without = descend("sparseloco", params, 0.25, 600, feedback=False)
    assert with_ef < 1e-4
    assert without > 100 * with_ef


# -- hostile payloads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4", "int2"])
def test_dense_decode_rejects_malformed_payloads(name: str) -> None:
    codec = get_codec(name, chunk=4)
    enc = codec.encode(rand(11))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(Encoded(enc.payload[:-1], enc.meta), 11)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(Encoded(enc.payload + b"\0", enc.meta), 11)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(enc, 13)
    for meta in ({}, {"chunk": "4"}, {"chunk": True}, {"chunk": 0}, {"chunk": 1 << 25}):
        with pytest.raises(ValueError, match="chunk"):
            codec.decode(Encoded(enc.payload, meta), 11)
    for bad in (np.nan, np.inf, -1.0):
        steps = np.frombuffer(enc.payload, "<f4", count=3).copy()
        steps[1] = bad
        with pytest.raises(ValueError, match="scale"):
            codec.decode(Encoded(steps.tobytes() + enc.payload[12:], enc.meta), 11)
    padded = bytearray(enc.payload)
    padded[-1] |= 0x80  # 11 codes of 4 or 2 bits leave the top bits of the last byte unused
    with pytest.raises(ValueError, match="padding"):
        codec.decode(Encoded(bytes(padded), enc.meta), 11)
    with pytest.raises(ValueError, match="overflow|NaN"):
        huge = np.array([3e38, 3e38], "<f4").tobytes() + pack_le([0 if name == "int2" else 1] * 8, BITS[name])
        codec.decode(Encoded(huge, {"chunk": 4}), 8)


def test_int4_code_zero_is_refused() -> None:
    payload = np.array([1.0], "<f4").tobytes() + pack_le([8, 0, 8, 8], 4)  # code 0 would be level -8
    with pytest.raises(ValueError, match="code 0"):
        get_codec("int4").decode(Encoded(payload, {"chunk": 4}), 4)
    ok = np.array([1.0], "<f4").tobytes() + pack_le([8, 1, 15, 9], 4)
    assert get_codec("int4").decode(Encoded(ok, {"chunk": 4}), 4).tolist() == [0.0, -7.0, 7.0, 1.0]


def test_sparse_decodes_a_hand_built_payload() -> None:
    # size 12, chunk 8, k 2: one full chunk (indices 1, 6) + a tail of 4 keeping ⌈2·4/8⌉ = 1 (index 3).
    payload = sparse_payload([1.0, 0.5], [3, 0, 1], [1, 6, 3], bits=2, chunk=8)
    out = get_codec("sparseloco").decode(Encoded(payload, {"chunk": 8, "k": 2, "bits": 2}), 12)
    assert out.tolist() == [0, 3, 0, 0, 0, 0, -3, 0, 0, 0, 0, -0.5]


@pytest.mark.parametrize(
    "meta,size,match",
    [
        ({"chunk": 8, "k": 2}, 12, "bits"),
        ({"chunk": 8, "k": 2, "bits": 3}, 12, "bits"),
        ({"chunk": 6, "k": 2, "bits": 2}, 12, "power of two"),
        ({"chunk": 1 << 17, "k": 2, "bits": 2}, 12, "power of two"),
        ({"chunk": 8, "k": 9, "bits": 2}, 12, "k=9"),
        ({"chunk": 8, "k": -1, "bits": 2}, 12, "k=-1"),
        ({"chunk": 8, "k": 2.0, "bits": 2}, 12, "integer 'k'"),
        ({"chunk": 8, "k": 3, "bits": 2}, 12, "bytes"),
        ({"chunk": 8, "k": 2, "bits": 2}, 18, "bytes"),
        ({"chunk": 8, "k": 2, "bits": 2}, 20, "bytes"),
        # A tail of 5 keeps 2, not 1: the same byte count, but the 4th index reads zero padding.
        ({"chunk": 8, "k": 2, "bits": 2}, 13, "increasing"),
    ],
)
def test_sparse_decode_rejects_bad_meta_or_size(meta: dict[str, object], size: int, match: str) -> None:
    payload = sparse_payload([1.0, 0.5], [3, 0, 1], [1, 6, 3], bits=2, chunk=8)
    with pytest.raises(ValueError, match=match):
        get_codec("sparseloco").decode(Encoded(payload, meta), size)


@pytest.mark.parametrize(
    "scales,codes,local,match",
    [
        ([1.0, 0.5], [3, 0, 1], [6, 1, 3], "increasing"),  # unsorted within the chunk
        ([1.0, 0.5], [3, 0, 1], [4, 4, 3], "increasing"),  # a duplicate
        ([1.0, 0.5], [3, 0, 1], [1, 6, 5], "out of range"),  # the tail has 4 elements
        ([np.nan, 0.5], [3, 0, 1], [1, 6, 3], "scale"),
        ([1.0, -0.5], [3, 0, 1], [1, 6, 3], "scale"),
        ([1.0, np.inf], [3, 0, 1], [1, 6, 3], "scale"),
    ],
)
def test_sparse_decode_rejects_bad_indices_and_scales(
    scales: list[float], codes: list[int], local: list[int], match: str
) -> None:
    payload = sparse_payload(scales, codes, local, bits=2, chunk=8)
    with pytest.raises(ValueError, match=match):
        get_codec("sparseloco").decode(Encoded(payload, {"chunk": 8, "k": 2, "bits": 2}), 12)


def test_sparse_decode_rejects_set_padding_and_int4_code_zero() -> None:
    meta = {"chunk": 8, "k": 2, "bits": 2}
    payload = bytearray(sparse_payload([1.0, 0.5], [3, 0, 1], [1, 6, 3], bits=2, chunk=8))
    payload[8] |= 0x80  # 3 codes of 2 bits use 6 bits of the code byte
    with pytest.raises(ValueError, match="padding"):
        get_codec("sparseloco").decode(Encoded(bytes(payload), meta), 12)
    payload = bytearray(sparse_payload([1.0, 0.5], [3, 0, 1], [1, 6, 3], bits=2, chunk=8))
    payload[-1] |= 0x80  # 3 indices of 3 bits use 9 bits: the second byte's top 7 are padding
    with pytest.raises(ValueError, match="padding"):
        get_codec("sparseloco").decode(Encoded(bytes(payload), meta), 12)
    four = sparse_payload([1.0, 0.5], [9, 0, 9], [1, 6, 3], bits=4, chunk=8)
    with pytest.raises(ValueError, match="code 0"):
        get_codec("sparseloco").decode(Encoded(four, {"chunk": 8, "k": 2, "bits": 4}), 12)


# -- configuration -------------------------------------------------------------------------------------


def test_codec_config_builds_each_new_codec_with_its_own_fields() -> None:
    int4 = CodecConfig(name="int4", lowbit_chunk=64)
    assert int4.codec_params() == {"chunk": 64} and int4.build().encode(rand(100)).meta == {"chunk": 64}
    sparse = CodecConfig(name="sparseloco", ratio=0.02, sparse_chunk=1024, sparse_bits=4)
    assert sparse.codec_params() == {"chunk": 1024, "bits": 4}
    assert sparse.build().encode(rand(5000)).meta == {"chunk": 1024, "k": 21, "bits": 4}
    assert CodecConfig(name="int8", int8_chunk=256).codec_params() == {"chunk": 256}  # unchanged
    assert CodecConfig(name="topk").codec_params() == {"index": "delta"}
    assert CodecConfig().codec_params() == {}


def test_error_feedback_defaults_on_for_the_coarse_codecs_only() -> None:
    names = ("none", "fp16", "int8", "int4", "int2", "topk", "sparseloco")
    on = {n for n in names if CodecConfig(name=n).uses_error_feedback}  # type: ignore[arg-type]
    assert on == {"int4", "int2", "topk", "sparseloco"}
    assert not CodecConfig(name="int2", error_feedback=False).uses_error_feedback


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"name": "sparseloco", "sparse_chunk": 1000}, "power of two"),
        ({"name": "sparseloco", "sparse_chunk": 1}, "power of two"),
        ({"name": "sparseloco", "sparse_chunk": 1 << 17}, "power of two"),
        ({"name": "sparseloco", "sparse_bits": 3}, "sparse_bits"),
        ({"name": "sparseloco", "ratio": 0.0}, "ratio"),
        ({"name": "sparseloco", "ratio": 1.5}, "ratio"),
        ({"name": "int2", "lowbit_chunk": 0}, "lowbit_chunk"),
        ({"name": "int3"}, "name"),
    ],
)
def test_codec_config_refuses_bad_fields(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CodecConfig.model_validate(fields)


def test_get_codec_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="power of two"):
        get_codec("sparseloco", chunk=100)
    with pytest.raises(ValueError, match="bits"):
        get_codec("sparseloco", bits=3)
    with pytest.raises(ValueError, match="bits"):
        get_codec("sparseloco", bits=2.0)
    with pytest.raises(ValueError, match="ratio"):
        get_codec("sparseloco", ratio=0)
    with pytest.raises(ValueError, match="chunk"):
        get_codec("int4", chunk=0)
    assert get_codec("int2", ratio=0.5, index="int32").name == "int2"  # other codecs' params: ignored


def test_simulator_counts_the_exact_payload_of_the_new_codecs() -> None:
    assert PayloadModel(codec="sparseloco", codec_params={"chunk": 1024, "bits": 2}).codec == "sparseloco"
    with pytest.raises(ValidationError, match="power of two"):
        PayloadModel(codec="sparseloco", codec_params={"chunk": 1000})
    params = 10_000_000  # past the simulator's 4 M sample: the exact formula, not a scaled sample
    for name, extra in (("int2", {"chunk": 128}), ("sparseloco", {"chunk": 4096, "bits": 2})):
        exact = get_codec(name, ratio=0.01, **extra).payload_nbytes(params)
        assert exact is not None
        assert exact <= codec_payload_bytes(name, 0.01, params, extra=extra) <= exact + 64  # + meta


@pytest.mark.parametrize("name,params", [("int4", {}), ("int2", {}), ("sparseloco", {"bits": 8, "chunk": 2})])
def test_magnitudes_at_float32_max_still_decode(name: str, params: dict[str, object]) -> None:
    big = float(np.finfo(np.float32).max)
    vec = np.array([big, -big, 1.0, big / 3], np.float32)
    codec = get_codec(name, **params)
    enc = codec.encode(vec)
    out = codec.decode(enc, vec.size)  # no level rounds past float32's max to inf
    assert np.array_equal(codec.residual(vec, enc), vec - out)


def test_sparse_selection_with_ties_keeps_exactly_k_of_the_largest() -> None:
    chunk = 64
    vec = np.concatenate(
        [
            np.zeros(chunk),  # all tied at zero
            np.round(rand(chunk, seed=1), 0),  # a handful of distinct magnitudes
            np.full(chunk, -2.5),  # all tied, nonzero
            rand(chunk, seed=2),
        ]
    ).astype(np.float32)
    codec = get_codec("sparseloco", ratio=0.1, chunk=chunk, bits=8)
    enc = codec.encode(vec)
    step = np.frombuffer(enc.payload, "<f4", count=4)
    local = np.frombuffer(enc.payload, np.uint8, offset=16 + 28)  # 4 × 7 codes of 8 bits, then 6-bit indices
    bits = np.unpackbits(local, bitorder="little")[: 28 * 6].reshape(28, 6)
    index = (bits.astype(np.int64) << np.arange(6)).sum(axis=1).reshape(4, 7)
    assert (np.diff(index, axis=1) > 0).all()
    for row in range(4):
        mag = np.abs(vec[row * chunk : (row + 1) * chunk])
        assert mag[index[row]].min() >= np.delete(mag, index[row]).max()
    assert step[0] == 0 and np.array_equal(codec.decode(enc, vec.size)[:chunk], np.zeros(chunk))
    assert np.array_equal(codec.residual(vec, enc), vec - codec.decode(enc, vec.size))
