"""Which gRPC method a push takes, and that both give the same result.

A recording interceptor on a real `grpc.aio` server (127.0.0.1, OS-chosen port) shows the
method each push used: `PushUnary` when the update fits under the message limit, the chunked
`Push` stream when it does not, and the stream after a server without `PushUnary` answered
UNIMPLEMENTED once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import (
    ErrorCode,
    PSError,
    PushHeader,
    PushOutcome,
    TensorSpec,
)
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.metrics import PSMetrics
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.grpc_client import GrpcPSClient
from dist_llm_train.paramserver.transport.grpc_server import ParameterServerServicer, method_handlers
from dist_llm_train.proto import paramserver_pb2 as pb

UNARY = f"/{wire.SERVICE}/PushUnary"
STREAM = f"/{wire.SERVICE}/Push"


class Recorder(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.methods.append(details.method)
        return await continuation(details)


@contextmanager
def serve(*, with_unary: bool = True) -> Iterator[tuple[str, Recorder]]:
    """A PS servicer on its own loop thread; `with_unary=False` is a server from before PushUnary."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    recorder = Recorder()
    handlers = method_handlers(ParameterServerServicer(ParameterStore(8 << 20), PSMetrics(), 1 << 20))
    if not with_unary:
        del handlers["PushUnary"]

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=[recorder], options=wire.channel_options(16 << 20))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def new_job(client: GrpcPSClient, n: int, job_id: str = "j") -> None:
    # Bytes and arithmetic through the transport: unit-scale updates on zero parameters, so no per-update bound.
    spec = JobSpec.from_wire(
        WireJobSpec(
            job_id, mode="async", optimizer="sgd", learning_rate=0.5, momentum=0.0, max_staleness=10, total_steps=99,
            options={"update_bound": '{"enabled": false}'},
        )
    )
    client.init_job(spec, [TensorSpec("w", (n,), 0)], np.zeros(n, np.float32), ["a"])


def push(client: GrpcPSClient, step: int, vec: np.ndarray, **fields: Any) -> Any:
    payload = vec.astype("<f4").tobytes()
    header = PushHeader("j", "a", step, step - 1, payload_bytes=len(payload), **fields)
    return client.push(header, payload)


def test_small_update_goes_unary_and_large_one_streams() -> None:
    n = 64 << 10  # 256 KiB of float32: over this client's 64 KiB limit, under the server's
    with serve() as (address, rec):
        small = GrpcPSClient(address, 10, chunk_bytes=1 << 20, max_message_bytes=8 << 20)
        tight = GrpcPSClient(address, 10, chunk_bytes=16 << 10, max_message_bytes=64 << 10)
        new_job(small, n)
        rec.methods.clear()
        assert push(small, 1, np.ones(n)).outcome is PushOutcome.APPLIED
        assert push(tight, 2, np.full(n, 2.0)).outcome is PushOutcome.APPLIED
        assert rec.methods == [UNARY, STREAM]
        pulled = small.pull("j", "a")
        assert pulled.version == 2
        np.testing.assert_array_equal(pulled.params, np.full(n, -1.5, np.float32))  # 0 - .5*1 - .5*2
        small.close()
        tight.close()


def test_single_chunk_stream_payload_is_decoded_despite_its_offset() -> None:
    """One data chunk arrives as a view 5 bytes into the message: misaligned for float32."""
    with serve() as (address, rec):
        client = GrpcPSClient(address, 10, chunk_bytes=1 << 20, max_message_bytes=8 << 20, unary_push=False)
        new_job(client, 1000)
        rec.methods.clear()
        assert push(client, 1, np.arange(1000.0)).outcome is PushOutcome.APPLIED
        assert rec.methods == [STREAM]
        np.testing.assert_array_equal(client.pull("j", "a").params, -0.5 * np.arange(1000, dtype=np.float32))
        client.close()


def test_server_without_push_unary_gets_the_stream() -> None:
    with serve(with_unary=False) as (address, rec):
        client = GrpcPSClient(address, 10, chunk_bytes=1 << 20, max_message_bytes=8 << 20)
        new_job(client, 16)
        rec.methods.clear()
        for step in (1, 2):
            assert push(client, step, np.ones(16)).outcome is PushOutcome.APPLIED
        assert rec.methods == [UNARY, STREAM, STREAM]  # asks once, then remembers
        assert client.pull("j", "a").version == 2
        client.close()


@pytest.mark.parametrize(
    ("vec", "fields", "code"),
    [
        (np.array([np.nan] + [0.0] * 15), {}, ErrorCode.INVALID_ARGUMENT),
        (np.ones(15), {}, ErrorCode.INVALID_ARGUMENT),
        (np.ones(16), {"payload_bytes": 4}, ErrorCode.INVALID_ARGUMENT),
        (np.ones(16), {"job_id": "nope"}, ErrorCode.NOT_FOUND),
    ],
    ids=["nan", "short", "length lie", "unknown job"],
)
def test_bad_unary_push_is_refused_and_changes_nothing(
    vec: np.ndarray, fields: dict[str, Any], code: ErrorCode
) -> None:
    with serve() as (address, rec):
        client = GrpcPSClient(address, 10, chunk_bytes=1 << 20, max_message_bytes=8 << 20)
        new_job(client, 16)
        payload = vec.astype("<f4").tobytes()
        header = PushHeader(**{"job_id": "j", "worker_id": "a", "step": 1, "base_version": 0,
                               "payload_bytes": len(payload), **fields})  # fmt: skip
        with pytest.raises(PSError) as err:
            client.push(header, payload)
        assert err.value.code is code
        assert rec.methods[-1] == UNARY
        pulled = client.pull("j", "a")
        assert pulled.version == 0 and not pulled.params.any()
        client.close()


def test_unparseable_push_request_is_invalid_argument() -> None:
    with serve() as (address, _), grpc.insecure_channel(address) as channel:
        raw_push = channel.unary_unary(UNARY, response_deserializer=pb.PushResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            raw_push(b"\x0a\x05ab", timeout=10)  # header field cut off
        assert isinstance(err.value, grpc.Call)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
