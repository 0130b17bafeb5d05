"""Blocking gRPC client of the parameter server (see `client.py` for the interface).

Pushes go as one unary `PushUnary` message when they fit under the message size limit:
Python gRPC moves a large unary message about twice as fast as a client stream, whose
blocking form costs a thread per call and a round trip per message. Larger updates, and
servers that predate `PushUnary`, get the chunked `Push` stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import numpy as np

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import (
    ErrorCode,
    InitResult,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushResult,
    TensorSpec,
)
from dist_llm_train.paramserver.numerics import Buffer
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.client import PSClient, as_float32, delta_base, have_fields
from dist_llm_train.paramserver.transport.security import PSCredentials
from dist_llm_train.proto import paramserver_pb2 as pb
from dist_llm_train.proto import paramserver_pb2_grpc as pb_grpc

T = TypeVar("T")


def _chunks(data: memoryview, size: int) -> Iterator[bytes]:
    """Serialized data chunks; with `_raw` methods below they go on the wire as they are."""
    for start in range(0, len(data), size):
        yield wire.encode_data_chunk(data[start : start + size])


def _open_channel(address: str, options: list[tuple[str, object]], creds: PSCredentials) -> grpc.Channel:
    """Plaintext, or TLS when the credentials name the CA (mutual TLS when they also carry a client cert)."""
    if creds.tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    with open(creds.tls_ca, "rb") as f:
        ca = f.read()
    key = cert = None
    if creds.tls_cert and creds.tls_key:
        with open(creds.tls_key, "rb") as f:
            key = f.read()
        with open(creds.tls_cert, "rb") as f:
            cert = f.read()
    tls = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    if creds.tls_server_name:
        options = [*options, ("grpc.ssl_target_name_override", creds.tls_server_name)]
    return grpc.secure_channel(address, tls, options=options)


class GrpcPSClient(PSClient):
    overlaps_calls = True  # one HTTP/2 channel, one stream per call

    def __init__(
        self,
        address: str,
        timeout_s: float,
        *,
        chunk_bytes: int,
        max_message_bytes: int,
        unary_push: bool = True,
        credentials: PSCredentials | None = None,
    ) -> None:
        """`unary_push=False` streams every push (for comparisons; the stream is the slower path).
        `credentials`: the bearer token sent with every call, and TLS when it names a CA."""
        super().__init__()
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self._message_limit = max(max_message_bytes, chunk_bytes) + wire.FRAMING_SLACK
        creds = credentials or PSCredentials()
        self._metadata = creds.metadata
        self._channel = _open_channel(address, wire.channel_options(self._message_limit), creds)
        self._unary_push = unary_push  # turned off when a server answers UNIMPLEMENTED
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        # Bulk methods take/return serialized chunks, skipping a protobuf copy of every chunk.
        path = f"/{wire.SERVICE}/"
        self._init_raw = self._channel.stream_unary(
            path + "InitJob",
            request_serializer=wire.passthrough,
            response_deserializer=pb.InitJobResponse.FromString,
        )
        self._push_raw = self._channel.stream_unary(
            path + "Push",
            request_serializer=wire.passthrough,
            response_deserializer=pb.PushResponse.FromString,
        )
        self._push_unary_raw = self._channel.unary_unary(
            path + "PushUnary",
            request_serializer=wire.passthrough,
            response_deserializer=pb.PushResponse.FromString,
        )
        self._pull_raw = self._channel.unary_stream(
            path + "Pull",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=wire.chunk_deserializer(pb.ParamChunk),
        )

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            raise wire.error_from_status(code, details) from None

    def init_job(self, spec: JobSpec, layout: list[TensorSpec], params: np.ndarray, members: list[str]) -> InitResult:
        flat = as_float32(params)
        header = pb.InitJobHeader(
            spec=wire.spec_to_pb(spec),
            layout=wire.layout_to_pb(layout),
            num_params=int(flat.shape[0]),
            members=list(members),
        )

        def stream() -> Iterator[bytes]:
            yield pb.InitJobChunk(header=header).SerializeToString()
            yield from _chunks(flat.data.cast("B"), self.chunk_bytes)

        resp = self._call(lambda: self._init_raw(stream(), timeout=self.timeout_s, metadata=self._metadata))
        self._count(sent=flat.nbytes)
        return InitResult(created=resp.created, version=resp.version)

    def pull(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have: PulledParams | None = None,
        own: np.ndarray | None = None,
    ) -> PulledParams:
        have_epoch, have_version, have_digest = have_fields(have, own)
        request = pb.PullRequest(
            job_id=job_id,
            worker_id=worker_id,
            min_version=min_version,
            wait_timeout_s=wait_timeout_s,
            have_epoch=have_epoch,
            have_version=have_version,
            have_digest=have_digest,
        )

        def collect() -> PulledParams:
            stream = self._pull_raw(
                request, timeout=self.timeout_s + max(wait_timeout_s, 0.0), metadata=self._metadata
            )
            header: pb.ParamHeader | None = None
            buf = bytearray()
            filled = 0
            for msg in stream:
                if header is None:
                    if isinstance(msg, memoryview) or msg.WhichOneof("body") != "header":
                        raise PSError(ErrorCode.INTERNAL, "parameter stream did not start with a header")
                    header = msg.header
                    size = sum(d.payload_bytes for d in header.deltas) if header.delta else header.num_params * 4
                    buf = bytearray(size)
                    continue
                data = msg if isinstance(msg, memoryview) else msg.data
                end = filled + len(data)
                if end > len(buf):
                    raise PSError(ErrorCode.INTERNAL, "server sent more parameter bytes than announced")
                buf[filled:end] = data
                filled = end
            if header is None or filled != len(buf):
                raise PSError(ErrorCode.UNAVAILABLE, f"parameter stream ended early ({filled}/{len(buf)} bytes)")
            self._count(received=filled)
            if header.delta:
                base = delta_base(have, own, header.epoch, header.base_version)
                params = wire.params_from_deltas(
                    base, header.epoch, header.base_version, header.version, header.deltas, buf
                )
            else:
                params = np.frombuffer(buf, dtype=wire.FLOAT32)
            return PulledParams(
                version=header.version,
                params=params,
                layout=wire.layout_from_pb(header.layout),
                job_complete=header.job_complete,
                epoch=header.epoch,
            )

        return self._call(collect)

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        head = wire.header_to_pb(header).SerializeToString()
        data = memoryview(payload).cast("B")
        resp: pb.PushResponse | None = None
        if self._unary_push and len(head) + len(data) + wire.PUSH_REQUEST_FRAMING <= self._message_limit:
            resp = self._call(lambda: self._push_unary(wire.encode_push_request(head, data)))
        if resp is None:

            def stream() -> Iterator[bytes]:
                yield pb.PushChunk(header=wire.header_to_pb(header)).SerializeToString()
                yield from _chunks(data, self.chunk_bytes)

            resp = self._call(lambda: self._push_raw(stream(), timeout=self.timeout_s, metadata=self._metadata))
        self._count(sent=len(payload))
        return wire.result_from_pb(resp)

    def _push_unary(self, request: bytes) -> pb.PushResponse | None:
        """The unary push's reply, or None (and streams from now on) if the server lacks it."""
        try:
            resp: pb.PushResponse = self._push_unary_raw(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.UNIMPLEMENTED:
                self._unary_push = False
                return None
            raise
        return resp

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        resp = self._call(
            lambda: self._stub.SetMembers(
                pb.SetMembersRequest(job_id=job_id, members=list(members)),
                timeout=self.timeout_s,
                metadata=self._metadata,
            )
        )
        return list(resp.members)

    def stats(self, job_id: str | None = None) -> list[JobStats]:
        resp = self._call(
            lambda: self._stub.GetStats(
                pb.StatsRequest(job_id=job_id or ""), timeout=self.timeout_s, metadata=self._metadata
            )
        )
        return [wire.stats_from_pb(s) for s in resp.jobs]

    def close(self) -> None:
        self._channel.close()
