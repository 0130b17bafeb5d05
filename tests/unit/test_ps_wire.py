"""Wire mapping: the hand-written chunk encoding must be byte-identical to protobuf's, and
maps received over ZMQ are type-checked before they become requests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.proto import paramserver_pb2 as pb


@given(st.binary(max_size=5000))
def test_data_chunk_encoding_matches_protobuf(data: bytes) -> None:
    for cls in (pb.PushChunk, pb.ParamChunk, pb.InitJobChunk):
        assert wire.encode_data_chunk(data) == cls(data=data).SerializeToString()
        view = wire.data_chunk_view(cls(data=data).SerializeToString())
        assert view is not None and bytes(view) == data


def test_large_chunk_and_non_data_messages() -> None:
    big = bytes(range(256)) * 20_000  # multi-byte varint length
    assert wire.encode_data_chunk(memoryview(big)) == pb.PushChunk(data=big).SerializeToString()
    header = pb.PushChunk(header=pb.PushHeader(job_id="j", worker_id="w")).SerializeToString()
    assert wire.data_chunk_view(header) is None
    parsed = wire.chunk_deserializer(pb.PushChunk)(header)
    assert parsed.header.job_id == "j"
    # a data tag followed by the wrong length is not taken as a data chunk
    assert wire.data_chunk_view(b"\x12\x05abc") is None


def test_spec_from_dict_checks_names_and_types() -> None:
    spec = wire.spec_from_dict({"job_id": "j", "learning_rate": 1, "aggregation_params": {"f": 1}})
    assert spec == JobSpec.from_wire(WireJobSpec("j", learning_rate=1.0, aggregation_params={"f": 1}))
    assert isinstance(spec.optimizer.learning_rate, float)
    for bad in (
        {"job_id": 3},
        {"job_id": "j", "extra": 1},
        {"job_id": "j", "total_steps": 1.5},
        {"job_id": "j", "options": {"k": 1}},
        {"job_id": "j", "max_staleness": True},
        {},
        [1],
    ):
        with pytest.raises(PSError) as err:
            wire.spec_from_dict(bad)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_header_from_dict() -> None:
    h = wire.header_from_dict({"job_id": "j", "worker_id": "w", "step": 1, "base_version": 0, "codec_meta": b"\x80"})
    assert h == PushHeader("j", "w", 1, 0, codec_meta=b"\x80")
    with pytest.raises(PSError):
        wire.header_from_dict({"job_id": "j", "worker_id": "w", "step": "1", "base_version": 0})


def test_status_mapping() -> None:
    import grpc

    assert wire.grpc_status(ErrorCode.PERMISSION_DENIED) is grpc.StatusCode.PERMISSION_DENIED
    assert wire.error_from_status(grpc.StatusCode.NOT_FOUND, "x").code is ErrorCode.NOT_FOUND
    assert wire.error_from_status(grpc.StatusCode.UNKNOWN, "boom").code is ErrorCode.INTERNAL
    assert wire.error_from_status(grpc.StatusCode.CANCELLED, "bye").code is ErrorCode.UNAVAILABLE
