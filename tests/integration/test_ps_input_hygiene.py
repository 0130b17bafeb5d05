"""Issue 14, item 3 on the parameter server: replay marks, wire integer ranges, stream chunk caps.

msgpack carries integers in [-2^63, 2^64 - 1]; gRPC's int64 fields stop at 2^63 - 1 (int32: 2^31 - 1), so
the values in between are what ZMQ must refuse to match gRPC.

Each test uses the issue's input: a push replayed more than 1,024 steps later, ZMQ integers that a gRPC
int64/int32 field cannot hold, and a gRPC stream of many tiny chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.proto import paramserver_pb2 as pb
from dist_llm_train.proto import paramserver_pb2_grpc as pb_grpc


def test_a_push_replayed_more_than_1024_steps_later_is_a_duplicate() -> None:
    store = ParameterStore(1 << 20)
    spec = JobSpec.from_wire(WireJobSpec("j", mode="async", optimizer="sgd", learning_rate=1.0, momentum=0.0,
                                         max_staleness=10_000, total_steps=100_000))
    store.init_job(spec, [TensorSpec("w", (2,), 0)], np.zeros(2, np.float32), [])
    payload = np.full(2, 0.5, "<f4").tobytes()

    def push(step: int) -> PushOutcome:
        version = store.job_state("j").version
        return store.push(PushHeader("j", "w", step, version, payload_bytes=len(payload)), payload).outcome

    assert push(1) is PushOutcome.APPLIED
    for step in range(2, 1200):
        assert push(step) is PushOutcome.APPLIED
    version = store.job_state("j").version
    assert push(1) is PushOutcome.DUPLICATE  # 1,198 steps later: still recognised
    assert push(600) is PushOutcome.DUPLICATE  # any step below the mark, in order or not
    assert store.job_state("j").version == version
    assert push(1200) is PushOutcome.APPLIED


# -- ZMQ refuses exactly what gRPC's field types cannot carry ------------------------------------------------
@pytest.fixture(scope="module")
def zmq_server() -> Iterator[BackgroundServer]:
    with BackgroundServer(ParamServerConfig(port=0, metrics_port=0, transport="zmq"), with_metrics=False) as srv:
        yield srv


def zmq_call(server: BackgroundServer, req: dict[str, Any], *data: bytes) -> dict[str, Any]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{server.address}")
    try:
        sock.send_multipart([b"", msgpack.packb(req), *data])
        assert sock.poll(10_000)
        reply: dict[str, Any] = msgpack.unpackb(sock.recv_multipart()[1])
        return reply
    finally:
        sock.close()
        ctx.term()


def spec_dict(job_id: str, **kw: Any) -> dict[str, Any]:
    return {**JobSpec.from_wire(WireJobSpec(job_id, mode="async", optimizer="sgd")).to_dict(), **kw}


INIT_CASES = [
    ("max_staleness beyond int32", {"max_staleness": 1 << 31}, None, "spec.max_staleness = 2147483648"),
    ("total_steps beyond int64", {"total_steps": 1 << 63}, None, "spec.total_steps"),
    ("layout offset a float", {}, [["w", [4], 0.0]], "layout"),
    ("layout dimension beyond int64", {}, [["w", [(1 << 64) - 1], 0]], "layout"),
    ("layout dimension a bool", {}, [["w", [True], 0]], "layout"),
]


@pytest.mark.parametrize(("name", "spec_kw", "layout", "needle"), INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_zmq_init_job_refuses_integers_grpc_cannot_carry(
    zmq_server: BackgroundServer, name: str, spec_kw: dict[str, Any], layout: Any, needle: str
) -> None:
    req = {
        "op": "init_job",
        "id": 1,
        "spec": spec_dict(f"range-{abs(hash(name))}", **spec_kw),
        "layout": layout if layout is not None else [["w", [4], 0]],
        "num_params": 4,
        "members": [],
    }
    reply = zmq_call(zmq_server, req, np.zeros(4, "<f4").tobytes())
    assert reply.get("error") == "INVALID_ARGUMENT" and needle in reply["message"], reply


@pytest.mark.parametrize(
    ("field", "value"),
    [("step", 1 << 63), ("base_version", 1 << 63), ("payload_bytes", (1 << 64) - 1), ("num_samples", 1 << 63)],
)
def test_zmq_push_header_integers_are_int64_like_grpc(zmq_server: BackgroundServer, field: str, value: int) -> None:
    header = {"job_id": "j", "worker_id": "w", "step": 1, "base_version": 0, "payload_bytes": 4, field: value}
    reply = zmq_call(zmq_server, {"op": "push", "id": 2, "header": header}, b"\0" * 4)
    assert reply.get("error") == "INVALID_ARGUMENT" and f"header.{field}" in reply["message"], reply
    with pytest.raises(ValueError):  # the same value cannot even be put into gRPC's message
        pb.PushHeader(**{"job_id": "j", field: value})


@pytest.mark.parametrize("field", ["min_version", "have_epoch", "have_version"])
def test_zmq_pull_integers_are_int64_like_grpc(zmq_server: BackgroundServer, field: str) -> None:
    reply = zmq_call(zmq_server, {"op": "pull", "id": 3, "job_id": "j", field: (1 << 64) - 1})
    assert reply.get("error") == "INVALID_ARGUMENT" and field in reply["message"], reply


def test_the_largest_int64_passes_the_wire_on_both() -> None:
    assert wire.check_int_range((1 << 63) - 1, "x") == (1 << 63) - 1
    pb.PushHeader(step=(1 << 63) - 1)  # gRPC holds it too; the store then judges the value itself


# -- gRPC streams: a cap on the number of chunks ---------------------------------------------------------
def test_a_stream_of_tiny_chunks_is_refused() -> None:
    cfg = ParamServerConfig(port=0, metrics_port=0, transport="grpc")
    with BackgroundServer(cfg, with_metrics=False) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        spec = pb.JobSpec(job_id="chunks", mode="async", optimizer="sgd", learning_rate=1.0, total_steps=9)
        header = pb.InitJobHeader(spec=spec, layout=[pb.TensorSpec(name="w", shape=[1000], offset=0)], num_params=1000)
        raw = np.zeros(1000, "<f4").tobytes()
        assert stub.InitJob(iter([pb.InitJobChunk(header=header), pb.InitJobChunk(data=raw)]), timeout=10).created
        grad = np.ones(1000, "<f4").tobytes()  # 4,000 bytes: at most 4 chunks
        push_header = pb.PushHeader(job_id="chunks", worker_id="w", step=1, payload_bytes=len(grad))
        empties = (pb.PushChunk(data=b"") for _ in range(100_000))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Push(iter([pb.PushChunk(header=push_header), *[pb.PushChunk(data=b"")] * 10]), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "more than 4 chunks" in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError):  # a long stream is cut off at the cap, not read to its end
            stub.Push(iter([pb.PushChunk(header=push_header), *empties]), timeout=30)
        # Four chunks are fine, and nothing was applied by the refused streams.
        parts = [grad[i : i + 1000] for i in range(0, 4000, 1000)]
        resp = stub.Push(iter([pb.PushChunk(header=push_header), *(pb.PushChunk(data=p) for p in parts)]), timeout=10)
        assert resp.outcome == pb.APPLIED and resp.version == 1


# -- property: a value passes the ZMQ wire exactly when gRPC's message can hold it --------------------------
MSGPACK_INTS = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # every integer msgpack can carry


def grpc_holds(message: type, field: str, value: int) -> bool:
    try:
        message(**{field: value})
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["step", "base_version", "payload_bytes", "num_samples"]), value=MSGPACK_INTS)
def test_push_header_integers_pass_zmq_iff_grpc_holds_them(field: str, value: int) -> None:
    header = {"job_id": "j", "worker_id": "w", "step": 1, "base_version": 0, field: value}
    try:
        wire.header_from_dict(header)
        zmq_ok = True
    except PSError:
        zmq_ok = False
    assert zmq_ok == grpc_holds(pb.PushHeader, field, value)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["max_staleness", "total_steps"]), value=MSGPACK_INTS)
def test_spec_integers_pass_zmq_iff_grpc_holds_them(field: str, value: int) -> None:
    spec = {**spec_dict("p"), field: value}
    try:
        wire.spec_from_dict(spec)
        zmq_ok = True
    except PSError as err:  # the range check, or the spec's own check of the value (same on both transports)
        zmq_ok = "does not fit" not in err.message
    assert zmq_ok == grpc_holds(pb.JobSpec, field, value)
