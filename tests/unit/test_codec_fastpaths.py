"""The codecs' numpy fast paths: fp16 by integer/float32 passes, int8 by blocks, top-k without a sort, the
decoders reading received buffers in place, per-thread scratch buffers, error feedback rewriting its residual.

Each fast path is held to what it replaced: numpy's own float16 cast bit for bit, the int8 formula, the k
largest magnitudes; and to the codecs' contract (bad input is a ValueError that changes no state).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from dist_llm_train.core import codecs
from dist_llm_train.core.codecs import Encoded, ErrorFeedback, get_codec, top_k_indices

pytestmark = pytest.mark.usefixtures("codec_path")  # every test with the native kernels and with numpy

ALL_HALVES = np.arange(1 << 16, dtype=np.uint16)
FINITE_HALVES = ALL_HALVES[np.isfinite(ALL_HALVES.view(np.float16))]


def _hard_float32s() -> np.ndarray:
    """Every finite half as float32, its float32 neighbours, every midpoint between adjacent halves and its
    neighbours (where round-to-nearest-even decides), plus a stride through all float32 bit patterns."""
    halves = np.unique(FINITE_HALVES.view(np.float16).astype(np.float64))
    mids = (halves[1:] + halves[:-1]) / 2
    points = np.concatenate([halves, mids]).astype(np.float32)
    near = [points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(-np.inf))]
    strided = np.arange(0, 1 << 32, 1021, dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = np.concatenate([*near, strided, np.float32([0.0, -0.0, 1e-45, -1e-45, 2**-25, 3 * 2**-26])])
    return out[np.isfinite(out) & (np.abs(out) <= 65504)]


def test_fp16_encode_is_numpy_s_cast_bit_for_bit() -> None:
    vec = _hard_float32s()
    enc = get_codec("fp16").encode(vec)
    assert enc.payload == vec.astype(np.float16).tobytes()
    assert enc.meta == {"saturated": 0}


def test_fp16_encode_saturates_like_a_clip_then_cast() -> None:
    vec = np.float32([65504.0, 65519.0, 65520.0, 1e30, -7e4, 3.0])
    enc = get_codec("fp16").encode(vec)
    assert enc.payload == np.clip(vec, -65504, 65504).astype(np.float16).tobytes()
    assert enc.meta == {"saturated": 4}


def test_fp16_decode_is_exact_for_every_finite_half() -> None:
    out = get_codec("fp16").decode(Encoded(FINITE_HALVES.tobytes()), FINITE_HALVES.size)
    expect = FINITE_HALVES.view(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), expect.view(np.uint32))  # -0.0 and subnormals included


def test_fp16_decode_refuses_every_infinity_and_nan_code() -> None:
    codec = get_codec("fp16")
    for bad in ALL_HALVES[~np.isfinite(ALL_HALVES.view(np.float16))][::7]:
        with pytest.raises(ValueError, match="NaN or Inf"):
            codec.decode(Encoded(np.uint16([0x3C00, bad, 0]).tobytes()), 3)


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_blocked_passes_match_a_single_block(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Vectors longer than a block run in several (a small block here): the same bytes and values as in one."""
    vec = np.random.default_rng(3).normal(0, 1, 5003).astype(np.float32)
    codec = get_codec(name, chunk=7) if name == "int8" else get_codec(name)
    whole = codec.encode(vec)
    monkeypatch.setattr(codecs, "_BLOCK", 1000)
    blocked = codec.encode(vec)
    assert blocked.payload == whole.payload
    assert np.array_equal(codec.decode(blocked, vec.size), codec.decode(whole, vec.size))


@pytest.mark.parametrize("size,chunk", [(1000, 1024), (4096, 1024), (5003, 7), (1, 1)])
def test_int8_is_the_absmax_formula(size: int, chunk: int) -> None:
    vec = np.random.default_rng(size).normal(0, 1, size).astype(np.float32)
    enc = get_codec("int8", chunk=chunk).encode(vec)
    n_chunks = -(-size // chunk)
    padded = np.zeros(n_chunks * chunk, np.float32)
    padded[:size] = vec
    rows = padded.reshape(n_chunks, chunk)
    scales = (np.abs(rows).max(axis=1) / np.float32(127)).astype(np.float32)
    codes = np.rint(rows * (np.float32(1) / scales)[:, None]).astype(np.int8).ravel()[:size]
    assert enc.payload == scales.tobytes() + codes.tobytes()


def test_int8_chunks_of_tiny_values_get_codes_in_range_without_warnings() -> None:
    """A chunk whose scale is a float32 subnormal (absmax below ~1.5e-36) has no 1/scale bound: divided and
    clipped on its own, never a NaN cast to int8."""
    vec = np.float32([1e-40, -3e-39, 0.0, 2e-39, 1.0, -0.5, 1e-38, 0.0])
    codec = get_codec("int8", chunk=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc = codec.encode(vec)
        out = codec.decode(enc, vec.size)
    codes = np.frombuffer(enc.payload, np.int8, offset=4 * 4)
    assert codes.min() >= -127 and codes.max() <= 127
    assert np.abs(out - vec).max() <= np.abs(vec).max() / 254 * 1.0001


def test_int8_refuses_a_scale_too_large_for_its_codes() -> None:
    codec = get_codec("int8", chunk=2)
    ok = np.float32([np.finfo(np.float32).max / 128]).tobytes() + np.int8([-128, 127]).tobytes()
    assert np.isfinite(codec.decode(Encoded(ok, {"chunk": 2}), 2)).all()
    bad = np.float32([np.finfo(np.float32).max / 100]).tobytes() + np.int8([127, 1]).tobytes()
    with pytest.raises(ValueError, match="NaN or Inf"):
        codec.decode(Encoded(bad, {"chunk": 2}), 2)


@pytest.mark.parametrize("name,params", [("none", {}), ("fp16", {}), ("int8", {"chunk": 64}), ("int4", {}),
                                         ("int2", {}), ("topk", {"ratio": 0.05, "index": "delta"}),
                                         ("topk", {"ratio": 0.05, "index": "int32"}), ("sparseloco", {})])
def test_decode_payload_reads_a_received_buffer_in_place(name: str, params: dict[str, object]) -> None:
    """What a transport hands over (a memoryview, possibly of another item format) decodes like the bytes."""
    vec = np.random.default_rng(1).normal(0, 1, 8192).astype(np.float32)
    codec = get_codec(name, **params)
    enc = codec.encode(vec)
    expect = codec.decode(enc, vec.size)
    frame = bytearray(b"xx" + enc.payload)  # a receive buffer with the payload at an offset
    for view in (memoryview(frame)[2:], memoryview(bytes(enc.payload)).cast("B", (len(enc.payload),))):
        assert np.array_equal(codec.decode_payload(view, enc.meta, vec.size), expect)
    if len(enc.payload) % 4 == 0:
        assert np.array_equal(codec.decode_payload(memoryview(enc.payload).cast("f"), enc.meta, vec.size), expect)
    with pytest.raises(ValueError, match="payload must be bytes"):
        codec.decode_payload(list(enc.payload), enc.meta, vec.size)  # type: ignore[arg-type]


def test_top_k_keeps_the_first_ties_at_the_threshold() -> None:
    vec = np.float32([1, 5, 3, 5, 3, 3, 0, 3])
    assert top_k_indices(vec, 3).tolist() == [1, 2, 3]  # 5, 5 and the first of the 3s
    big = np.zeros(10_000, np.float32)
    big[::3] = 2.0
    idx = top_k_indices(big, 100)
    assert idx.tolist() == list(range(0, 300, 3))


@pytest.mark.parametrize("name,params", [("topk", {"ratio": 0.1}), ("int2", {}), ("int8", {}),
                                         ("sparseloco", {"chunk": 64})])
def test_error_feedback_bad_input_leaves_the_residual_as_it_was(name: str, params: dict[str, object]) -> None:
    feedback = ErrorFeedback(get_codec(name, **params), decay=0.9)
    rng = np.random.default_rng(2)
    feedback.compress(rng.normal(0, 1, 640).astype(np.float32))
    before = feedback.residual
    assert before is not None
    bad = rng.normal(0, 1, 640).astype(np.float32)
    bad[17] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        feedback.compress(bad)
    assert np.array_equal(feedback.residual, before)
    handed_out = feedback.residual
    assert handed_out is not None
    handed_out[:] = 7.0  # a copy: the feedback's own memory is not reachable from outside
    assert np.array_equal(feedback.residual, before)


@pytest.mark.parametrize("name,params", [("topk", {"ratio": 0.01}), ("int2", {}), ("sparseloco", {})])
def test_error_feedback_residual_is_corrected_input_minus_sent_every_step(name: str, params: dict[str, object]) -> None:
    codec = get_codec(name, **params)
    feedback = ErrorFeedback(codec)
    rng = np.random.default_rng(4)
    carried = np.zeros(20_000, np.float32)
    for _ in range(4):
        vec = rng.normal(0, 1, carried.size).astype(np.float32)
        corrected = vec + carried
        sent = codec.decode(feedback.compress(vec), vec.size)
        residual = feedback.residual
        assert residual is not None
        assert np.array_equal(residual, corrected - sent)  # what was dropped, in float32, written in place
        if name == "topk":  # kept values travel exactly: the identity holds without rounding
            assert np.array_equal(sent + residual, corrected)
        carried = residual


def test_scratch_buffers_are_per_thread() -> None:
    """The PS decodes on several threads at once: every thread gets what it would have got alone."""
    rng = np.random.default_rng(5)
    vecs = [rng.normal(0, 10.0**i, 300_001).astype(np.float32) for i in range(4)]
    fp16, int8 = get_codec("fp16"), get_codec("int8")
    expect = [(fp16.encode(v).payload, int8.encode(v).payload) for v in vecs]
    got: dict[int, list[tuple[bytes, bytes]]] = {}

    def work(i: int) -> None:
        got[i] = [(fp16.encode(vecs[i]).payload, int8.encode(vecs[i]).payload) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(vecs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in got.items():
        assert all(run == expect[i] for run in runs)


def test_top_k_candidates_found_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Magnitudes are taken a block at a time (a small block here): the same k largest, in index order."""
    vec = np.random.default_rng(6).standard_cauchy(50_000).astype(np.float32)
    monkeypatch.setattr(codecs, "_BLOCK", 4096)
    idx = top_k_indices(vec, 400)
    expect = np.sort(np.argsort(-np.abs(vec), kind="stable")[:400])
    assert idx.tolist() == expect.tolist()
