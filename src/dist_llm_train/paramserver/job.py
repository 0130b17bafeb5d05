"""The parameter server's job logic: one job's parameters and every rule deciding what a request does.

Read top to bottom: request checks (pure functions, no side effects) → what a job reports to
metrics (`StoreObserver`) → how pulls wait for a version (`VersionWaiters`) → one job
(`JobState`) → every job behind one thread-safe API (`ParameterStore`), which both transports
(gRPC and ZMQ, `paramserver.transport`) call, so their semantics cannot drift.

`JobState` is the only place that changes a job. Every public method takes the job's lock,
validates everything first and only then mutates, so a refused request leaves no trace
besides a `rejected_*` counter. The heavy part of a push (decoding and checking a payload
that may be tens of MB) runs outside the lock; the state change after it is re-validated.

What a push does and when a version closes belongs to the job's training strategy
(`core.strategies`): the job asks it for a `VersionRule` (a round barrier for sync and DiLoCo,
a staleness gate for async and adaptive, a staleness-weighted buffer for buffered_async) and
offers the rule a `JobView` — aggregate with the job's rule, step the optimizer and publish.
Central DP is an aggregation rule wrapping the mean (`core.privacy.PrivateMean`), not a branch
here. The job itself keeps what every strategy shares: versions, members, the optimizer,
counters, per-worker records and replay protection.
With open membership (InitJob without members and no SetMembers yet) a worker joins by
pushing; pulls never join, so monitors can read parameters without blocking rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from dist_llm_train.core.aggregation import FALLBACK_RULE, Aggregator, get_aggregator
from dist_llm_train.core.downlink import DIGEST_BYTES, DeltaReply, DownlinkPublisher
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.privacy import private_aggregator
from dist_llm_train.core.strategies import UPDATE_KINDS, Strategy, VersionRule, WorkerLedger, build_strategy
from dist_llm_train.core.types import (
    ErrorCode,
    InitResult,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushOutcome,
    PushResult,
    TensorSpec,
)
from dist_llm_train.core.update_bound import UpdateBound, l2_norm
from dist_llm_train.paramserver.numerics import Buffer, all_finite, decode_update
from dist_llm_train.paramserver.optim import ServerOptimizer, make_optimizer

log = logging.getLogger(__name__)



# -- request checks: each raises PSError(INVALID_ARGUMENT) naming the field, with no side effects ----------
# Job ids become checkpoint file names, so they are restricted to a filename-safe alphabet.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_NAME_LEN = 256
MAX_MEMBERS = 100_000
MAX_WAIT_S = 3600.0


def invalid(message: str) -> PSError:
    return PSError(ErrorCode.INVALID_ARGUMENT, message)


def check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise invalid(f"job_id {job_id!r} must match {JOB_ID_RE.pattern}")


def check_worker_id(worker_id: str, field: str = "worker_id") -> None:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > MAX_NAME_LEN:
        raise invalid(f"{field} must be a non-empty string of at most {MAX_NAME_LEN} characters")


def check_layout(layout: Sequence[TensorSpec], num_params: int) -> None:
    """Every tensor lies inside the vector, names are unique and tensors do not overlap."""
    if num_params < 1:
        raise invalid(f"num_params must be >= 1, got {num_params}")
    if not layout:
        raise invalid("layout must name at least one tensor")
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for t in layout:
        if not t.name or len(t.name) > MAX_NAME_LEN:
            raise invalid(f"layout tensor name {t.name!r} must be 1..{MAX_NAME_LEN} characters")
        if t.name in names:
            raise invalid(f"layout names tensor {t.name!r} twice")
        names.add(t.name)
        if any(d < 0 for d in t.shape):
            raise invalid(f"layout tensor {t.name!r} has a negative dimension {t.shape}")
        if t.offset < 0 or t.offset + t.size > num_params:
            raise invalid(
                f"layout tensor {t.name!r} [{t.offset}, {t.offset + t.size}) lies outside "
                f"the {num_params}-element vector"
            )
        spans.append((t.offset, t.offset + t.size, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise invalid(f"layout tensors {a!r} and {b!r} overlap")


def check_members(members: Iterable[str]) -> list[str]:
    """Validate and de-duplicate (keeping first-seen order)."""
    out: list[str] = []
    seen: set[str] = set()
    for m in members:
        check_worker_id(m, "members[]")
        if m not in seen:
            seen.add(m)
            out.append(m)
    if len(out) > MAX_MEMBERS:
        raise invalid(f"at most {MAX_MEMBERS} members")
    return out


def check_header(h: PushHeader) -> None:
    check_job_id(h.job_id)
    check_worker_id(h.worker_id)
    if h.step < 0:
        raise invalid(f"step must be >= 0, got {h.step}")
    if h.base_version < 0:
        raise invalid(f"base_version must be >= 0, got {h.base_version}")
    if h.payload_bytes < 0 or h.num_samples < 0:
        raise invalid("payload_bytes and num_samples must be >= 0")
    if h.kind not in UPDATE_KINDS:
        raise invalid(f"kind must be one of {UPDATE_KINDS}, got {h.kind!r}")
    if not isinstance(h.loss, int | float) or not np.isfinite(h.loss):
        raise invalid(f"loss must be a finite number, got {h.loss!r}")


def check_wait(min_version: int, wait_timeout_s: float) -> float:
    if min_version < 0:
        raise invalid(f"min_version must be >= 0, got {min_version}")
    if not isinstance(wait_timeout_s, int | float) or not np.isfinite(wait_timeout_s) or wait_timeout_s < 0:
        raise invalid(f"wait_timeout_s must be a finite number >= 0, got {wait_timeout_s!r}")
    return min(float(wait_timeout_s), MAX_WAIT_S)


def check_have(have_epoch: int, have_version: int, have_digest: bytes = b"") -> None:
    if not isinstance(have_digest, bytes) or len(have_digest) not in (0, DIGEST_BYTES):
        raise invalid(f"have_digest must be empty or {DIGEST_BYTES} bytes, got {have_digest!r:.80}")
    if not isinstance(have_epoch, int) or not 0 <= have_epoch < 1 << 63:
        raise invalid(f"have_epoch must be an integer in [0, 2^63), got {have_epoch!r}")
    if not isinstance(have_version, int) or not 0 <= have_version < 1 << 62:
        raise invalid(f"have_version must be an integer in [0, 2^62), got {have_version!r}")


def build_aggregator(spec: JobSpec) -> Aggregator:
    """The job's aggregation rule, wrapped by central DP when the job has it."""
    try:
        rule = get_aggregator(spec.aggregation, **spec.aggregation_params)
        if spec.privacy is not None:
            return private_aggregator(rule, spec.privacy, spec.privacy_seed)
        return rule
    except (ValueError, TypeError) as err:
        raise invalid(f"aggregation: {err}") from None


# -- what a job reports as it works (`metrics.PSMetrics` turns it into Prometheus series) -----------------
class StoreObserver:
    """No-op base: override what you need. Called with the job lock held, so keep it cheap."""

    def push_outcome(self, job_id: str, outcome: PushOutcome) -> None:
        pass

    def round_closed(self, job_id: str, seconds: float) -> None:
        pass

    def version(self, job_id: str, version: int) -> None:
        pass

    def members(self, job_id: str, count: int) -> None:
        pass

    def worker_push(self, job_id: str, worker_id: str, outcome: PushOutcome, staleness_bound: int) -> None:
        """One worker's push was decided; `staleness_bound` is the bound its next push is held to."""

    def update_bytes(self, job_id: str, kind: str, codec: str, nbytes: int) -> None:
        """Payload bytes of one received update, by kind (gradient / pseudo_gradient) and codec."""


NULL_OBSERVER = StoreObserver()


# -- waiting for a version -----------------------------------------------------------------------------
def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class VersionWaiters:
    """Wake pulls that wait for a version, whether they block a thread or await on a loop.

    The servers wait with asyncio (a waiting sync worker must not pin an executor thread: a barrier
    of N workers would starve the pool), while pushes that publish a new version run in executor
    threads. So publishing notifies both a `threading.Condition` and any registered asyncio futures,
    each through its own loop's `call_soon_threadsafe`.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def notify_locked(self) -> None:
        """Call with the lock held after the version (or completion) changed."""
        self._cond.notify_all()
        futures, self._futures = self._futures, []
        for loop, fut in futures:
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(_wake, fut)

    def wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Block the calling thread until ready() (checked under the lock) or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    async def wait_async(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Await until ready() or the timeout, without holding a thread."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if ready():
                    return
                self._futures.append((loop, fut))
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    return
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return
            finally:
                with self._lock:
                    self._futures = [(lp, f) for lp, f in self._futures if f is not fut]


# -- one job -------------------------------------------------------------------------------------------
@dataclass
class JobSnapshot:
    """What a checkpoint holds: one job at one version. Arrays are shared references never mutated."""

    spec: JobSpec
    layout: list[TensorSpec]
    params: np.ndarray
    version: int
    members: list[str]
    open_membership: bool  # True until SetMembers: workers join by pushing
    counters: dict[str, int]
    last_loss: float
    optimizer_arrays: dict[str, np.ndarray]
    optimizer_scalars: dict[str, float | int]
    # Replay protection: each worker's highest push step, as a one-element list (older checkpoints held the
    # last 1,024 steps; their maximum is the same mark).
    seen_steps: dict[str, list[int]] = field(default_factory=dict)
    aggregator_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # a stateful rule's (centered clipping)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


class JobState:
    """One job. Implements `core.strategies.JobView` for its strategy's version rule."""

    def __init__(
        self,
        spec: JobSpec,
        layout: Sequence[TensorSpec],
        params: np.ndarray,
        members: Sequence[str],
        clock: Callable[[], float],
        observer: StoreObserver = NULL_OBSERVER,
    ) -> None:
        """Arguments must already be validated (see `validated`); params is copied."""
        self.spec = spec
        self.strategy: Strategy = build_strategy(spec.strategy)
        self.rule: VersionRule = self.strategy.version_rule()
        self.layout = list(layout)
        self.num_params = int(params.shape[0])
        self.params = _frozen(np.array(params, dtype=np.float32, copy=True))
        self.version = 0
        self.members: list[str] = list(members)
        self.open_membership = not self.members
        self.counters: Counter[str] = Counter()
        self.last_loss = 0.0
        self.optimizer: ServerOptimizer = make_optimizer(spec.optimizer, self.num_params)
        self.aggregator = build_aggregator(spec)
        self.ledger = WorkerLedger()
        self.update_bound = UpdateBound(spec.update_bound)
        # Replay protection: the highest step each worker has pushed. Worker steps only grow (a restarted
        # worker starts from its start time in ms x 10^6), so any step at or below the mark is a replay,
        # however long ago the original was: no window to outlive.
        self._high_water: dict[str, int] = {}
        self._clock = clock
        self._obs = observer
        self._lock = threading.Lock()
        self.waiters = VersionWaiters(self._lock)
        self.on_version: Callable[[JobState], None] | None = None  # e.g. checkpoint scheduling
        # Pulls as deltas (`core.downlink`): compressed ones with a downlink codec (workers hold the published
        # θ̂, not θ), lossless slices for a strategy whose versions change one region (Streaming DiLoCo).
        regional = self.strategy.region(0, self.num_params) is not None
        self.downlink: DownlinkPublisher | None = None
        if spec.downlink is not None or regional:
            codec = spec.downlink.build() if spec.downlink is not None else None
            self.downlink = DownlinkPublisher(codec, self.params, self.version)

    @staticmethod
    def validated(spec: JobSpec, layout: Sequence[TensorSpec], params: np.ndarray, members: Sequence[str]) -> None:
        """Raise PSError for anything that would make a bad job; no side effects."""
        check_job_id(spec.job_id)
        if params.ndim != 1:
            raise invalid(f"params must be a flat vector, got shape {params.shape}")
        check_layout(layout, int(params.shape[0]))
        check_members(members)
        if not np.isfinite(params).all():
            raise invalid("initial params contain NaN or Inf")
        make_optimizer(spec.optimizer, int(params.shape[0]))
        build_aggregator(spec)

    # -- reading ---------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.version >= self.spec.total_steps

    def read(self, have_epoch: int = 0, have_version: int = 0, have_digest: bytes = b"") -> PulledParams:
        """What a pull sends: for a job that publishes deltas (a downlink codec, or a strategy with regions),
        the deltas from what the caller holds when the job still has them (`delta`), else the published
        parameters in full. A caller without a lineage may name what it holds by `have_digest` (the
        parameters it initialised itself, `core.downlink.params_digest`)."""
        with self._lock:
            self.counters["pulls"] += 1
            dl = self.downlink
            delta: DeltaReply | None = None
            if dl is not None and have_epoch:
                delta = dl.since(have_epoch, have_version)
            elif dl is not None and have_digest:
                delta = dl.since_digest(have_digest)
            if delta is not None:
                self.counters["pulls_delta"] += 1
                self.counters["params_delta_bytes_sent"] += delta.nbytes
            else:
                self.counters["params_bytes_sent"] += 4 * self.num_params
            return PulledParams(
                version=self.version,
                params=self.published,
                layout=list(self.layout),
                job_complete=self.complete,
                epoch=0 if dl is None else dl.epoch,
                delta=delta,
            )

    @property
    def published(self) -> np.ndarray:
        """The parameters workers hold: θ̂ with a downlink codec, else θ itself (read-only)."""
        return self.params if self.downlink is None else self.downlink.published

    def reached(self, min_version: int) -> bool:
        return self.version >= min_version or self.complete

    def staleness_bound(self, worker_id: str) -> int:
        return self.strategy.staleness_bound(worker_id, self.ledger, self._clock())

    def stats(self) -> JobStats:
        with self._lock:
            return JobStats(
                job_id=self.spec.job_id,
                version=self.version,
                mode=self.spec.mode,
                members=list(self.members),
                counters=dict(self.counters),
                last_loss=self.last_loss,
                complete=self.complete,
                num_params=self.num_params,
                workers=self.ledger.stats(lambda w: self.strategy.staleness_bound(w, self.ledger, None)),
            )

    def same_shape(self, layout: Sequence[TensorSpec], num_params: int) -> bool:
        return num_params == self.num_params and list(layout) == self.layout

    # -- pushing ---------------------------------------------------------------------
    def check_member(self, worker_id: str) -> None:
        if not self.open_membership and worker_id not in self.members:
            raise PSError(
                ErrorCode.PERMISSION_DENIED,
                f"worker {worker_id!r} is not a member of job {self.spec.job_id!r}",
            )

    def count_rejection(self, err: PSError) -> None:
        with self._lock:
            self.counters[f"rejected_{err.code.value.lower()}"] += 1

    def update_size(self, base_version: int) -> int:
        """Elements of an update computed on `base_version`: the strategy's region of it, or the whole vector."""
        region = self.strategy.region(base_version, self.num_params)
        return self.num_params if region is None else region.stop - region.start

    def precheck(self, header: PushHeader) -> None:
        """What can be refused from the header alone, before the payload is read."""
        want = self.strategy.update_kind
        if header.kind != want:
            raise invalid(f"a {self.spec.mode} job takes {want} updates, got kind={header.kind!r}")
        with self._lock:
            self.check_member(header.worker_id)

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        """Decode outside the lock (it is the slow part), then decide and apply under it.

        Rejections are counted by the store, which sees every PSError leaving a job."""
        self.precheck(header)
        size = self.update_size(header.base_version)
        vec = decode_update(header.codec, header.codec_meta, payload, size)
        norm = l2_norm(vec) if self.spec.update_bound.enabled else 0.0  # the slow part of bounding it: unlocked
        with self._lock:
            result = self._decide_locked(header, vec, norm)
            self.counters[f"pushes_{result.outcome.value.lower()}"] += 1
            # Wire bytes per class: every update that arrived, by kind, and its uncompressed size.
            self.counters[f"bytes_received_{header.kind}"] += len(payload)
            self.counters[f"raw_bytes_{header.kind}"] += 4 * size
            if result.outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED):
                self.counters["bytes_received"] += len(payload)
            if result.outcome is not PushOutcome.DUPLICATE:
                self.ledger.record(header.worker_id, result.outcome, result.staleness)
            bound = self.staleness_bound(header.worker_id)
        self._obs.push_outcome(self.spec.job_id, result.outcome)
        self._obs.worker_push(self.spec.job_id, header.worker_id, result.outcome, bound)
        self._obs.update_bytes(self.spec.job_id, header.kind, header.codec, len(payload))
        return result

    def _decide_locked(self, header: PushHeader, vec: np.ndarray, norm: float) -> PushResult:
        self.check_member(header.worker_id)  # membership may have changed while decoding
        staleness = self.version - header.base_version
        if self.complete:
            return PushResult(PushOutcome.JOB_COMPLETE, self.version, staleness, "job reached total_steps")
        mark = self._high_water.get(header.worker_id)
        if mark is not None and header.step <= mark:
            return PushResult(
                PushOutcome.DUPLICATE,
                self.version,
                staleness,
                f"step {header.step} of {header.worker_id!r} is not above its last received step {mark}: a replay",
            )
        if staleness < 0:
            raise PSError(
                ErrorCode.ABORTED,
                f"base_version {header.base_version} is ahead of the server's version {self.version} "
                "(restarted from a checkpoint?): pull again",
            )
        vec, norm = self._bounded(vec, norm)
        now = self._clock()
        self.ledger.observe_push(header.worker_id, now)
        result = self.rule.on_update(self, header.worker_id, vec, staleness, now)
        if result.outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED):
            self.last_loss = header.loss
            if self.spec.update_bound.enabled:
                self.update_bound.record(norm)
        if result.outcome is not PushOutcome.DUPLICATE:
            self._remember(header.worker_id, header.step)
        return result

    def _remember(self, worker_id: str, step: int) -> None:
        """Raise the worker's replay mark to `step` (its decided pushes only ever raise it)."""
        self._high_water[worker_id] = max(step, self._high_water.get(worker_id, step))

    def replayed(self, worker_id: str, step: int) -> bool:
        """True when a push of `step` from this worker is at or below its mark: already received."""
        mark = self._high_water.get(worker_id)
        return mark is not None and step <= mark

    def _bounded(self, vec: np.ndarray, norm: float) -> tuple[np.ndarray, float]:
        """The update clipped to the job's per-update bound (`core.update_bound`), and its norm after."""
        if not self.spec.update_bound.enabled:
            return vec, norm
        params_norm = l2_norm(self.params) if self.update_bound.seen < self.spec.update_bound.warmup else 0.0
        bound = self.update_bound.bound(params_norm)
        vec, clipped = self.update_bound.clip(vec, norm, bound)
        if clipped:
            self.counters["updates_clipped"] += 1
            return vec, bound
        return vec, norm

    # -- JobView: what the strategy's version rule may do ------------------------------
    def join(self, worker_id: str) -> None:
        if self.open_membership and worker_id not in self.members:
            self.members.append(worker_id)
            self._obs.members(self.spec.job_id, len(self.members))

    def aggregate(self, updates: np.ndarray) -> np.ndarray:
        """The job's rule on one round's updates; a round the rule is not defined for is recorded and uses the
        fallback (`aggregation_health` reads the record): a short round (fewer updates than members, e.g. after
        a straggler timeout) counts in `aggregation_rounds_short` with its version, and when the rule's
        precondition fails for it (Krum's n' >= 2f+3, trimmed mean's n' >= 2f+1 ...) the round is aggregated
        by the coordinate-wise median instead, counted in `aggregation_fallback_median` with its version."""
        n = int(updates.shape[0])
        # Only a round barrier plans on one update per member; asynchronous rules aggregate what they buffered.
        if self.strategy.rounds and not self.open_membership and 0 < n < len(self.members):
            self.counters["aggregation_rounds_short"] += 1
            self.counters["aggregation_last_short_version"] = self.version + 1
            self.counters["aggregation_last_short_updates"] = n
        if n == 1 and not self.aggregator.transforms_single:
            return updates[0]  # every plain rule returns a lone update unchanged: skip the copy
        before = self.aggregator.counts()
        try:
            combined = self.aggregator.aggregate(updates)
        except ValueError as err:  # e.g. Krum after a straggler timeout left fewer than 2f+3 updates
            log.warning("job %s: %s; this round uses the %s", self.spec.job_id, err, FALLBACK_RULE)
            self.counters[f"aggregation_fallback_{FALLBACK_RULE}"] += 1
            self.counters["aggregation_last_fallback_version"] = self.version + 1
            self.counters["aggregation_last_fallback_updates"] = n
            combined = get_aggregator(FALLBACK_RULE).aggregate(updates)
        for key, value in self.aggregator.counts().items():
            self.counters[key] += value - before.get(key, 0)
        return np.asarray(combined, dtype=np.float32)

    def apply(self, update: np.ndarray, count: int, lr_scale: float = 1.0) -> None:
        """Step the optimizer and publish a version; refused (PSError, nothing changed) if the step would
        leave the parameters or the optimizer's state non-finite (e.g. Adam's second moment overflowing)."""
        region = self.strategy.region(self.version, self.num_params)
        before = self.optimizer.state_dict()  # references: the optimizer never writes its arrays in place
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is checked for (and refused) below
            if region is None:
                new_params = self.optimizer.step(self.params, update, lr_scale)
            else:
                new_params = self.optimizer.step_region(self.params, update, region, lr_scale)
        new_params = new_params.astype(np.float32, copy=False)
        broken = [] if all_finite(new_params) else ["parameters"]
        broken += [f"optimizer {name}" for name, arr in self.optimizer.state_dict()[0].items() if not all_finite(arr)]
        if broken:
            self.optimizer.load_state_dict(*before)
            self.counters["versions_refused_nonfinite"] += 1
            raise invalid(
                f"refused: this update would make the job's {' and '.join(broken)} non-finite (float32 overflow); "
                f"version {self.version} and the optimizer state are unchanged"
            )
        self.params = _frozen(new_params)
        self.version += 1
        if self.downlink is not None:
            self.downlink.publish(self.params, self.version, region)
        self.counters["updates_aggregated"] += count
        self._obs.version(self.spec.job_id, self.version)
        self.waiters.notify_locked()
        if self.on_version is not None:
            self.on_version(self)

    def round_closed(self, duration_s: float, timed_out: bool) -> None:
        self.counters["rounds_closed"] += 1
        if timed_out:
            self.counters["rounds_timed_out"] += 1
        self._obs.round_closed(self.spec.job_id, duration_s)

    # -- deadlines and membership ----------------------------------------------------
    def round_size(self) -> int:
        """Updates buffered towards the next version (a racy read is fine: it only sizes work)."""
        return self.rule.pending_updates()

    def round_deadline(self) -> float | None:
        return self.rule.deadline()

    def expire(self, now: float) -> bool:
        """Close whatever waited past its deadline (a round's straggler timeout); True when it did."""
        with self._lock:
            deadline = self.rule.deadline()
            if deadline is None or now < deadline:
                return False
            log.info("job %s: round %d timed out", self.spec.job_id, self.version)
            try:
                return self.rule.expire(self, now)
            except PSError as err:  # the round's aggregate was refused: it is dropped, the version stays
                log.error("job %s: round %d dropped: %s", self.spec.job_id, self.version, err.message)
                return True

    def set_members(self, members: list[str]) -> tuple[int, list[str]]:
        with self._lock:
            self.members = list(members)
            self.open_membership = False
            self._obs.members(self.spec.job_id, len(self.members))
            before = self.version
            try:
                self.rule.members_changed(self, self._clock())
            except PSError as err:  # as in `expire`: the round is dropped, membership still changes
                log.error("job %s: round %d dropped: %s", self.spec.job_id, self.version, err.message)
            if self.version != before:  # a member left and nobody else was outstanding: the round closed short
                self.counters["rounds_closed_by_membership"] += 1
            return self.version, list(self.members)

    # -- checkpoints -----------------------------------------------------------------
    def snapshot_locked(self) -> JobSnapshot:
        arrays, scalars = self.optimizer.state_dict()
        return JobSnapshot(
            spec=self.spec,
            layout=list(self.layout),
            params=self.params,
            version=self.version,
            members=list(self.members),
            open_membership=self.open_membership,
            counters=dict(self.counters),
            last_loss=self.last_loss,
            optimizer_arrays=dict(arrays),
            optimizer_scalars=dict(scalars),
            seen_steps={w: [mark] for w, mark in self._high_water.items()},
            aggregator_arrays=self.aggregator.state_dict(),
        )

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self.snapshot_locked()

    @classmethod
    def restore(cls, snap: JobSnapshot, clock: Callable[[], float], observer: StoreObserver) -> JobState:
        job = cls(snap.spec, snap.layout, snap.params, snap.members, clock, observer)
        job.open_membership = snap.open_membership
        job.version = snap.version
        if job.downlink is not None:
            # A new lineage from the checkpoint (`__init__` drew a fresh epoch and set θ̂ = θ): every holder
            # re-pulls in full. It publishes on from the restored version.
            job.downlink.version = job.version
        job.counters.update(snap.counters)
        job.last_loss = snap.last_loss
        job.optimizer.load_state_dict(snap.optimizer_arrays, snap.optimizer_scalars)
        job._high_water = {w: max(steps) for w, steps in snap.seen_steps.items() if steps}
        job.aggregator.load_state_dict(snap.aggregator_arrays)
        return job


# -- every job behind one API ----------------------------------------------------------------------------
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
        check_job_id(spec.job_id)
        self._check_size(int(params.nbytes), "initial parameter vector")
        with self._lock:
            existing = self._jobs.get(spec.job_id)
        if existing is not None:
            return self._confirm(existing, layout, params)
        JobState.validated(spec, layout, params, members)
        job = JobState(spec, layout, params, check_members(members), self._clock, self._obs)
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
    def _pull_checked(
        self,
        job_id: str,
        min_version: int,
        wait_timeout_s: float,
        have_epoch: int,
        have_version: int,
        have_digest: bytes = b"",
    ) -> tuple[JobState, float]:
        """The job a pull reads and how long it may wait, every argument checked before anything waits."""
        wait = check_wait(min_version, wait_timeout_s)
        check_have(have_epoch, have_version, have_digest)
        return self._job(job_id), wait

    def pull(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have_epoch: int = 0,
        have_version: int = 0,
        have_digest: bytes = b"",
    ) -> PulledParams:
        """Current parameters, after waiting (bounded) for `min_version` or completion.

        A caller holding published parameters (`have_epoch`, `have_version`, from its last pull, or
        `have_digest` of parameters it made itself) may get deltas instead (`PulledParams.delta`, see
        `JobState.read`). The returned array is read-only and shared; it is never modified afterwards."""
        job, wait = self._pull_checked(job_id, min_version, wait_timeout_s, have_epoch, have_version, have_digest)
        if wait > 0:
            job.waiters.wait(lambda: job.reached(min_version), wait)
        return job.read(have_epoch, have_version, have_digest)

    async def pull_async(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have_epoch: int = 0,
        have_version: int = 0,
        have_digest: bytes = b"",
    ) -> PulledParams:
        job, wait = self._pull_checked(job_id, min_version, wait_timeout_s, have_epoch, have_version, have_digest)
        if wait > 0:
            await job.waiters.wait_async(lambda: job.reached(min_version), wait)
        return job.read(have_epoch, have_version, have_digest)

    # -- push ------------------------------------------------------------------------
    def _counted(self, header: PushHeader) -> JobState:
        check_job_id(header.job_id)
        return self._job(header.job_id)

    def precheck_push(self, header: PushHeader) -> None:
        """Refuse what the header alone shows to be bad, before the payload is transferred."""
        job = self._counted(header)
        try:
            check_header(header)
            self._check_size(header.payload_bytes, "payload")
            job.precheck(header)
        except PSError as err:
            job.count_rejection(err)
            raise

    def push_cost_bytes(self, header: PushHeader, nbytes: int) -> int:
        """Bytes of numpy work a push may cause: its payload, plus the buffered updates it may aggregate
        when it closes a version (a sync round, a buffered_async buffer)."""
        with self._lock:
            job = self._jobs.get(header.job_id)
        if job is None:
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
            check_header(header)
            self._check_size(len(payload), "payload")
            if header.payload_bytes != len(payload):
                raise invalid(f"header says payload_bytes={header.payload_bytes}, received {len(payload)}")
            return job.push(header, payload)
        except PSError as err:
            job.count_rejection(err)
            raise

    # -- membership, rounds, stats ---------------------------------------------------
    def set_members(self, job_id: str, members: Sequence[str]) -> tuple[int, list[str]]:
        """Replace the job's members (closing open membership). A sync round that now waits for
        no one closes at once. Returns (version, members)."""
        clean = check_members(members)
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
