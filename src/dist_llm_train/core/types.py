"""Transport-neutral types shared by the parameter server, its clients and the worker.

Both transports (gRPC and ZMQ + msgpack) map their messages to and from these, so the
round / staleness logic and the worker never see a wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np


class ErrorCode(StrEnum):
    """Why the PS refused a request. Each maps to one gRPC status code."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # wrong length, NaN/Inf, malformed header, bad codec meta
    NOT_FOUND = "NOT_FOUND"  # unknown job
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no credential, or one this cluster did not sign
    PERMISSION_DENIED = "PERMISSION_DENIED"  # not a member of the job, or a credential not valid for the call
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # InitJob with a different layout than the existing job
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # message or payload over the configured maximum
    UNAVAILABLE = "UNAVAILABLE"  # transport could not reach the server
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"  # a server-side bug; not retried
    # base_version ahead of the server's version: the PS restarted from an older checkpoint. The update's
    # base is gone; the worker pulls again and recomputes (no task attempt is spent on it).
    ABORTED = "ABORTED"


class PSError(Exception):
    """A request the PS refused (or could not be reached for); nothing changed on the server."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    @property
    def unreachable(self) -> bool:
        """The server could not be reached or did not answer in time (a restart, a partition): retry, not refusal."""
        return self.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)


class PushOutcome(StrEnum):
    APPLIED = "APPLIED"
    BUFFERED = "BUFFERED"
    DUPLICATE = "DUPLICATE"
    STALE_REJECTED = "STALE_REJECTED"
    LATE_DROPPED = "LATE_DROPPED"
    JOB_COMPLETE = "JOB_COMPLETE"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class InitResult:
    created: bool
    version: int


@dataclass
class PulledParams:
    version: int
    params: np.ndarray  # flat float32
    layout: list[TensorSpec]
    job_complete: bool
    epoch: int = 0  # downlink lineage of `params` (`core.downlink`); 0: the job sends full pulls
    delta: Any = None  # PS side only: a `core.downlink.DeltaReply` to send instead of `params`


@dataclass
class PushHeader:
    job_id: str
    worker_id: str
    step: int
    base_version: int
    codec: str = "none"
    codec_meta: bytes = b""
    payload_bytes: int = 0
    num_samples: int = 0
    loss: float = 0.0
    kind: str = "gradient"  # "gradient" | "pseudo_gradient"


@dataclass
class PushResult:
    outcome: PushOutcome
    version: int
    staleness: int = 0
    message: str = ""


@dataclass
class WorkerStats:
    """One worker's record on the PS: how many pushes it made, how many were taken, its staleness bound."""

    worker_id: str
    pushes: int = 0
    accepted: int = 0  # applied, or buffered into a sync round
    rejected: int = 0  # STALE_REJECTED or LATE_DROPPED
    staleness_bound: int = 0  # the bound its next async push is held to (adaptive: from its speed)
    push_interval_s: float = 0.0  # EWMA of the time between its pushes on the PS clock (0: not measured)
    mean_staleness: float = 0.0  # over its accepted updates

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.pushes if self.pushes else 0.0


@dataclass
class JobStats:
    job_id: str
    version: int
    mode: str
    members: list[str]
    counters: dict[str, int]
    last_loss: float
    complete: bool
    num_params: int
    workers: list[WorkerStats] = field(default_factory=list)
