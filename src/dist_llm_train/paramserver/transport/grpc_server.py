"""gRPC (`grpc.aio`) transport of the parameter server.

The servicer only moves bytes: it reassembles chunked streams, hands them to the shared
`ParameterStore`, and turns `PSError` into `context.abort(<status>, message)`. Store calls
that may crunch numbers run in executor threads so the event loop keeps serving other
workers' streams; waits for a version are awaited on the loop itself.

Security (`transport.security`): with a cluster secret, `TokenInterceptor` checks every call's
bearer token and role before gRPC has parsed a byte of the request (a refused call gets a handler
without a deserializer that aborts), and each method checks the parsed job / worker ids against the
credential before touching the store. TLS (mutual with a client CA) when certificates are given;
server reflection only when asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from dist_llm_train.core.credentials import Claims
from dist_llm_train.core.types import ErrorCode, PSError
from dist_llm_train.paramserver.job import ParameterStore, run_store_call
from dist_llm_train.paramserver.metrics import PSMetrics
from dist_llm_train.paramserver.numerics import keep_freed_vectors
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.security import ServerSecurity, bearer_token
from dist_llm_train.proto import paramserver_pb2 as pb
from dist_llm_train.proto import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
assert SERVICE_NAME == wire.SERVICE


# Streams arrive through `wire.chunk_deserializer`: data chunks as memoryviews, headers as messages.
def _data_of(msg: Any) -> memoryview | bytes | None:
    if isinstance(msg, memoryview):
        return msg
    return msg.data if msg.WhichOneof("body") == "data" else None


async def _first_header(requests: AsyncIterator[Any]) -> Any:
    first = await anext(aiter(requests), None)
    if first is None or isinstance(first, memoryview) or first.WhichOneof("body") != "header":
        raise PSError(ErrorCode.INVALID_ARGUMENT, "the first message of the stream must be the header")
    return first.header


MIN_CHUNK_BYTES = 1024  # the smallest `paramserver.chunk_bytes` a client may use


def max_stream_chunks(expected: int) -> int:
    """The most data messages a stream of `expected` bytes may take: chunks of at least MIN_CHUNK_BYTES,
    the last one shorter. Without a cap a stream of empty chunks would keep the server busy forever."""
    return max(1, -(-expected // MIN_CHUNK_BYTES))


async def _read_data(requests: AsyncIterator[Any], expected: int) -> memoryview | bytes:
    """The data messages after the header: exactly `expected` bytes, refused as soon as they exceed it
    or arrive in more chunks than `max_stream_chunks` allows."""
    parts: list[memoryview | bytes] = []
    total = 0
    cap = max_stream_chunks(expected)
    async for msg in requests:
        data = _data_of(msg)
        if data is None:
            raise PSError(ErrorCode.INVALID_ARGUMENT, "only the first message of the stream may be a header")
        if len(parts) == cap:
            raise PSError(
                ErrorCode.INVALID_ARGUMENT,
                f"stream of {expected} bytes sent more than {cap} chunks (chunks of >= {MIN_CHUNK_BYTES} bytes)",
            )
        total += len(data)
        if total > expected:
            raise PSError(ErrorCode.INVALID_ARGUMENT, f"stream carries more than the {expected} bytes announced")
        parts.append(data)
    if total != expected:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"stream carried {total} bytes, header announced {expected}")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(
        self, store: ParameterStore, metrics: PSMetrics, chunk_bytes: int, security: ServerSecurity | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes
        self.security = security or ServerSecurity(None)
        self._push_latency = metrics.push_latency.labels("grpc")

    def _authorize(
        self, context: grpc.aio.ServicerContext, op: str, job_id: str | None, worker_id: str | None = None
    ) -> None:
        """The credential (already checked by the interceptor) acts in this job as this worker."""
        if not self.security.enabled:
            return
        claims: Claims | None = self.security.authenticate(bearer_token(context.invocation_metadata()), op)
        self.security.authorize(claims, op, job_id, worker_id)

    async def _guard(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except PSError as err:
            self.metrics.reject(err.code.value)
            await context.abort(wire.grpc_status(err.code), err.message)
            raise AssertionError("unreachable: abort raises") from err

    async def InitJob(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.InitJobResponse:
        async def work() -> pb.InitJobResponse:
            header = await _first_header(request_iterator)
            self._authorize(context, "init_job", header.spec.job_id)
            limit = self.store.max_payload_bytes
            if header.num_params * 4 > limit:
                raise PSError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"{header.num_params} params exceed the server's {limit}-byte limit",
                )
            data = await _read_data(request_iterator, max(header.num_params, 0) * 4)
            self.metrics.bytes_received.inc(len(data))
            params = np.frombuffer(data, dtype=wire.FLOAT32)
            result = await asyncio.to_thread(
                self.store.init_job,
                wire.spec_from_pb(header.spec),
                wire.layout_from_pb(header.layout),
                params,
                list(header.members),
            )
            return pb.InitJobResponse(created=result.created, version=result.version)

        return await self._guard(context, work)

    async def Pull(self, request: pb.PullRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Yields serialized ParamChunks (the handler's serializer passes bytes through)."""

        async def work() -> Any:
            self._authorize(context, "pull", request.job_id, request.worker_id)
            return await self.store.pull_async(
                request.job_id,
                request.worker_id,
                request.min_version,
                request.wait_timeout_s,
                request.have_epoch,
                request.have_version,
                request.have_digest,
            )

        pulled = await self._guard(context, work)
        header = pb.ParamHeader(
            version=pulled.version,
            num_params=int(pulled.params.shape[0]),
            layout=wire.layout_to_pb(pulled.layout),
            job_complete=pulled.job_complete,
            epoch=pulled.epoch,
        )
        if pulled.delta is not None:
            header.delta = True
            header.base_version = pulled.delta.base_version
            header.deltas.extend(wire.deltas_to_pb(pulled.delta))
            views = wire.delta_payloads(pulled.delta)
        else:
            views = [pulled.params.data.cast("B")]
        yield pb.ParamChunk(header=header).SerializeToString()
        step = self.chunk_bytes
        for view in views:
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                yield wire.encode_data_chunk(chunk)
                self.metrics.bytes_sent.inc(len(chunk))

    async def Push(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> pb.PushResponse:
        started = time.perf_counter()

        async def work() -> pb.PushResponse:
            header = wire.header_from_pb(await _first_header(request_iterator))
            self._authorize(context, "push", header.job_id, header.worker_id)
            self.store.precheck_push(header)  # refuse before the payload crosses the link
            try:
                payload = await _read_data(request_iterator, header.payload_bytes)
            except PSError as err:
                self.store.note_rejection(header.job_id, err)
                raise
            self.metrics.bytes_received.inc(len(payload))
            result = await run_store_call(
                self.store.push_cost_bytes(header, len(payload)), self.store.push, header, payload
            )
            return wire.result_to_pb(result)

        try:
            return await self._guard(context, work)
        finally:
            self._push_latency.observe(time.perf_counter() - started)

    async def PushUnary(self, request: tuple[Any, memoryview], context: grpc.aio.ServicerContext) -> pb.PushResponse:
        """Push in one message (see `wire.push_request_deserializer`), applied without a thread hop
        when small (`run_store_call`). The store runs the same checks as for the stream; what is
        lost is only the stream's refusal of a bad header before the payload crosses the link."""
        started = time.perf_counter()

        async def work() -> pb.PushResponse:
            pb_header, payload = request
            if pb_header is None:
                raise PSError(ErrorCode.INVALID_ARGUMENT, "PushRequest is not a valid protobuf message")
            header = wire.header_from_pb(pb_header)
            self._authorize(context, "push", header.job_id, header.worker_id)
            self.metrics.bytes_received.inc(len(payload))
            result = await run_store_call(
                self.store.push_cost_bytes(header, len(payload)), self.store.push, header, payload
            )
            return wire.result_to_pb(result)

        try:
            return await self._guard(context, work)
        finally:
            self._push_latency.observe(time.perf_counter() - started)

    async def SetMembers(
        self, request: pb.SetMembersRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetMembersResponse:
        async def work() -> pb.SetMembersResponse:
            self._authorize(context, "set_members", request.job_id)
            version, members = await asyncio.to_thread(self.store.set_members, request.job_id, list(request.members))
            return pb.SetMembersResponse(version=version, members=members)

        return await self._guard(context, work)

    async def GetStats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        async def work() -> pb.StatsResponse:
            self._authorize(context, "stats", request.job_id or None)
            return pb.StatsResponse(jobs=[wire.stats_to_pb(s) for s in self.store.stats(request.job_id or None)])

        return await self._guard(context, work)


def method_handlers(servicer: ParameterServerServicer) -> dict[str, grpc.RpcMethodHandler]:
    """Like the generated `add_ParameterServerServicer_to_server`, but bulk data bypasses protobuf
    objects (see `wire.encode_data_chunk`); the messages on the wire are unchanged."""
    return {
        "InitJob": grpc.stream_unary_rpc_method_handler(
            servicer.InitJob,
            request_deserializer=wire.chunk_deserializer(pb.InitJobChunk),
            response_serializer=pb.InitJobResponse.SerializeToString,
        ),
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull,
            request_deserializer=pb.PullRequest.FromString,
            response_serializer=wire.passthrough,
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push,
            request_deserializer=wire.chunk_deserializer(pb.PushChunk),
            response_serializer=pb.PushResponse.SerializeToString,
        ),
        "PushUnary": grpc.unary_unary_rpc_method_handler(
            servicer.PushUnary,
            request_deserializer=wire.push_request_deserializer,
            response_serializer=pb.PushResponse.SerializeToString,
        ),
        "SetMembers": grpc.unary_unary_rpc_method_handler(
            servicer.SetMembers,
            request_deserializer=pb.SetMembersRequest.FromString,
            response_serializer=pb.SetMembersResponse.SerializeToString,
        ),
        "GetStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetStats,
            request_deserializer=pb.StatsRequest.FromString,
            response_serializer=pb.StatsResponse.SerializeToString,
        ),
    }


# The PS's methods by the op name credentials speak of, and each one's streaming shape.
_METHOD_OPS = {
    "InitJob": ("init_job", "stream_unary"),
    "Pull": ("pull", "unary_stream"),
    "Push": ("push", "stream_unary"),
    "PushUnary": ("push", "unary_unary"),
    "SetMembers": ("set_members", "unary_unary"),
    "GetStats": ("stats", "unary_unary"),
}


def _refusal(kind: str, err: PSError) -> grpc.RpcMethodHandler:
    """A handler that aborts with `err` without reading the request: no deserializer is given, so gRPC
    hands the behaviour raw bytes (unary) or an iterator nobody reads (stream) — nothing is parsed."""
    status = wire.grpc_status(err.code)

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status, err.message)

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.abort(status, err.message)
        yield b""  # unreachable: abort raises; makes this an async generator as unary_stream needs

    if kind == "unary_unary":
        return grpc.unary_unary_rpc_method_handler(refuse)
    if kind == "stream_unary":
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_stream_rpc_method_handler(refuse_stream)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a PS call whose bearer token is missing, forged, expired or of a role not allowed the
    method, before its request is deserialised. Health and reflection calls pass (they read no state)."""

    def __init__(self, security: ServerSecurity, metrics: PSMetrics) -> None:
        self.security = security
        self.metrics = metrics
        self._prefix = f"/{SERVICE_NAME}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(self._prefix):
            return await continuation(details)
        op, kind = _METHOD_OPS.get(method[len(self._prefix):], (None, "unary_unary"))
        if op is None:
            return await continuation(details)  # unknown method: UNIMPLEMENTED as usual
        try:
            self.security.authenticate(bearer_token(details.invocation_metadata), op)
        except PSError as err:
            self.metrics.reject(err.code.value)
            return _refusal(kind, err)
        return await continuation(details)


class GrpcServer:
    """The aio server with the PS servicer and the standard health service; with `security`, the token
    interceptor and TLS; reflection only when `reflection=True`."""

    def __init__(
        self,
        store: ParameterStore,
        metrics: PSMetrics,
        host: str,
        port: int,
        chunk_bytes: int,
        max_message_bytes: int,
        security: ServerSecurity | None = None,
        *,
        reflection: bool = False,
    ) -> None:
        limit = max(max_message_bytes, chunk_bytes) + wire.FRAMING_SLACK
        keep_freed_vectors()  # the server process churns through vector-sized buffers
        self.security = security or ServerSecurity(None)
        interceptors = [TokenInterceptor(self.security, metrics)] if self.security.enabled else []
        self._server = grpc.aio.server(options=wire.channel_options(limit), interceptors=interceptors)
        handlers = method_handlers(ParameterServerServicer(store, metrics, chunk_bytes, self.security))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        self._server.add_registered_method_handlers(SERVICE_NAME, handlers)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if reflection:
            grpc_reflection.enable_server_reflection(
                [SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME], self._server
            )
        self._address = f"{host}:{port}"
        self.port = 0

    async def start(self) -> int:
        if self.security.tls is not None:
            key, cert, client_ca = self.security.tls.read()
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
            self.port = self._server.add_secure_port(self._address, credentials)
        else:
            self.port = self._server.add_insecure_port(self._address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {self._address}")
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float = 2.0) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
