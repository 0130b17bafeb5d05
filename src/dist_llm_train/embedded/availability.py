"""Churn of transient workers in an embedded run: an availability trace applied to real worker processes.

At each leave of the trace the worker's process group gets SIGKILL, as a preemption would: no goodbye and no
task given back, so the controller learns of it from heartbeat silence, as it would of a crash. At each join the
same `serve worker --name worker-<i>` command starts again and the worker registers under its old name. Times
are seconds after the job was submitted. One thread applies the events in time order; it waits on an event
that `stop` sets, so it ends with the run and never starts a worker after the launcher stopped its children.

What the run then reports (`availability_report`, the summary's `availability` block) is in
docs/simulation.md, "Churn of transient workers".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dist_llm_train.core.availability import JOIN, LEAVE, AvailabilityTrace
from dist_llm_train.core.types import JobStats

log = logging.getLogger(__name__)


@dataclass
class AppliedEvent:
    """One trace event as the launcher applied it."""

    worker: str
    action: str  # join | leave
    scheduled_s: float  # the trace's time, after job submission
    applied_s: float  # when the SIGKILL was sent or the process started, after job submission
    was_training: bool | None = None  # leave: the worker held a task of the job (None: could not ask)
    error: str | None = None


class AvailabilityDriver:
    """Applies `trace` with `start_worker(i)` and `kill_worker(i)`; `is_training(i)` is asked before a kill."""

    def __init__(
        self,
        trace: AvailabilityTrace,
        start_worker: Callable[[int], object],
        kill_worker: Callable[[int], None],
        is_training: Callable[[int], bool | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trace = trace
        self._start_worker, self._kill_worker, self._is_training = start_worker, kill_worker, is_training
        self._clock = clock
        self._events = trace.events()
        self._next = 0
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="availability", daemon=True)
        self.applied: list[AppliedEvent] = []

    def start(self, t0: float) -> None:
        """Apply the trace's events at `t0` + their times (`t0` on `clock`, the job's submission)."""
        self._t0 = t0
        self._thread.start()

    def joins_pending(self) -> bool:
        """Whether a worker is still to (re)join: the run may be down to no live worker and still go on."""
        return any(action == JOIN for _, _, action in self._events[self._next :])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Apply nothing more; wait for an event being applied (a start or a kill) to finish."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        for t, worker, action in self._events:
            if self._stop.wait(max(0.0, self._t0 + t - self._clock())):
                return
            event = AppliedEvent(f"worker-{worker}", action, t, 0.0)
            done: float | None = None
            try:
                if action == LEAVE:
                    done = self._clock()  # the SIGKILL goes out now; reaping the process may take a moment
                    self._kill_worker(worker)
                    # Asked after the kill, so the kill is on time: the controller has not noticed it yet.
                    event.was_training = self._is_training(worker)
                else:
                    self._start_worker(worker)
            except Exception as err:  # the run goes on; the report says what could not be applied
                log.warning("availability: could not %s worker-%d: %s", action, worker, err)
                event.error = f"{type(err).__name__}: {err}"
            event.applied_s = (done if done is not None else self._clock()) - self._t0
            self.applied.append(event)
            self._next += 1
            log.info("availability: worker-%d %s at %.2fs (trace: %.2fs)", worker, action, event.applied_s, t)


def availability_report(
    trace: AvailabilityTrace,
    applied: Sequence[AppliedEvent],
    duration_s: float,
    stats: JobStats | None,
    rows: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The run summary's `availability` block.

    goodput = compute seconds of the updates the PS took / worker-seconds the trace offered during the job
    (`duration_s`, submission to end). The PS counts what it took per worker; each is weighed by that worker's
    mean measured `compute_time_s` (the telemetry row of a worker's last step before a kill dies with it, so
    counting rows would miss taken updates). A leave that hit a worker holding a task loses at most the step it
    was on: none if it was waiting at a sync barrier, which the launcher cannot see from outside, so
    `updates_lost_to_leaves` is an upper bound."""
    accepted = {w.worker_id: w.accepted for w in stats.workers} if stats is not None else {}
    compute: dict[str, list[float]] = {}
    for r in rows:
        if r.get("compute_time_s") is not None and r.get("worker_id"):
            compute.setdefault(str(r["worker_id"]), []).append(float(r["compute_time_s"]))
    accepted_compute = sum(
        n * (sum(compute[w]) / len(compute[w])) for w, n in accepted.items() if compute.get(w)
    )
    offered = trace.offered_s(duration_s)
    leaves = [e for e in applied if e.action == LEAVE and e.error is None]
    joins = [e for e in applied if e.action == JOIN and e.error is None]
    lateness = [e.applied_s - e.scheduled_s for e in applied if e.error is None]
    counters = stats.counters if stats is not None else {}
    lost = sum(1 for e in leaves if e.was_training)
    return {
        "trace": trace.describe(),
        "events": [asdict(e) for e in applied],
        "events_not_reached": len(trace.events()) - len(applied),  # after the job ended
        "leaves": len(leaves),
        "joins": len(joins),
        "max_lateness_s": max(lateness) if lateness else None,
        "offered_worker_s": offered,
        "accepted_compute_s": accepted_compute,
        "goodput": accepted_compute / offered if offered > 0 else None,
        "updates_accepted": sum(accepted.values()),
        "updates_lost_to_leaves": lost,
        "rounds_closed_by_departure": int(counters.get("rounds_closed_by_membership", 0)),
        "rounds_timed_out": int(counters.get("rounds_timed_out", 0)),
    }
