"""Update codecs and error feedback (dist_llm_train.core.codecs)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dist_llm_train.core.codecs import CODECS, Encoded, ErrorFeedback, get_codec

pytestmark = pytest.mark.usefixtures("codec_path")  # every test with the native kernels and with numpy

vectors = hnp.arrays(
    np.float32,
    st.integers(1, 3000),
    elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
)


def rand(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_meta_is_msgpack_plain_and_decode_size_matches(name: str) -> None:
    codec = get_codec(name, ratio=0.1)
    enc = codec.encode(rand(2500))
    assert msgpack.unpackb(msgpack.packb(enc.meta)) == enc.meta
    out = codec.decode(Encoded(enc.payload, msgpack.unpackb(msgpack.packb(enc.meta))), 2500)
    assert out.dtype == np.float32 and out.shape == (2500,)


@given(vectors)
@settings(max_examples=60, deadline=None)
def test_none_is_exact(vec: np.ndarray) -> None:
    c = get_codec("none")
    enc = c.encode(vec)
    assert enc.nbytes == 4 * vec.size
    assert np.array_equal(c.decode(enc, vec.size), vec)


@given(vectors)
@settings(max_examples=60, deadline=None)
def test_fp16_relative_error_bound(vec: np.ndarray) -> None:
    c = get_codec("fp16")
    enc = c.encode(vec)
    assert enc.nbytes == 2 * vec.size and enc.meta == {"saturated": 0}
    out = c.decode(enc, vec.size)
    # half precision: 11 significant bits (rel. 2^-11), subnormal spacing 2^-24 near zero
    assert (np.abs(out - vec) <= np.abs(vec) * 2.0**-11 + 2.0**-24).all()


def test_fp16_saturates_and_counts() -> None:
    c = get_codec("fp16")
    enc = c.encode(np.array([1e6, -1e6, 1.0], dtype=np.float32))
    assert enc.meta["saturated"] == 2
    assert c.decode(enc, 3).tolist() == [65504.0, -65504.0, 1.0]


@given(vectors)
@settings(max_examples=60, deadline=None)
def test_int8_error_within_half_step_of_chunk_absmax(vec: np.ndarray) -> None:
    c = get_codec("int8")
    enc = c.encode(vec)
    n_chunks = math.ceil(vec.size / 1024)
    assert enc.nbytes == vec.size + 4 * n_chunks
    out = c.decode(enc, vec.size)
    for i in range(n_chunks):
        sl = slice(i * 1024, (i + 1) * 1024)
        bound = np.abs(vec[sl]).max() / 254 * (1 + 1e-5) + 1e-30
        assert np.abs(out[sl] - vec[sl]).max() <= bound


def test_int8_per_chunk_scale_protects_small_chunks() -> None:
    vec = np.concatenate([np.full(1024, 1000.0), rand(1024, scale=1e-3)]).astype(np.float32)
    out = get_codec("int8").decode(get_codec("int8").encode(vec), vec.size)
    assert np.abs(out[1024:] - vec[1024:]).max() < 1e-3 / 50  # a global scale would zero these


@pytest.mark.parametrize("ratio,size", [(0.01, 10_000), (0.1, 999), (1.0, 17), (1e-6, 50)])
def test_topk_keeps_largest_and_counts_index_bytes(ratio: float, size: int) -> None:
    vec = rand(size, seed=3)
    c = get_codec("topk", ratio=ratio)
    enc = c.encode(vec)
    k = max(1, math.ceil(ratio * size))
    assert enc.meta == {"k": k}
    assert enc.nbytes == 8 * k  # int32 index + float32 value per kept coordinate
    out = c.decode(enc, size)
    kept = np.flatnonzero(out)
    assert len(kept) == k
    assert np.array_equal(out[kept], vec[kept])
    assert np.abs(vec[kept]).min() >= np.abs(np.delete(vec, kept)).max(initial=0.0)


def test_get_codec_params_policy() -> None:
    assert get_codec("none", ratio=0.5).name == "none"  # another codec's param: ignored
    assert get_codec("int8", chunk=16).encode(rand(40)).meta == {"chunk": 16}
    with pytest.raises(ValueError, match="unknown codec parameters"):
        get_codec("topk", ratoi=0.1)
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("zstd")
    for bad in (0.0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError, match="ratio"):
            get_codec("topk", ratio=bad)
    with pytest.raises(ValueError, match="chunk"):
        get_codec("int8", chunk=0)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_rejects_nan_and_bad_shapes(name: str) -> None:
    c = get_codec(name)
    with pytest.raises(ValueError, match="NaN"):
        c.encode(np.array([1.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        c.encode(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="floating"):
        c.encode(np.arange(4))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_rejects_size_mismatch(name: str) -> None:
    c = get_codec(name, ratio=0.5)
    enc = c.encode(rand(100))
    with pytest.raises(ValueError):
        c.decode(enc, 101 if name != "topk" else 10)
    with pytest.raises(ValueError):
        c.decode(Encoded(enc.payload[:-1], enc.meta), 100)


def test_decode_rejects_nan_payloads_and_bad_meta() -> None:
    nan32 = np.array([1.0, np.nan], dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="NaN"):
        get_codec("none").decode(Encoded(nan32), 2)
    with pytest.raises(ValueError, match="NaN"):
        get_codec("fp16").decode(Encoded(np.array([np.inf, 0], dtype="<f2").tobytes()), 2)
    bad_scale = np.array([np.nan], dtype="<f4").tobytes() + bytes(4)
    with pytest.raises(ValueError, match="scale"):
        get_codec("int8").decode(Encoded(bad_scale, {"chunk": 1024}), 4)
    with pytest.raises(ValueError, match="chunk"):
        get_codec("int8").decode(Encoded(bytes(8), {}), 4)
    with pytest.raises(ValueError, match="k"):
        get_codec("topk").decode(Encoded(bytes(8), {"k": "1"}), 4)
    topk = get_codec("topk")
    out_of_range = np.array([7], dtype="<i4").tobytes() + np.array([1.0], dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="out of range"):
        topk.decode(Encoded(out_of_range, {"k": 1}), 4)
    dupes = np.array([1, 1], dtype="<i4").tobytes() + np.array([1.0, 2.0], dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="increasing"):
        topk.decode(Encoded(dupes, {"k": 2}), 4)
    nan_value = np.array([0], dtype="<i4").tobytes() + np.array([np.nan], dtype="<f4").tobytes()
    with pytest.raises(ValueError, match="NaN"):
        topk.decode(Encoded(nan_value, {"k": 1}), 4)


def test_error_feedback_residual_is_exactly_what_was_not_sent() -> None:
    codec = get_codec("topk", ratio=0.05)
    ef = ErrorFeedback(codec)
    sent_total = np.zeros(400, dtype=np.float64)
    true_total = np.zeros(400, dtype=np.float64)
    prev_residual = np.zeros(400, dtype=np.float32)
    for step in range(50):
        g = rand(400, seed=step)
        enc = ef.compress(g)
        sent = codec.decode(enc, 400)
        residual = ef.residual
        assert residual is not None
        # residual_t = (g_t + residual_{t-1}) - sent_t, elementwise
        assert np.allclose(residual, g + prev_residual - sent, atol=1e-6)
        prev_residual = residual
        sent_total += sent
        true_total += g
    # Telescoping: everything not yet sent is in the residual.
    assert np.allclose(sent_total + prev_residual, true_total, atol=1e-3)


def test_error_feedback_beats_plain_topk_on_accumulated_update() -> None:
    codec = get_codec("topk", ratio=0.02)
    ef = ErrorFeedback(codec)
    g = rand(1000, seed=9) + 0.05  # a consistent direction hidden under noise
    steps = 200
    with_ef = sum(codec.decode(ef.compress(g), 1000).astype(np.float64) for _ in range(steps))
    without = steps * codec.decode(codec.encode(g), 1000).astype(np.float64)
    target = steps * g.astype(np.float64)
    assert np.linalg.norm(with_ef - target) < 0.2 * np.linalg.norm(without - target)


def test_error_feedback_rejects_size_change_without_state_change() -> None:
    ef = ErrorFeedback(get_codec("topk", ratio=0.1))
    ef.compress(rand(50))
    before = ef.residual
    with pytest.raises(ValueError, match="residual"):
        ef.compress(rand(60))
    with pytest.raises(ValueError, match="NaN"):
        ef.compress(np.full(50, np.nan, dtype=np.float32))
    after = ef.residual
    assert before is not None and after is not None and np.array_equal(before, after)
    ef.reset()
    assert ef.residual is None
