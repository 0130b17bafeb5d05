"""What the controller does, independent of HTTP: workers, jobs, tasks, scheduling, failures.

Every method that changes state runs in one store transaction, so a request that is
refused changes nothing. Methods that change who holds which task call `on_change`, which
wakes the background loop to push the new membership to the parameter server at once
instead of at the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.errors import BadInput, Conflict, NotFound
from dist_llm_train.controller.heartbeats import HeartbeatBook, LoopLoad, interval_for
from dist_llm_train.controller.jobs import job_view, normalised_sections, training_of, validate_job_config
from dist_llm_train.controller.models import JobIn, RegisterIn, TelemetryIn
from dist_llm_train.controller.records import Job, Task, Worker
from dist_llm_train.controller.schedulers import Assignment, Scheduler, TaskView, WorkerView
from dist_llm_train.controller.store import Store
from dist_llm_train.core.sharding import check_shardable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WORKER_STEP_FACTOR = 100  # a worker's reported step may exceed its job's step budget this many times (retries)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class PSEndpoint:
    transport: str
    address: str  # "host:port", or "host:port,host:port,..." for P parameter-server shards

    @property
    def shards(self) -> int:
        return self.address.count(",") + 1


class ControllerService:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        cfg: ControllerConfig,
        paramserver: PSEndpoint,
        clock: Clock = time.time,
        max_task_attempts: int = 5,
    ) -> None:
        if max_task_attempts < 1:
            raise ValueError("max_task_attempts must be >= 1")
        self.store = store
        self.scheduler = scheduler
        self.cfg = cfg
        self.paramserver = paramserver
        self.clock = clock
        self.max_task_attempts = max_task_attempts
        self.on_change: Callable[[], None] = lambda: None
        # (job_id, claimed ps_version) -> the PS's version when the claim is past it, else None; the app wires
        # `MembershipSync.version_past` (it talks to the PS). Without one only the job's last version bounds it.
        self.ps_version_past: Callable[[str, int], int | None] = lambda job_id, claimed: None
        self._hb_lock = threading.Lock()
        self.heartbeats = 0
        # Known-alive workers' last heartbeats; SQLite gets them in batches (see controller.heartbeats).
        self.book = HeartbeatBook()
        self.load = LoopLoad()  # fed by the app's loop monitor; idle (no lag, factor 1) without one
        self._fleet = store.count_by_state("workers").get("alive", 0) if cfg.heartbeat_max_rate else 0
        # netem: each worker's latest shaped-link report, shown by /status; refreshed by telemetry.
        self.links: dict[str, list[dict[str, Any]]] = {}
        self._budgets: dict[str, tuple[int, int]] = {}  # job_id -> (PS versions, step budget); jobs never change
        # Workers alive before a restart get a full timeout to reach the new process.
        store.refresh_alive_heartbeats(clock())

    @property
    def heartbeat_interval_s(self) -> float:
        """The interval workers are told now: the configured one, longer for a fleet above `heartbeat_max_rate`."""
        if self.cfg.heartbeat_max_rate is None:
            return self.cfg.heartbeat_interval_s
        return interval_for(self._fleet, self.cfg.heartbeat_interval_s, self.cfg.heartbeat_max_rate) * self.load.factor

    @property
    def heartbeat_timeout_s(self) -> float:
        """Silence after which a worker told the current interval is declared dead."""
        return self.heartbeat_interval_s * self.cfg.heartbeat_miss_limit

    def _count_fleet(self) -> None:
        """Refresh the fleet size the adaptive interval follows (registration, failure detection)."""
        if self.cfg.heartbeat_max_rate is not None:
            self._fleet = max(len(self.book), self.store.count_by_state("workers").get("alive", 0))

    def _worker(self, worker_id: str) -> Worker:
        w = self.store.get_worker(worker_id)
        if w is None:
            raise NotFound(f"unknown worker {worker_id!r}; register first")
        return w

    def _job(self, job_id: str) -> Job:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id!r}")
        return job

    # -- workers --------------------------------------------------------------------------
    def register(self, req: RegisterIn) -> Worker:
        """Idempotent by name; a live worker of that name must declare the same capabilities."""
        caps = req.model_dump(exclude={"name"})
        now = self.clock()
        with self.store.tx():
            old = self.store.get_worker_by_name(req.name)
            if old is not None and old.state == "alive" and old.capabilities() != caps:
                known = old.capabilities()
                diffs = [f"{k} {known[k]!r} -> {v!r}" for k, v in caps.items() if known[k] != v]
                raise Conflict(
                    f"worker {req.name!r} is registered and alive with different capabilities "
                    f"({'; '.join(diffs)}); "
                    f"use another name or wait {self.heartbeat_timeout_s:g}s for it to be declared dead"
                )
            worker_id = old.worker_id if old else new_id("w")
            self.store.upsert_worker(worker_id, req.name, caps, now)
        if old is None or old.state == "dead":
            self._fleet += 1  # counted, not recounted: a scan per registration is quadratic in the fleet
        self.book.admit(worker_id, now, self.heartbeat_interval_s)
        if old is None or old.state == "dead":
            log.info("worker %s registered as %s%s", req.name, worker_id, " (back from dead)" if old else "")
            self.on_change()
            self.schedule()  # pending tasks may have been waiting for exactly this worker
        return self._worker(worker_id)

    def fast_heartbeat(self, worker_id: str, activity: str | None) -> float | None:
        """A heartbeat of a worker known alive here, in memory only; the interval to tell it, or None when the
        worker is not known alive here (then `heartbeat` must take it through the store)."""
        interval = self.heartbeat_interval_s
        if not self.book.beat(worker_id, self.clock(), interval, activity):
            return None
        with self._hb_lock:
            self.heartbeats += 1
        return interval

    def heartbeat(self, worker_id: str, activity: str | None) -> float:
        """Any worker's heartbeat (unknown: NotFound; dead: back alive); returns the interval to tell it."""
        interval = self.fast_heartbeat(worker_id, activity)
        if interval is not None:
            return interval
        now = self.clock()
        with self.store.tx():
            w = self._worker(worker_id)
            self.store.touch_worker(worker_id, now, activity)
        with self._hb_lock:
            self.heartbeats += 1
        if w.state == "dead":
            self._fleet += 1
        interval = self.heartbeat_interval_s
        self.book.admit(worker_id, now, interval, activity)
        if w.state == "dead":
            log.info("worker %s is back (heartbeat after being declared dead)", w.name)
            self.on_change()
            self.schedule()
        return interval

    def flush_heartbeats(self) -> int:
        """Write the heartbeats received in memory since the last flush to the store, in one statement."""
        rows = self.book.take_dirty()
        if rows:
            with self.store.tx():
                self.store.record_heartbeats(rows)
        return len(rows)

    def job_budget(self, job: Job) -> tuple[int, int]:
        """(the PS versions the job runs for, its step budget): what a worker's report is checked against."""
        budget = self._budgets.get(job.job_id)
        if budget is None:
            training = training_of(job)
            budget = self._budgets[job.job_id] = (training.versions, training.steps)
        return budget

    def _check_report(self, job: Job, rec: TelemetryIn) -> None:
        """A report's version and step within what the job can reach: the PS never publishes past the job's
        last version, so a larger `ps_version` is made up (2^62 once set a job's step to 4.6e18)."""
        versions, steps = self.job_budget(job)
        if rec.ps_version > versions:
            raise BadInput(f"body.ps_version: {rec.ps_version} is past job {job.job_id}'s last PS version {versions}")
        step_limit = WORKER_STEP_FACTOR * max(versions, steps)
        if rec.step > step_limit:
            raise BadInput(
                f"body.step: {rec.step} is over {step_limit} ({WORKER_STEP_FACTOR}x job {job.job_id}'s step budget)"
            )

    def record_telemetry(self, worker_id: str, rec: TelemetryIn) -> None:
        alpha = self.cfg.telemetry_alpha
        with self.store.tx():
            self._worker(worker_id)
            self._check_report(self._job(rec.job_id), rec)
        # Outside the store's lock: judging the version may ask the PS (membership.version_past).
        ps_version = self.ps_version_past(rec.job_id, rec.ps_version)
        if ps_version is not None:
            raise BadInput(
                f"body.ps_version: {rec.ps_version} is past the parameter server's version {ps_version} of job "
                f"{rec.job_id}"
            )
        with self.store.tx():
            w = self._worker(worker_id)
            self.store.insert_telemetry(
                rec.job_id, worker_id, rec.model_dump(exclude={"job_id"}), self.clock()
            )
            if rec.samples_per_s > 0:
                prev = w.throughput_ewma
                ewma = rec.samples_per_s if prev is None else alpha * rec.samples_per_s + (1 - alpha) * prev
                self.store.set_throughput(worker_id, ewma)
        if rec.links is not None:
            self.links[worker_id] = [link.model_dump() for link in rec.links]

    def links_out_of_tolerance(self) -> list[str]:
        """`worker name/traffic class` of every reported link whose RTT is outside its tolerance, sorted, each once
        (a worker with several PS shards reports a ps_sync link per shard)."""
        bad = [(w, link["traffic_class"]) for w, links in list(self.links.items()) for link in links
               if link.get("within_tolerance") is False]
        if not bad:
            return []
        names = {w.worker_id: w.name for w in self.store.list_workers()}
        return sorted({f"{names.get(w, w)}/{cls}" for w, cls in bad})

    # -- jobs -----------------------------------------------------------------------------
    def submit_job(self, req: JobIn) -> dict[str, Any]:
        cfg = validate_job_config(req.config)
        try:  # a job whose maths needs the whole vector on one server is refused here, not by its workers
            check_shardable(cfg.training.job_spec("submitted"), self.paramserver.shards)
        except ValueError as err:
            raise BadInput(f"config.training: {err}") from None
        now = self.clock()
        job = Job(
            job_id=new_id("job"),
            name=req.name,
            config=normalised_sections(cfg),
            num_tasks=req.num_tasks or cfg.training.num_workers,
            priority=req.priority,
            required_flops=req.required_flops,
            required_memory_gb=req.required_memory_gb,
            state="pending",
            created_at=now,
            updated_at=now,
        )
        with self.store.tx():
            self.store.insert_job(job)
            self.store.insert_tasks(job.job_id, job.num_tasks, now)
        log.info("job %s (%s) submitted: %d tasks", job.job_id, job.name, job.num_tasks)
        self.schedule()
        return self.describe_job(job.job_id)

    def describe_job(self, job_id: str) -> dict[str, Any]:
        with self.store.tx():
            job = self._job(job_id)
            tasks = self.store.tasks_of_job(job_id)
            step, loss = self.store.job_progress(job_id)
            names = {w.worker_id: w.name for w in self.store.list_workers()}
        return job_view(job, tasks, names, step, loss)

    def list_jobs(self) -> list[dict[str, Any]]:
        return [self.describe_job(j.job_id) for j in self.store.list_jobs()]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Idempotent; a job that already finished otherwise cannot be cancelled."""
        with self.store.tx():
            job = self._job(job_id)
            if job.state in ("completed", "failed"):
                raise Conflict(f"job {job_id} already {job.state}; nothing to cancel")
            changed, revoked = job.state != "cancelled", 0
            if changed:
                self.store.set_job_state(job_id, "cancelled", self.clock())
                revoked = self.store.close_open_tasks(job_id, "cancelled", self.clock())
        if changed:
            log.info("job %s cancelled; %d tasks revoked", job_id, revoked)
            self.on_change()
        return self.describe_job(job_id)

    def job_telemetry(self, job_id: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        self._job(job_id)
        return self.store.telemetry_rows(job_id, after_id, limit)

    # -- tasks ----------------------------------------------------------------------------
    def assignments(self, worker_id: str) -> tuple[list[tuple[Task, Job]], dict[str, Job]]:
        """All tasks the worker holds (after a scheduling pass) and the jobs they belong to."""
        self._worker(worker_id)
        self.schedule()
        with self.store.tx():
            tasks = self.store.assigned_tasks(worker_id)
            jobs = {t.job_id: self._job(t.job_id) for t in tasks}
        return [(t, jobs[t.job_id]) for t in tasks], jobs

    def _held_task(self, task_id: str, worker_id: str) -> Task:
        task = self.store.get_task(task_id)
        if task is None:
            raise NotFound(f"unknown task {task_id!r}")
        self._worker(worker_id)
        if task.worker_id != worker_id:
            holder = f"held by {task.worker_id}" if task.worker_id else "not held by any worker"
            raise Conflict(f"task {task_id} is {task.state} and {holder}, not by {worker_id}")
        return task

    def complete_task(self, task_id: str, worker_id: str) -> Task:
        now = self.clock()
        with self.store.tx():
            task = self._held_task(task_id, worker_id)
            if task.state == "completed":
                return task  # repeated completion report
            if task.state != "assigned":
                raise Conflict(f"task {task_id} is {task.state}; only an assigned task can complete")
            self.store.update_task(task_id, "completed", worker_id, now)
            counts = self.store.task_state_counts(task.job_id)
            job = self._job(task.job_id)
            if counts.get("completed", 0) == job.num_tasks:
                self.store.set_job_state(job.job_id, "completed", now)
                log.info("job %s completed", job.job_id)
        self.on_change()
        return self._task(task_id)

    def fail_task(self, task_id: str, worker_id: str, reason: str, attempt: int | None = None) -> tuple[Task, bool]:
        """Give the task back (pending again); too many attempts fail the whole job. Returns (task, replayed).

        Idempotent: a report already counted (the same `attempt` of this worker, or without one the same reason
        from a worker that no longer holds the task) changes nothing and comes back with replayed=True. The
        scheduler then offers the task to workers that have not failed it first (`TaskView.avoid`)."""
        now = self.clock()
        with self.store.tx():
            task = self.store.get_task(task_id)
            if task is None:
                raise NotFound(f"unknown task {task_id!r}")
            self._worker(worker_id)
            current = task.attempts + 1
            holds = task.worker_id == worker_id and task.state == "assigned"
            key = attempt if attempt is not None else (current if holds else None)
            if self.store.failure_counted(task_id, worker_id, key, reason):
                return task, True
            task = self._held_task(task_id, worker_id)
            if task.state != "assigned":
                raise Conflict(f"task {task_id} is {task.state}; only an assigned task can fail")
            if attempt is not None and attempt != current:
                raise Conflict(f"task {task_id} is on attempt {current}; a report for attempt {attempt} is stale")
            attempts = current
            self.store.record_failure(task_id, worker_id, attempts, reason, now)
            self.store.update_task(task_id, "pending", None, now, attempts=attempts, last_error=reason)
            if attempts >= self.max_task_attempts:
                error = f"task {task_id} failed {attempts} times; last error: {reason}"
                self.store.set_job_state(task.job_id, "failed", now, error=error)
                self.store.close_open_tasks(task.job_id, "failed", now)
                log.warning("job %s failed: %s", task.job_id, error)
        log.info("task %s given back by %s: %s", task_id, worker_id, reason)
        self.on_change()
        self.schedule()
        return self._task(task_id), False

    def _task(self, task_id: str) -> Task:
        task = self.store.get_task(task_id)
        assert task is not None
        return task

    # -- scheduling and failures ------------------------------------------------------------
    def schedule(self) -> list[Assignment]:
        """One scheduling pass: pending tasks of live jobs onto live workers, under the load rule."""
        now = self.clock()
        with self.store.tx():
            pending = self.store.pending_tasks()
            if not pending:
                return []
            workers, loads = self.candidates(pending)
            failed = self.store.failed_workers([t.task_id for t, _ in pending if t.attempts])
            task_views = [
                TaskView(
                    t.task_id,
                    j.job_id,
                    j.priority,
                    j.required_flops,
                    j.required_memory_gb,
                    order,
                    failed.get(t.task_id, frozenset()),
                )
                for order, (t, j) in enumerate(pending)
            ]
            worker_views = [
                WorkerView(
                    w.worker_id,
                    w.name,
                    w.memory_gb,
                    w.flops,
                    w.bandwidth_mbps,
                    w.compute_slowdown,
                    loads.get(w.worker_id, 0),
                )
                for w in workers
            ]
            telemetry = {w.worker_id: w.throughput_ewma for w in workers if w.throughput_ewma is not None}
            pairs = self.scheduler.assign(task_views, worker_views, telemetry)
            jobs = {t.task_id: j for t, j in pending}
            alive = {w.worker_id for w in workers}
            for task_id, worker_id in pairs:
                if task_id not in jobs or worker_id not in alive:
                    raise RuntimeError(
                        f"scheduler {self.scheduler.name} returned an invalid pair {task_id, worker_id}"
                    )
                self.store.update_task(task_id, "assigned", worker_id, now)
                if jobs[task_id].state == "pending":
                    self.store.set_job_state(jobs[task_id].job_id, "running", now)
        if pairs:
            log.info("%s assigned %s", self.scheduler.name, ", ".join(f"{t}->{w}" for t, w in pairs))
            self.on_change()
        return pairs

    def candidates(self, pending: list[tuple[Task, Job]]) -> tuple[list[Worker], dict[str, int]]:
        """The live workers a scheduling pass offers the scheduler (all of them, by name), and their loads.

        A subclass may offer fewer when it can show the scheduler would choose among those alone (the
        simulator does, at 10⁵ workers: see `sim.adapters`)."""
        return self.store.list_workers("alive"), self.store.worker_loads()

    def detect_failures(self) -> list[Worker]:
        """Declare silent workers dead and put their tasks back to pending.

        Each worker's timeout is miss_limit × the interval it was last told (the current one for workers this
        process has not heard yet); the store names the candidates, the heartbeat book has the newest beats."""
        self.flush_heartbeats()
        now = self.clock()
        miss_limit = self.cfg.heartbeat_miss_limit
        with self.store.tx():
            silent = self.store.stale_workers(now - self.cfg.heartbeat_interval_s * miss_limit)
            timeout, grace = self.heartbeat_timeout_s, self.load.lag_s()
            dead = [
                w
                for w in silent
                if self.book.forget_if_silent(w.worker_id, w.last_heartbeat, now, miss_limit, timeout, grace)
            ]
            released = 0
            for w in dead:
                self.store.mark_worker_dead(w.worker_id)
                released += len(self.store.release_tasks_of_worker(w.worker_id, now))
            if dead:
                self.store.incr("worker_deaths", len(dead))
                self.store.incr("reassignments", released)
        for w in dead:
            log.warning(
                "worker %s (%s) silent for over %gs: declared dead",
                w.name,
                w.worker_id,
                self.heartbeat_timeout_s,
            )
        if dead:
            self._count_fleet()
            self.on_change()
        return dead

    def desired_members(self) -> dict[str, list[str]]:
        return self.store.job_members()
