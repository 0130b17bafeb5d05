"""`ParameterStore`: every job the PS holds, behind one thread-safe, transport-neutral API.

Both servers (gRPC and ZMQ) call exactly these methods, so the semantics cannot drift
between transports. Methods that may do heavy numpy work (`init_job`, `push`,
`expire_rounds`, `set_members`) are plain blocking calls the servers run in executor
threads; waiting for a version is offered both blocking (`pull`) and awaitable
(`pull_async`). A refused request raises `PSError` and leaves the store as it was.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from dist_llm_train.paramserver import validation as v
from dist_llm_train.paramserver.job import JobSnapshot, JobState
from dist_llm_train.paramserver.numerics import Buffer
from dist_llm_train.paramserver.observer import NULL_OBSERVER, StoreObserver
from dist_llm_train.paramserver.types import (
    ErrorCode,
    InitResult,
    JobSpec,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushResult,
    TensorSpec,
)

log = logging.getLogger(__name__)

CheckpointHook = Callable[[JobSnapshot], None]
T = TypeVar("T")

# Store calls touching at most this many bytes run on the event loop itself: numpy needs about
# a millisecond for them, less than a hop to an executor thread and back costs under load
# (benchmarks/ps_throughput.py: +20 % ingest for 4 MB pushes). Bigger work goes to a thread so
# the loop keeps serving other workers; `push_cost_bytes` counts a sync round's buffered updates.
INLINE_MAX_BYTES = 4 << 20


async def run_store_call(nbytes: int, fn: Callable[..., T], *args: object) -> T:
    """Call a blocking store method from a server coroutine, inline or in a thread by size."""
    if nbytes <= INLINE_MAX_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


class ParameterStore:
    def __init__(
        self,
        max_payload_bytes: int = 256 << 20,
        *,
        clock: Callable[[], float] = time.monotonic,
        observer: StoreObserver = NULL_OBSERVER,
        checkpoint_hook: CheckpointHook | None = None,
        checkpoint_every: int = 50,
    ) -> None:
        """`checkpoint_hook` receives a snapshot at creation, every `checkpoint_every` versions
        and at completion; it runs with the job lock held, so it must only enqueue."""
        self.max_payload_bytes = max_payload_bytes
        self.checkpoint_every = checkpoint_every
        self._clock = clock
        self._obs = observer
        self._hook = checkpoint_hook
        self._jobs: dict[str, JobState] = {}
        self._lock = threading.Lock()  # guards the job table only; each job has its own lock

    # -- jobs ------------------------------------------------------------------------
    def _job(self, job_id: str) -> JobState:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise PSError(ErrorCode.NOT_FOUND, f"unknown job {job_id!r}")
        return job

    def now(self) -> float:
        """The store's clock (monotonic seconds; injectable for tests)."""
        return self._clock()

    def job_state(self, job_id: str) -> JobState:
        """The live state of one job (read-only use: tests and in-process tools inspect it)."""
        return self._job(job_id)

    def job_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)

    def _check_size(self, nbytes: int, what: str) -> None:
        if nbytes > self.max_payload_bytes:
            raise PSError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{what} is {nbytes} bytes; the server accepts at most {self.max_payload_bytes}",
            )

    def _attach(self, job: JobState) -> None:
        job.on_version = self._maybe_checkpoint
        self._obs.version(job.spec.job_id, job.version)
        self._obs.members(job.spec.job_id, len(job.members))

    def _maybe_checkpoint(self, job: JobState) -> None:
        if self._hook is not None and (job.version % self.checkpoint_every == 0 or job.complete):
            self._hook(job.snapshot_locked())

    def init_job(
        self, spec: JobSpec, layout: Sequence[TensorSpec], params: np.ndarray, members: Sequence[str]
    ) -> InitResult:
        """Create the job, or confirm an identical one exists (created=False). The first
        InitJob's spec and members win; later calls only have to match layout and length."""
        v.check_job_id(spec.job_id)
        self._check_size(int(params.nbytes), "initial parameter vector")
        with self._lock:
            existing = self._jobs.get(spec.job_id)
        if existing is not None:
            return self._confirm(existing, layout, params)
        JobState.validated(spec, layout, params, members)
        job = JobState(spec, layout, params, v.check_members(members), self._clock, self._obs)
        with self._lock:
            existing = self._jobs.get(spec.job_id)
            if existing is None:
                self._jobs[spec.job_id] = job
        if existing is not None:  # lost a race with an identical InitJob
            return self._confirm(existing, layout, params)
        self._attach(job)
        log.info(
            "job %s created: %d params, mode=%s, members=%s",
            spec.job_id,
            job.num_params,
            spec.mode,
            job.members or "open",
        )
        if self._hook is not None:
            self._hook(job.snapshot())
        return InitResult(created=True, version=0)

    @staticmethod
    def _confirm(job: JobState, layout: Sequence[TensorSpec], params: np.ndarray) -> InitResult:
        if not job.same_shape(layout, int(params.shape[0])):
            raise PSError(
                ErrorCode.FAILED_PRECONDITION,
                f"job {job.spec.job_id!r} exists with {job.num_params} params and a different layout",
            )
        return InitResult(created=False, version=job.stats().version)

    def restore(self, snap: JobSnapshot) -> None:
        """Load a checkpointed job (on start-up, before serving)."""
        job = JobState.restore(snap, self._clock, self._obs)
        with self._lock:
            self._jobs[snap.spec.job_id] = job
        self._attach(job)

    def snapshots(self) -> list[JobSnapshot]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.snapshot() for j in jobs]

    # -- pull ------------------------------------------------------------------------
    def _pulled(self, job: JobState) -> PulledParams:
        version, params, complete = job.read()
        return PulledParams(version=version, params=params, layout=list(job.layout), job_complete=complete)

    def pull(
        self, job_id: str, worker_id: str, min_version: int = 0, wait_timeout_s: float = 0.0
    ) -> PulledParams:
        """Current parameters, after waiting (bounded) for `min_version` or completion.

        The returned array is read-only and shared; it is never modified afterwards."""
        wait = v.check_wait(min_version, wait_timeout_s)
        job = self._job(job_id)
        if wait > 0:
            job.waiters.wait(lambda: job.reached(min_version), wait)
        return self._pulled(job)

    async def pull_async(
        self, job_id: str, worker_id: str, min_version: int = 0, wait_timeout_s: float = 0.0
    ) -> PulledParams:
        wait = v.check_wait(min_version, wait_timeout_s)
        job = self._job(job_id)
        if wait > 0:
            await job.waiters.wait_async(lambda: job.reached(min_version), wait)
        return self._pulled(job)

    # -- push ------------------------------------------------------------------------
    def _counted(self, header: PushHeader) -> JobState:
        v.check_job_id(header.job_id)
        return self._job(header.job_id)

    def precheck_push(self, header: PushHeader) -> None:
        """Refuse what the header alone shows to be bad, before the payload is transferred."""
        job = self._counted(header)
        try:
            v.check_header(header)
            self._check_size(header.payload_bytes, "payload")
            job.precheck(header)
        except PSError as err:
            job.count_rejection(err)
            raise

    def push_cost_bytes(self, header: PushHeader, nbytes: int) -> int:
        """Bytes of numpy work a push may cause: its payload, plus in sync mode the updates it may
        aggregate when it closes the round."""
        with self._lock:
            job = self._jobs.get(header.job_id)
        if job is None or not job.rounds:
            return nbytes
        return nbytes + job.round_size() * job.num_params * 4

    def note_rejection(self, job_id: str, err: PSError) -> None:
        """Count a refusal a transport detected itself (e.g. a malformed stream) against the job."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.count_rejection(err)

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        job = self._counted(header)
        try:
            v.check_header(header)
            self._check_size(len(payload), "payload")
            if header.payload_bytes != len(payload):
                raise v.invalid(f"header says payload_bytes={header.payload_bytes}, received {len(payload)}")
            return job.push(header, payload)
        except PSError as err:
            job.count_rejection(err)
            raise

    # -- membership, rounds, stats ---------------------------------------------------
    def set_members(self, job_id: str, members: Sequence[str]) -> tuple[int, list[str]]:
        """Replace the job's members (closing open membership). A sync round that now waits for
        no one closes at once. Returns (version, members)."""
        clean = v.check_members(members)
        job = self._job(job_id)
        version, current = job.set_members(clean)
        log.info("job %s members: %s", job_id, current)
        return version, current

    def next_deadline(self) -> float | None:
        """Earliest straggler deadline of any open round (clock time), or None."""
        with self._lock:
            jobs = list(self._jobs.values())
        deadlines = [d for d in (j.round_deadline() for j in jobs) if d is not None]
        return min(deadlines) if deadlines else None

    def expire_rounds(self) -> int:
        """Close every round whose straggler timeout has passed; returns how many closed."""
        now = self._clock()
        with self._lock:
            jobs = list(self._jobs.values())
        return sum(1 for j in jobs if j.expire(now))

    def stats(self, job_id: str | None = None) -> list[JobStats]:
        """Stats for one job (empty list if unknown: callers poll before workers create it) or all."""
        with self._lock:
            jobs = [self._jobs[j] for j in sorted(self._jobs) if job_id in (None, "", j)]
        return [j.stats() for j in jobs]
