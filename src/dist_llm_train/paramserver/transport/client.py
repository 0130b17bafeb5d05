"""Blocking parameter-server clients with one interface for both transports.

    ps = connect("grpc", "127.0.0.1:50051")
    ps.init_job(spec, layout, params, members=[])
    pulled = ps.pull(job_id, worker_id, min_version=3, wait_timeout_s=30)
    result = ps.push(header, payload)

Every refusal is a `PSError` with the server's code; a server that cannot be reached (or
stops answering) is `PSError(UNAVAILABLE)`, which callers may retry. `bytes_sent` and
`bytes_received` count payload bytes on the wire (parameters and updates, not headers),
which is what the project's "bytes sent" curves plot. No torch here: workers convert.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar

import numpy as np

from dist_llm_train.core.downlink import params_digest
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import (
    InitResult,
    JobStats,
    PulledParams,
    PushHeader,
    PushResult,
    TensorSpec,
)
from dist_llm_train.paramserver.numerics import Buffer
from dist_llm_train.paramserver.transport.security import PSCredentials

DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


class PSClient(ABC):
    # True when calls made from two threads are on the wire at once (gRPC multiplexes them on one channel);
    # the worker then sends a round's waiting pull alongside its push. False: calls run one after another.
    overlaps_calls: ClassVar[bool] = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self._count_lock = threading.Lock()

    def _count(self, sent: int = 0, received: int = 0) -> None:
        with self._count_lock:
            self.bytes_sent += sent
            self.bytes_received += received

    @abstractmethod
    def init_job(self, spec: JobSpec, layout: list[TensorSpec], params: np.ndarray, members: list[str]) -> InitResult:
        """Create the job (or confirm an identical one); `params` is flat float32."""

    @abstractmethod
    def pull(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have: PulledParams | None = None,
        own: np.ndarray | None = None,
    ) -> PulledParams:
        """Current parameters; with min_version, wait up to wait_timeout_s for that version.

        `have`: what the caller got from its last pull; a job that publishes deltas (a downlink codec,
        or Streaming DiLoCo's fragments) then sends only the deltas since (`core.downlink`), applied
        here to a copy of `have.params`. `own` (without `have`): parameters the caller initialised
        itself; when they are the ones the job's deltas start from, only those deltas are sent.
        The returned array is a private, writable copy."""

    @abstractmethod
    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        """Send one encoded update; `header.payload_bytes` must equal len(payload)."""

    @abstractmethod
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        """Replace the job's round membership; returns the members the server now holds."""

    @abstractmethod
    def stats(self, job_id: str | None = None) -> list[JobStats]:
        """Stats of one job (empty list if the server does not know it) or of every job."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> PSClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def as_float32(params: np.ndarray) -> np.ndarray:
    """A flat, C-contiguous little-endian float32 view (copy only if needed)."""
    return np.ascontiguousarray(np.asarray(params).reshape(-1), dtype="<f4")


def connect(
    transport: str,
    address: str,
    timeout_s: float = 30,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: PSCredentials | None = None,
) -> PSClient:
    """A client for `address` ("host:port"). Connecting is lazy: an unreachable server shows
    up as PSError(UNAVAILABLE) on the first call, never here. `credentials`: the token (and the
    PS's CURVE key or TLS files) a secured PS asks for (`transport.security`).

    A comma-separated address ("host:port,host:port,...") names P parameter-server shards: the
    client is a `sharded.ShardedPSClient` over P clients, one per shard, with this same interface."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if "," in address:
        from dist_llm_train.paramserver.transport.sharded import ShardedPSClient, parse_addresses

        per_shard = [
            connect(transport, a, timeout_s, chunk_bytes=chunk_bytes, max_message_bytes=max_message_bytes,
                    credentials=credentials)
            for a in parse_addresses(address)
        ]
        return ShardedPSClient(per_shard)
    if transport == "grpc":
        from dist_llm_train.paramserver.transport.grpc_client import GrpcPSClient

        return GrpcPSClient(
            address, timeout_s, chunk_bytes=chunk_bytes, max_message_bytes=max_message_bytes, credentials=credentials
        )
    if transport == "zmq":
        from dist_llm_train.paramserver.transport.zmq_client import ZmqPSClient

        return ZmqPSClient(address, timeout_s, credentials)
    raise ValueError(f"unknown transport {transport!r} (grpc, zmq)")


def have_fields(have: PulledParams | None, own: np.ndarray | None) -> tuple[int, int, bytes]:
    """(have_epoch, have_version, have_digest) of a pull request: the lineage held, else the digest of `own`."""
    if have is not None and have.epoch:
        return have.epoch, have.version, b""
    return 0, 0, (params_digest(own) if own is not None else b"")


def delta_base(have: PulledParams | None, own: np.ndarray | None, epoch: int, base_version: int) -> PulledParams | None:
    """What a delta reply applies to: `have`, or `own` when the server answered the digest of `own`."""
    if (have is None or not have.epoch) and own is not None:
        return PulledParams(version=base_version, params=own, layout=[], job_complete=False, epoch=epoch)
    return have
