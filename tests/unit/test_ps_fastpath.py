"""The PS ingest fast paths give exactly what the plain code gives.

Finite check by one dot product, block-wise optimizer steps, and the hand-rolled unary
`PushRequest` encoding are all there for speed only; these tests pin them to the slow,
obvious version of the same thing.
"""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.core.types import ErrorCode, PSError, PushHeader
from dist_llm_train.paramserver.numerics import all_finite, decode_update, keep_freed_vectors
from dist_llm_train.paramserver.optim import BLOCK, SGD, Adam
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.proto import paramserver_pb2 as pb

N = 2 * BLOCK + 7  # spans a partial last block


# -- finite check ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, BLOCK - 1, BLOCK, N - 1])
def test_any_nan_or_inf_is_found(bad: float, where: int) -> None:
    vec = np.ones(N, np.float32)
    vec[where] = bad
    assert not all_finite(vec)


def test_finite_values_whose_squares_overflow_are_still_finite() -> None:
    vec = np.full(N, 3e38, np.float32)  # the dot product overflows: the exact check decides
    with np.errstate(all="raise"):  # and the expected overflow is not reported as an error
        assert all_finite(vec)
    vec[5] = np.nan
    assert not all_finite(vec)


def test_other_dtypes_shapes_and_empty() -> None:
    assert all_finite(np.zeros(0, np.float32))
    assert all_finite(np.ones((3, 4), np.float64))
    assert not all_finite(np.array([1.0, np.nan]))
    strided = np.ones(20, np.float32)[::2]
    assert all_finite(strided)
    strided[3] = np.inf
    assert not all_finite(strided)


def test_decode_rejects_nan_without_copying_good_payloads() -> None:
    good = np.arange(N, dtype="<f4").tobytes()
    vec = decode_update("none", b"", good, N)
    assert vec.base is not None and not vec.flags.writeable  # a view of the received bytes
    odd = memoryview(b"\0" + good)[1:]  # misaligned: copied once, then fast and still correct
    vec = decode_update("none", b"", odd, N)
    assert vec.flags.aligned and vec.flags.writeable  # its own copy: the received bytes are read-only
    np.testing.assert_array_equal(vec, np.arange(N, dtype=np.float32))
    bad = bytearray(good)
    bad[-4:] = np.array([np.nan], "<f4").tobytes()
    with pytest.raises(PSError) as err:
        decode_update("none", b"", bytes(bad), N)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT and "NaN" in err.value.message


def test_allocator_policy_is_set_on_glibc_and_idempotent() -> None:
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_vectors() is on_glibc
    assert keep_freed_vectors() is on_glibc


# -- block-wise optimizers ---------------------------------------------------------------------
def _vectors(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(N).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_blocked_sgd_equals_whole_vector_formula(momentum: float, nesterov: bool) -> None:
    p0, *grads = _vectors(0, 4)
    lr = np.float32(0.01)
    mom = np.float32(momentum)
    opt = SGD(N, float(lr), momentum, nesterov)
    p, ref, buf = p0, p0.copy(), None
    for g in grads:
        if momentum:
            buf = g.copy() if buf is None else buf * mom + g
            direction = g + mom * buf if nesterov else buf
        else:
            direction = g
        ref = direction * -lr + ref
        p = opt.step(p, g)
        np.testing.assert_array_equal(p, ref)  # same operations in the same order: bit-equal


def test_blocked_adam_equals_whole_vector_formula() -> None:
    p0, *grads = _vectors(1, 4)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = Adam(N, lr, b1, b2, eps)
    p, ref = p0, p0.astype(np.float64)
    m, v = np.zeros(N), np.zeros(N)
    for t, g in enumerate(grads, start=1):
        g64 = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g64
        v = b2 * v + (1 - b2) * g64 * g64
        ref = ref - lr / (1 - b1**t) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        p = opt.step(p, g)
        np.testing.assert_allclose(p, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("opt", [SGD(N, 0.1), SGD(N, 0.1, 0.9, True), Adam(N, 0.1)], ids=repr)
def test_step_never_writes_its_inputs_or_old_state(opt: SGD | Adam) -> None:
    """Pulls and checkpoints hold references to old params and optimizer state."""
    params, update = _vectors(2, 2)
    opt.step(params, update)  # state arrays now exist
    old_state = {k: (a, a.copy()) for k, a in opt.state_dict()[0].items()}
    params_copy, update_copy = params.copy(), update.copy()
    params.flags.writeable = update.flags.writeable = False  # any write would raise
    new = opt.step(params, update)
    assert new is not params
    np.testing.assert_array_equal(params, params_copy)
    np.testing.assert_array_equal(update, update_copy)
    for name, (array, before) in old_state.items():
        np.testing.assert_array_equal(array, before, err_msg=name)
        assert opt.state_dict()[0][name] is not array


# -- unary PushRequest encoding ----------------------------------------------------------------
headers = st.builds(
    PushHeader,
    job_id=st.text(max_size=20),
    worker_id=st.text(max_size=20),
    step=st.integers(0, 2**62),
    base_version=st.integers(0, 2**62),
    codec=st.sampled_from(["none", "fp16", "topk"]),
    codec_meta=st.binary(max_size=300),
    payload_bytes=st.integers(0, 2**40),
    loss=st.floats(allow_nan=False),
)


@settings(max_examples=150, deadline=None)
@given(header=headers, payload=st.binary(max_size=3000))
def test_push_request_matches_protobuf_both_ways(header: PushHeader, payload: bytes) -> None:
    raw = wire.encode_push_request(wire.header_to_pb(header).SerializeToString(), payload)
    parsed = pb.PushRequest.FromString(raw)
    assert wire.header_from_pb(parsed.header) == header and parsed.data == payload
    assert not parsed.padding.strip(b"\0")
    got_header, data = wire.push_request_deserializer(raw)
    assert wire.header_from_pb(got_header) == header
    assert data == payload and data.obj is raw  # a view of the received message, not a copy
    assert (len(raw) - len(payload)) % wire.PAYLOAD_ALIGN == 0  # the payload starts aligned
    plain = pb.PushRequest(header=wire.header_to_pb(header), data=payload).SerializeToString()
    got_header, data = wire.push_request_deserializer(plain)  # as any protobuf sender encodes it
    assert wire.header_from_pb(got_header) == header and data == payload


def test_push_request_in_other_encodings_goes_through_protobuf() -> None:
    h = pb.PushHeader(job_id="j", worker_id="w", step=3, payload_bytes=4)
    data_first = b"\x12\x04abcd" + b"\x0a" + bytes([h.ByteSize()]) + h.SerializeToString()
    unknown_field = pb.PushRequest(header=h, data=b"abcd").SerializeToString() + b"\x18\x07"
    split_header = (  # protobuf merges a repeated message field
        pb.PushRequest(header=pb.PushHeader(job_id="j")).SerializeToString()
        + pb.PushRequest(header=pb.PushHeader(worker_id="w", step=3, payload_bytes=4)).SerializeToString()
        + b"\x12\x04abcd"
    )
    for raw in (data_first, unknown_field, split_header):
        header, data = wire.push_request_deserializer(raw)
        assert (header.job_id, header.worker_id, header.step, bytes(data)) == ("j", "w", 3, b"abcd")
    header, data = wire.push_request_deserializer(b"")
    assert header == pb.PushHeader() and bytes(data) == b""


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_push_request_parser_never_raises(raw: bytes) -> None:
    """Garbage gives a None header (refused as INVALID_ARGUMENT by the servicer), never a crash."""
    header, data = wire.push_request_deserializer(raw)
    assert header is None or isinstance(header, pb.PushHeader)
    assert isinstance(data, memoryview)


def test_truncated_push_request_is_refused() -> None:
    raw = wire.encode_push_request(pb.PushHeader(job_id="j").SerializeToString(), b"x" * 100)
    assert wire.push_request_deserializer(raw[:-1])[0] is None
