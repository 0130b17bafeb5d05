"""One job's parameters and the rules deciding what a push does to them.

`JobState` is the only place that changes a job. Every public method takes the job's lock,
validates everything first and only then mutates, so a refused request leaves no trace
besides a `rejected_*` counter. The heavy part of a push (decoding and checking a payload
that may be tens of MB) runs outside the lock; the state change after it is re-validated.

Strategies (`spec.mode`): `sync` and `diloco` work in rounds; `async` and `adaptive` apply
each update on arrival if it is no staler than the worker's bound (see `staleness.py`).
DiLoCo's workers push pseudo-gradients and the job's optimizer is the outer one (SGD with
Nesterov momentum). With central DP (`dp_*` options) a round's updates are clipped and the
noisy mean replaces the aggregation rule, which must then be `mean`.

Rounds (sync and diloco): a round is the set of updates computed on the current version. It opens
with its first update and closes when every current member has contributed, when its
straggler timeout expires (with whoever pushed), or when a membership change leaves no one
outstanding. Closing aggregates, steps the optimizer and publishes version + 1.
With open membership (InitJob without members and no SetMembers yet) a worker joins by
pushing; pulls never join, so monitors can read parameters without blocking rounds.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_llm_train.paramserver import validation as v
from dist_llm_train.paramserver.jobopts import parse_options
from dist_llm_train.paramserver.numerics import (
    FALLBACK_RULE,
    Aggregator,
    Buffer,
    decode_update,
    fallback_aggregator,
    make_aggregator,
)
from dist_llm_train.paramserver.observer import NULL_OBSERVER, StoreObserver
from dist_llm_train.paramserver.optim import ServerOptimizer, make_optimizer
from dist_llm_train.paramserver.snapshot import JobSnapshot
from dist_llm_train.paramserver.staleness import step_scale
from dist_llm_train.paramserver.types import (
    ErrorCode,
    JobSpec,
    JobStats,
    PSError,
    PushHeader,
    PushOutcome,
    PushResult,
    TensorSpec,
)
from dist_llm_train.paramserver.waiters import VersionWaiters

log = logging.getLogger(__name__)
__all__ = ["JobSnapshot", "JobState"]  # JobSnapshot is re-exported: checkpoints and tests import it from here

REPLAY_WINDOW = 1024  # (worker, step) pairs remembered per worker for replay detection


@dataclass
class _Round:
    base_version: int
    opened_at: float
    updates: dict[str, np.ndarray] = field(default_factory=dict)


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


class JobState:
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
        self.layout = list(layout)
        self.num_params = int(params.shape[0])
        self.params = _frozen(np.array(params, dtype=np.float32, copy=True))
        self.version = 0
        self.members: list[str] = list(members)
        self.open_membership = not self.members
        self.counters: Counter[str] = Counter()
        self.last_loss = 0.0
        self.optimizer: ServerOptimizer = make_optimizer(spec, self.num_params)
        self.aggregator: Aggregator = make_aggregator(spec.aggregation, spec.aggregation_params)
        options = parse_options(spec)
        self.staleness_scaling = options.staleness_scaling
        self.policy = options.policy(spec)
        self.central_dp = options.central_dp()
        self.rounds = spec.mode in v.ROUND_MODES
        self._seen: dict[str, OrderedDict[int, None]] = {}
        self._round: _Round | None = None
        self._clock = clock
        self._obs = observer
        self._lock = threading.Lock()
        self.waiters = VersionWaiters(self._lock)
        self.on_version: Callable[[JobState], None] | None = None  # e.g. checkpoint scheduling

    @staticmethod
    def validated(
        spec: JobSpec, layout: Sequence[TensorSpec], params: np.ndarray, members: Sequence[str]
    ) -> None:
        """Raise PSError for anything that would make a bad job; no side effects."""
        v.check_spec(spec)
        if params.ndim != 1:
            raise v.invalid(f"params must be a flat vector, got shape {params.shape}")
        v.check_layout(layout, int(params.shape[0]))
        v.check_members(members)
        parse_options(spec)
        if not np.isfinite(params).all():
            raise v.invalid("initial params contain NaN or Inf")
        make_optimizer(spec, int(params.shape[0]))
        make_aggregator(spec.aggregation, spec.aggregation_params)

    # -- reading ---------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.version >= self.spec.total_steps

    def read(self) -> tuple[int, np.ndarray, bool]:
        with self._lock:
            self.counters["pulls"] += 1
            self.counters["params_bytes_sent"] += 4 * self.num_params
            return self.version, self.params, self.complete

    def reached(self, min_version: int) -> bool:
        return self.version >= min_version or self.complete

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
                workers=self.policy.stats(),
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

    def precheck(self, header: PushHeader) -> None:
        """What can be refused from the header alone, before the payload is read."""
        want = v.KIND_OF_MODE[self.spec.mode]
        if header.kind != want:
            raise v.invalid(f"a {self.spec.mode} job takes {want} updates, got kind={header.kind!r}")
        with self._lock:
            self.check_member(header.worker_id)

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        """Decode outside the lock (it is the slow part), then decide and apply under it.

        Rejections are counted by the store, which sees every PSError leaving a job."""
        self.precheck(header)
        vec = decode_update(header.codec, header.codec_meta, payload, self.num_params)
        with self._lock:
            result = self._apply_locked(header, vec)
            self.counters[f"pushes_{result.outcome.value.lower()}"] += 1
            # Wire bytes per class: every update that arrived, by kind, and its uncompressed size.
            self.counters[f"bytes_received_{header.kind}"] += len(payload)
            self.counters[f"raw_bytes_{header.kind}"] += 4 * self.num_params
            if result.outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED):
                self.counters["bytes_received"] += len(payload)
            if result.outcome is not PushOutcome.DUPLICATE:
                self.policy.record(header.worker_id, result.outcome, result.staleness)
            bound = self.policy.bound(header.worker_id)
        self._obs.push_outcome(self.spec.job_id, result.outcome)
        self._obs.worker_push(self.spec.job_id, header.worker_id, result.outcome, bound)
        self._obs.update_bytes(self.spec.job_id, header.kind, header.codec, len(payload))
        return result

    def _apply_locked(self, header: PushHeader, vec: np.ndarray) -> PushResult:
        self.check_member(header.worker_id)  # membership may have changed while decoding
        staleness = self.version - header.base_version
        if self.complete:
            return PushResult(PushOutcome.JOB_COMPLETE, self.version, staleness, "job reached total_steps")
        seen = self._seen.get(header.worker_id)
        if seen is not None and header.step in seen:
            return PushResult(
                PushOutcome.DUPLICATE,
                self.version,
                staleness,
                f"step {header.step} of {header.worker_id!r} was already received",
            )
        if staleness < 0:
            raise v.invalid(
                f"base_version {header.base_version} is ahead of the server's version {self.version}"
            )
        self.policy.observe_push(header.worker_id, self._clock())
        push = self._sync_push if self.rounds else self._async_push
        result = push(header, vec, staleness)
        if result.outcome is not PushOutcome.DUPLICATE:
            self._remember(header.worker_id, header.step)
        return result

    def _remember(self, worker_id: str, step: int) -> None:
        seen = self._seen.setdefault(worker_id, OrderedDict())
        seen[step] = None
        while len(seen) > REPLAY_WINDOW:
            seen.popitem(last=False)

    def _join(self, worker_id: str) -> None:
        if self.open_membership and worker_id not in self.members:
            self.members.append(worker_id)
            self._obs.members(self.spec.job_id, len(self.members))

    def _sync_push(self, header: PushHeader, vec: np.ndarray, staleness: int) -> PushResult:
        if staleness > 0:
            return PushResult(
                PushOutcome.LATE_DROPPED,
                self.version,
                staleness,
                f"round {header.base_version} already closed; pull version {self.version}",
            )
        rnd = self._round
        if rnd is not None and header.worker_id in rnd.updates:
            return PushResult(
                PushOutcome.DUPLICATE,
                self.version,
                0,
                f"{header.worker_id!r} already contributed to round {self.version}",
            )
        if rnd is None:
            rnd = self._round = _Round(self.version, self._clock())
        rnd.updates[header.worker_id] = vec
        self.last_loss = header.loss
        self._join(header.worker_id)
        if self._round_done():
            self._close_round(timed_out=False)
            return PushResult(PushOutcome.APPLIED, self.version, 0, "round closed")
        return PushResult(
            PushOutcome.BUFFERED, self.version, 0, f"waiting for {len(self._outstanding())} more member(s)"
        )

    def _async_push(self, header: PushHeader, vec: np.ndarray, staleness: int) -> PushResult:
        bound = self.policy.bound(header.worker_id, self._clock())
        if staleness > bound:
            return PushResult(
                PushOutcome.STALE_REJECTED,
                self.version,
                staleness,
                f"staleness {staleness} > this worker's bound {bound} ({self.spec.mode}); re-pull",
            )
        self._join(header.worker_id)
        scale = step_scale(self.staleness_scaling, staleness)
        self.last_loss = header.loss
        if self.central_dp is not None:
            vec = self._private_mean(vec[None, :])
        self._publish(self.optimizer.step(self.params, vec, scale))
        self.counters["updates_aggregated"] += 1
        return PushResult(PushOutcome.APPLIED, self.version, staleness)

    # -- rounds ----------------------------------------------------------------------
    def _outstanding(self) -> list[str]:
        rnd = self._round
        done = rnd.updates if rnd is not None else {}
        return [m for m in self.members if m not in done]

    def _round_done(self) -> bool:
        return self._round is not None and bool(self._round.updates) and not self._outstanding()

    def _close_round(self, timed_out: bool) -> None:
        rnd = self._round
        assert rnd is not None and rnd.updates
        updates = list(rnd.updates.values())
        combined: np.ndarray
        if self.central_dp is not None:  # noisy mean of clipped updates replaces the (mean) rule
            combined = self._private_mean(np.stack(updates))
        elif len(updates) == 1:  # every rule returns a lone update unchanged
            combined = updates[0]
        else:
            stacked = np.stack(updates)
            try:
                combined = self.aggregator.aggregate(stacked)
            except ValueError as err:
                log.warning("job %s: %s; this round uses the %s", self.spec.job_id, err, FALLBACK_RULE)
                self.counters[f"aggregation_fallback_{FALLBACK_RULE}"] += 1
                combined = fallback_aggregator().aggregate(stacked)
        self._publish(self.optimizer.step(self.params, np.asarray(combined, dtype=np.float32)))
        self._round = None
        self.counters["rounds_closed"] += 1
        self.counters["updates_aggregated"] += len(updates)
        if timed_out:
            self.counters["rounds_timed_out"] += 1
        self._obs.round_closed(self.spec.job_id, self._clock() - rnd.opened_at)

    def _private_mean(self, stacked: np.ndarray) -> np.ndarray:
        assert self.central_dp is not None
        clipped_before = self.central_dp.clipped
        out = self.central_dp.noisy_mean(stacked)
        self.counters["dp_releases"] += 1
        self.counters["dp_clipped_updates"] += self.central_dp.clipped - clipped_before
        return out

    def _publish(self, new_params: np.ndarray) -> None:
        self.params = _frozen(new_params.astype(np.float32, copy=False))
        self.version += 1
        self._obs.version(self.spec.job_id, self.version)
        self.waiters.notify_locked()
        if self.on_version is not None:
            self.on_version(self)

    def round_size(self) -> int:
        """Updates buffered in the open sync round (a racy read is fine: it only sizes work)."""
        rnd = self._round
        return 0 if rnd is None else len(rnd.updates)

    def round_deadline(self) -> float | None:
        rnd = self._round
        return None if rnd is None else rnd.opened_at + self.spec.straggler_timeout_s

    def expire(self, now: float) -> bool:
        """Close the open round if its straggler timeout passed; True when it did."""
        with self._lock:
            deadline = self.round_deadline()
            if deadline is None or now < deadline or self._round is None or not self._round.updates:
                return False
            log.info(
                "job %s: round %d timed out waiting for %s",
                self.spec.job_id,
                self.version,
                self._outstanding(),
            )
            self._close_round(timed_out=True)
            return True

    # -- membership ------------------------------------------------------------------
    def set_members(self, members: list[str]) -> tuple[int, list[str]]:
        with self._lock:
            self.members = list(members)
            self.open_membership = False
            self._obs.members(self.spec.job_id, len(self.members))
            if self.rounds and self._round_done():
                self._close_round(timed_out=False)
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
            seen_steps={w: list(s) for w, s in self._seen.items()},
        )

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self.snapshot_locked()

    @classmethod
    def restore(cls, snap: JobSnapshot, clock: Callable[[], float], observer: StoreObserver) -> JobState:
        job = cls(snap.spec, snap.layout, snap.params, snap.members, clock, observer)
        job.open_membership = snap.open_membership
        job.version = snap.version
        job.counters.update(snap.counters)
        job.last_loss = snap.last_loss
        job.optimizer.load_state_dict(snap.optimizer_arrays, snap.optimizer_scalars)
        for worker, steps in snap.seen_steps.items():
            for step in steps[-REPLAY_WINDOW:]:
                job._remember(worker, step)
        return job
