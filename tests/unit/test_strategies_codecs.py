"""Codec extensions for the strategies: delta-coded top-k indices, the fast exact top-k, the fast residual."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.core.codecs import Codec, Encoded, ErrorFeedback, get_codec, top_k_indices


@given(seed=st.integers(0, 2**31), n=st.integers(1, 30_000), ratio=st.floats(1e-4, 1.0), ties=st.booleans())
@settings(max_examples=60, deadline=None)
def test_fast_top_k_selects_exactly_the_k_largest(seed: int, n: int, ratio: float, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=n).astype(np.float32)
    if ties:
        vec = np.round(vec, 1)  # many equal magnitudes
    k = min(n, max(1, int(np.ceil(ratio * n))))
    idx = top_k_indices(vec, k)
    assert idx.size == k and np.all(np.diff(idx) > 0)
    kept = np.abs(vec[idx])
    assert kept.min() >= np.abs(np.delete(vec, idx)).max(initial=0.0)
    assert np.sort(kept).tolist() == np.sort(np.abs(vec))[n - k :].tolist()  # same magnitudes as a full sort


@pytest.mark.parametrize("size,gap_bytes", [(50_000, 2), (300_000, 4)])
def test_delta_indices_are_6_bytes_per_value_when_gaps_fit(size: int, gap_bytes: int) -> None:
    vec = np.zeros(size, np.float32)
    vec[[3, 70_000 % size, size - 1]] = [5.0, -6.0, 7.0]  # a gap of ~230k needs 4 bytes
    enc = get_codec("topk", ratio=2.5 / size, index="delta").encode(vec)
    assert enc.meta == {"k": 3, "gap_bytes": gap_bytes}
    assert enc.nbytes == (enc.meta["gap_bytes"] + 4) * 3
    assert np.array_equal(get_codec("topk").decode(enc, size), vec)  # any topk decoder reads either coding


def test_delta_payloads_are_validated() -> None:
    topk = get_codec("topk")
    gaps = np.array([1, 0], "<u2").tobytes() + np.array([1.0, 2.0], "<f4").tobytes()
    with pytest.raises(ValueError, match="increasing"):
        topk.decode(Encoded(gaps, {"k": 2, "gap_bytes": 2}), 8)
    far = np.array([9], "<u2").tobytes() + np.array([1.0], "<f4").tobytes()
    with pytest.raises(ValueError, match="out of range"):
        topk.decode(Encoded(far, {"k": 1, "gap_bytes": 2}), 8)
    with pytest.raises(ValueError, match="gap_bytes"):
        topk.decode(Encoded(far, {"k": 1, "gap_bytes": 3}), 8)


@pytest.mark.parametrize("codec", [get_codec("topk", ratio=0.05, index="delta"), get_codec("int8", chunk=64)])
def test_fast_residual_equals_sent_minus_decoded(codec: Codec) -> None:
    vec = np.random.default_rng(1).normal(size=5000).astype(np.float32)
    enc = codec.encode(vec)
    assert np.array_equal(codec.residual(vec, enc), vec - codec.decode(enc, vec.size))
    ef = ErrorFeedback(codec)
    ef.compress(vec)
    assert ef.residual is not None and np.array_equal(ef.residual, vec - codec.decode(enc, vec.size))
