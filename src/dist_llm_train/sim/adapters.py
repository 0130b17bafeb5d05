"""The only module that touches the real controller and parameter server: everything reused lives behind it.

Reused unchanged, driven by the virtual clock:
* `controller.service.ControllerService` on an in-memory `controller.store.Store`: registration
  (idempotent by name, dead workers coming back), scheduling passes with the configured real scheduler and
  the shared load rule, failure detection (`detect_failures`: silent for heartbeat_interval × miss_limit),
  task release and the reassignment / death counters;
* `controller.failure.FailureDetector.tick()` and `controller.membership.MembershipSync`, whose notifier here
  hands each job's member list to the simulated PS instead of a gRPC client;
* `paramserver.job.JobState` (the PS's round barrier, straggler timeout, membership-shrink close, staleness
  check and counters) on a one-parameter job: the per-event engine pushes every update through it; the
  vectorised engine evaluates the same rule in bulk (`barrier`), held to it by tests.

Two things are bypassed, each for scale, each reported: the REST models cap a job at 1024 tasks, so the job
is inserted with the store's own `insert_job`/`insert_tasks`; and a scheduling pass with more than BLOCK
tasks and BLOCK workers is handed to the real scheduler in blocks (see `BlockScheduler`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import os
import sqlite3
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.failure import FailureDetector, TickReport
from dist_llm_train.controller.membership import MembershipSync, SyncReport
from dist_llm_train.controller.models import RegisterIn
from dist_llm_train.controller.records import Job, Task, Worker
from dist_llm_train.controller.schedulers import Assignment, Scheduler, TaskView, WorkerView, get_scheduler
from dist_llm_train.controller.schedulers.base import task_order
from dist_llm_train.controller.service import ControllerService, PSEndpoint
from dist_llm_train.controller.store import UPDATE_TASK, Store
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.strategies import OptimizerSpec, build_strategy
from dist_llm_train.core.strategies.asynchronous import Async
from dist_llm_train.core.strategies.base import EWMA_ALPHA, RoundBarrier, StalenessGate, WorkerRecord
from dist_llm_train.core.strategies.buffered_async import BufferedAsync, StalenessBuffer
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.job import NULL_OBSERVER, JobState
from dist_llm_train.sim.config import SimConfig

JOB_ID = "sim"
BLOCK = 128
_PAYLOAD = np.zeros(1, dtype=np.float32).tobytes()
_PAYLOAD_BYTES = len(_PAYLOAD)
_NAN = float("nan")


class BlockScheduler:
    """A real scheduler, fed at most BLOCK tasks and BLOCK workers per call.

    `balanced_assign` is O(tasks × workers) per matching round, which is minutes for the 10⁴ × 10⁴ first
    pass of a large run. Tasks are taken in the scheduler's own task order, BLOCK at a time, each block
    offered to the BLOCK least-loaded workers (ties: higher declared effective flops, then name). With one
    job's interchangeable shards this gives every worker one task exactly as a single call would; passes
    below the threshold (every reassignment after a failure) go to the scheduler whole. The ranking is a heap
    (only an offered worker's load changes), so a pass of 10⁵ tasks does not sort 10⁵ workers per block.
    """

    def __init__(self, inner: Scheduler, block: int = BLOCK) -> None:
        self.inner = inner
        self.name = inner.name
        self.block = block
        self.blocked_passes = 0

    def assign(
        self,
        pending_tasks: Sequence[TaskView],
        live_workers: Sequence[WorkerView],
        telemetry: Mapping[str, float],
    ) -> list[Assignment]:
        if len(pending_tasks) <= self.block or len(live_workers) <= self.block:
            return self.inner.assign(pending_tasks, live_workers, telemetry)
        self.blocked_passes += 1
        loads = {w.worker_id: w.load for w in live_workers}
        if len(loads) != len(live_workers):  # one worker listed twice: rank them all afresh for every block
            return self._assign_sorted(pending_tasks, live_workers, telemetry, loads)
        tasks = sorted(pending_tasks, key=task_order)
        # (load, -effective flops, name, position): what `sorted` ranks by, the position making it stable.
        heap = [(w.load, -w.effective_flops, w.name, i) for i, w in enumerate(live_workers)]
        heapq.heapify(heap)
        out: list[Assignment] = []
        for start in range(0, len(tasks), self.block):
            chunk = tasks[start : start + self.block]
            ranked = [heapq.heappop(heap) for _ in range(min(self.block, len(heap)))]
            offer = [dataclasses.replace(live_workers[r[3]], load=r[0]) for r in ranked]
            pairs = self.inner.assign(chunk, offer, telemetry)
            for _, worker_id in pairs:
                loads[worker_id] += 1
            out.extend(pairs)
            for _, neg_flops, name, i in ranked:
                heapq.heappush(heap, (loads[live_workers[i].worker_id], neg_flops, name, i))
        return out

    def _assign_sorted(
        self,
        pending_tasks: Sequence[TaskView],
        live_workers: Sequence[WorkerView],
        telemetry: Mapping[str, float],
        loads: dict[str, int],
    ) -> list[Assignment]:
        """The blocked pass by its definition: every block re-sorts every worker by its current load."""
        tasks = sorted(pending_tasks, key=task_order)
        out: list[Assignment] = []
        for start in range(0, len(tasks), self.block):
            chunk = tasks[start : start + self.block]
            ranked = sorted(live_workers, key=lambda w: (loads[w.worker_id], -w.effective_flops, w.name))
            offer = [dataclasses.replace(w, load=loads[w.worker_id]) for w in ranked[: self.block]]
            pairs = self.inner.assign(chunk, offer, telemetry)
            for _, worker_id in pairs:
                loads[worker_id] += 1
            out.extend(pairs)
        return out


class CallbackNotifier:
    """The controller's `MembershipNotifier`, delivering member lists to the simulated PS."""

    def __init__(self, deliver: Callable[[str, list[str]], None]) -> None:
        self._deliver = deliver

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        self._deliver(job_id, list(members))
        return list(members)

    def close(self) -> None:
        pass


class SimStore(Store):
    """The controller's store (SQLite in memory) with an account beside it of what the detector's ticks read.

    Every write the controller makes goes to SQLite as usual and also updates, in memory, each worker's
    insertion order, name and state, which worker holds which assigned task, and each job's state. From that
    account the store answers the reads a detector tick makes, which over 10⁵ rows cost a second each:
    * `job_members` (what the PS is sent): per job, its live workers holding an assigned task, kept sorted;
    * `stale_workers`: the simulator brings healthy workers' heartbeats up to the tick's time in bulk
      (`refresh_heartbeats`), so only the workers it names silent can be stale, their rows holding the last
      heartbeat that arrived; healthy rows are not rewritten every tick (no query reads them but this one);
    and it tells the simulator which workers' loads changed since it last asked (`take_load_changes`), the
    live workers with the fewest tasks (`least_loaded`) and whether the membership may have changed
    (`membership_version`). Task updates are written together, before the next statement or the transaction's
    commit (the first placement updates 10⁵ tasks). A transaction that rolls back would leave the account ahead
    of SQLite; the controller only rolls back on errors, which end a simulation. A test replays random
    controller histories against a plain `Store` and requires the same answers."""

    def __init__(self) -> None:
        self._updates: list[tuple[Any, ...]] = []  # `update_task`s not yet written (`_c` is used from here on)
        super().__init__(":memory:")
        self._order: dict[str, int] = {}  # worker -> insertion order (SQLite's rowid order)
        self._names: dict[str, str] = {}
        self._alive: set[str] = set()
        self._min_memory = float("inf")  # over every worker ever registered
        self._tasks: dict[str, tuple[str, str, str | None]] = {}  # task -> (job, state, worker)
        self._held: dict[str, dict[str, int]] = {}  # worker -> {job: assigned tasks of it}
        self._load: dict[str, int] = {}  # worker -> assigned tasks
        self._by_load: dict[int, set[str]] = {}  # live workers by load
        self._members: dict[str, list[str]] = {}  # job -> live workers holding one of its tasks, sorted
        self._jobs: dict[str, str] = {}  # job -> state, in insertion order
        self._job_updated: dict[str, float] = {}  # job -> its row's updated_at
        self._silent: dict[str, float] = {}  # worker -> its last heartbeat, while the simulator says it is silent
        self._load_changes: set[str] = set()
        self.membership_version = 0

    # -- the account ----------------------------------------------------------------------------------------
    def _set_alive(self, worker_id: str, alive: bool) -> None:
        if worker_id not in self._order or (worker_id in self._alive) == alive:
            return
        load = self._load.get(worker_id, 0)
        if alive:
            self._alive.add(worker_id)
            self._by_load.setdefault(load, set()).add(worker_id)
        else:
            self._alive.discard(worker_id)
            self._by_load[load].discard(worker_id)
        for job in self._held.get(worker_id, {}):
            self._member(job, worker_id, alive)

    def _member(self, job: str, worker_id: str, present: bool) -> None:
        members = self._members.setdefault(job, [])
        i = bisect.bisect_left(members, worker_id)
        if present:
            members.insert(i, worker_id)
        else:
            del members[i]
        self.membership_version += 1

    def _hold(self, worker_id: str, job: str, delta: int) -> None:
        held = self._held.setdefault(worker_id, {})
        before = held.get(job, 0)
        held[job] = before + delta
        if not held[job]:
            del held[job]
        load = self._load.get(worker_id, 0)
        self._load[worker_id] = load + delta
        self._load_changes.add(worker_id)
        alive = worker_id in self._alive
        if alive:
            self._by_load[load].discard(worker_id)
            self._by_load.setdefault(load + delta, set()).add(worker_id)
            if (before == 0) != (before + delta == 0):
                self._member(job, worker_id, before == 0)

    def _move(self, task_id: str, state: str, worker_id: str | None) -> None:
        job, old_state, old_worker = self._tasks[task_id]
        if old_state == "assigned" and old_worker is not None:
            self._hold(old_worker, job, -1)
        self._tasks[task_id] = (job, state, worker_id)
        if state == "assigned" and worker_id is not None:
            self._hold(worker_id, job, +1)

    # -- writes (SQLite, then the account) ---------------------------------------------------------------------
    def _account_worker(self, worker_id: str, name: str, caps: dict[str, Any]) -> None:
        """A worker (re)registered: known, in registration order, alive, its memory in the fleet minimum."""
        if worker_id not in self._order:
            self._order[worker_id] = len(self._order)
            self._names[worker_id] = name
        self._min_memory = min(self._min_memory, float(caps["memory_gb"]))
        self._silent.pop(worker_id, None)
        self._set_alive(worker_id, True)

    def upsert_worker(self, worker_id: str, name: str, caps: dict[str, Any], now: float) -> None:
        super().upsert_worker(worker_id, name, caps, now)
        self._account_worker(worker_id, name, caps)

    def upsert_workers(self, rows: Sequence[tuple[str, str, dict[str, Any], float]]) -> None:
        super().upsert_workers(rows)
        for worker_id, name, caps, _ in rows:
            self._account_worker(worker_id, name, caps)

    def touch_worker(self, worker_id: str, now: float, activity: str | None) -> None:
        super().touch_worker(worker_id, now, activity)
        self._silent.pop(worker_id, None)
        self._set_alive(worker_id, True)

    def mark_worker_dead(self, worker_id: str) -> None:
        super().mark_worker_dead(worker_id)
        self._set_alive(worker_id, False)

    def refresh_alive_heartbeats(self, now: float) -> int:
        self._silent.clear()
        return super().refresh_alive_heartbeats(now)

    def insert_job(self, job: Job) -> None:
        super().insert_job(job)
        self._jobs[job.job_id] = job.state
        self._job_updated[job.job_id] = job.updated_at
        self.membership_version += 1

    def set_job_state(self, job_id: str, state: str, now: float, error: str | None = None) -> None:
        if error is None and self._jobs.get(job_id) == state and self._job_updated.get(job_id) == now:
            return  # the row holds exactly this already (a pass placing 10⁵ tasks sets it once per task)
        super().set_job_state(job_id, state, now, error)
        if job_id in self._jobs:
            self._jobs[job_id] = state
            self._job_updated[job_id] = now
            self.membership_version += 1

    def insert_tasks(self, job_id: str, num_tasks: int, now: float) -> None:
        super().insert_tasks(job_id, num_tasks, now)
        for i in range(num_tasks):
            self._tasks[f"{job_id}.{i}"] = (job_id, "pending", None)

    def update_task(
        self,
        task_id: str,
        state: str,
        worker_id: str | None,
        now: float,
        attempts: int | None = None,
        last_error: str | None = None,
    ) -> None:
        # Written with the next statement or at the end of the transaction, all at once: the first placement
        # of a 10⁵-worker run updates 10⁵ tasks in one pass (`_c` and `tx` flush them).
        self._updates.append((state, worker_id, now, attempts, last_error, task_id))
        if task_id in self._tasks:
            self._move(task_id, state, worker_id)

    def _c(self) -> sqlite3.Connection:
        conn = super()._c()
        if self._updates:
            updates, self._updates = self._updates, []
            conn.executemany(UPDATE_TASK, updates)
        return conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with super().tx() as conn:
            try:
                yield conn
            except BaseException:
                self._updates.clear()  # they were the transaction's: it rolls back
                raise
            self._c()  # write what is held before the transaction commits

    def release_tasks_of_worker(self, worker_id: str, now: float) -> list[Task]:
        tasks = super().release_tasks_of_worker(worker_id, now)
        for t in tasks:
            self._move(t.task_id, "pending", None)
        return tasks

    def close_open_tasks(self, job_id: str, state: str, now: float) -> int:
        n = super().close_open_tasks(job_id, state, now)
        for task_id, (job, old, _) in list(self._tasks.items()):
            if job == job_id and old in ("pending", "assigned"):
                self._move(task_id, state, None)
        return n

    # -- reads ------------------------------------------------------------------------------------------------
    def refresh_heartbeats(self, now: float, silent: Mapping[str, float]) -> None:
        """Every live worker heartbeats up to `now` except the `silent` ones, whose rows get their last one."""
        for worker_id, last in silent.items():
            super().touch_worker(worker_id, last, None)
            self._set_alive(worker_id, True)
        self._silent = dict(silent)

    def stale_workers(self, cutoff: float) -> list[Worker]:
        ids = [w for w, last in self._silent.items() if last < cutoff and w in self._alive]
        found = (self.get_worker(w) for w in sorted(ids, key=self._order.__getitem__))
        return [w for w in found if w is not None]

    def job_members(self) -> dict[str, list[str]]:
        return {
            job: list(self._members.get(job, ())) for job, state in self._jobs.items() if state in _UNFINISHED
        }

    def take_load_changes(self) -> dict[str, int]:
        """Workers whose number of assigned tasks changed since the last call, with that number now."""
        out = {w: self._load.get(w, 0) for w in self._load_changes}
        self._load_changes.clear()
        return out

    def load(self, worker_id: str) -> int:
        return self._load.get(worker_id, 0)

    def least_loaded(self, at_least: int, at_most: int) -> list[str] | None:
        """The live workers holding the fewest tasks, by name, if there are `at_least` of them and no more than
        `at_most` (else None); `min_memory` bounds every registered worker's declared memory."""
        loads = [load for load, ws in self._by_load.items() if ws]
        if not loads:
            return None
        fewest = self._by_load[min(loads)]
        if not at_least <= len(fewest) <= at_most:
            return None
        return sorted(fewest, key=self._names.__getitem__)

    @property
    def min_memory(self) -> float:
        return self._min_memory


_UNFINISHED = ("pending", "running")
NARROWABLE = frozenset({"priority", "gale-shapley"})
"""Schedulers whose choice among the least-loaded workers depends on those workers alone (capability's
estimate for an unmeasured worker uses every live worker's figures, so it is always offered all of them)."""


class SimService(ControllerService):
    """`ControllerService` that offers a small scheduling pass only the workers the load rule lets it choose.

    A pass over a few pending tasks (at most BLOCK) that every worker can run, when at least that many live
    workers share the lowest load: the load rule makes those the only candidates of the first matching round,
    each task gets one of them in that round (a greedy or stable matching places every task when candidates
    suffice), so the priority and Gale-Shapley schedulers choose exactly as they would among every live
    worker. This is the pass that follows each death at 10⁵ workers; offering the 10⁵ would cost a second.
    Otherwise every live worker is offered, as the service does. A test holds the two to the same choices."""

    store: SimStore

    def candidates(self, pending: list[tuple[Task, Job]]) -> tuple[list[Worker], dict[str, int]]:
        store = self.store
        inner = getattr(self.scheduler, "inner", self.scheduler)
        fits_all = max(j.required_memory_gb for _, j in pending) <= store.min_memory
        if inner.name in NARROWABLE and len(pending) <= BLOCK and fits_all:
            ids = store.least_loaded(len(pending), 4 * BLOCK)
            if ids is not None:
                workers = [w for w in (store.get_worker(i) for i in ids) if w is not None]
                return workers, {w.worker_id: store.load(w.worker_id) for w in workers}
        return super().candidates(pending)


class SimMembershipSync(MembershipSync):
    """`MembershipSync` that skips working out the membership when the store says nothing it depends on
    changed since a sync left the PS acknowledging all of it (the comparison would find nothing to send)."""

    def __init__(
        self, notifier: CallbackNotifier, desired: Callable[[], dict[str, list[str]]], version: Callable[[], int]
    ) -> None:
        super().__init__(notifier, desired)
        self._version = version
        self._clean_at: int | None = None

    def sync(self) -> SyncReport:
        version = self._version()
        if version == self._clean_at:
            return SyncReport()
        report = super().sync()
        if not report.failed and not report.waiting:
            self._clean_at = version
        return report


@dataclasses.dataclass
class _Registrations:
    """New workers registered inside `SimController.registering`, not yet written."""

    names: set[str]
    rows: list[tuple[str, str, dict[str, Any], float]] = dataclasses.field(default_factory=list)
    _prefix: str = ""
    _count: int = 0

    def new_id(self) -> str:
        """An id shaped as `service.new_id("w")` makes them ("w-" and 12 hex digits): 6 random, then 6 counting
        up, so ids sort in registration order. Nothing depends on the ids (they are random), but the
        controller lists members by id, and 10⁵ lookups of them in that order then run in memory order."""
        if not self._prefix or self._count >= 1 << 24:
            self._prefix, self._count = os.urandom(3).hex(), 0
        self._count += 1
        return f"w-{self._prefix}{self._count - 1:06x}"


class SimController:
    """A real controller service with no HTTP in front of it and a virtual clock behind it."""

    def __init__(
        self,
        scheduler: str,
        heartbeat_interval_s: float,
        miss_limit: int,
        telemetry_alpha: float,
        clock: Callable[[], float],
        deliver_members: Callable[[str, list[str]], None],
    ) -> None:
        self.store = SimStore()
        cfg = ControllerConfig(
            scheduler=scheduler,  # type: ignore[arg-type]
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_miss_limit=miss_limit,
            heartbeat_max_rate=None,  # the simulator models a fixed interval
            telemetry_alpha=telemetry_alpha,
        )
        self.scheduler = BlockScheduler(get_scheduler(scheduler))
        self.svc = SimService(self.store, self.scheduler, cfg, PSEndpoint("sim", "virtual"), clock=clock)
        self.membership = SimMembershipSync(
            CallbackNotifier(deliver_members), self.svc.desired_members, lambda: self.store.membership_version
        )
        self.detector = FailureDetector(self.svc, self.membership)
        self.clock = clock
        self.tick_interval_s = self.detector.interval_s
        self.timeout_s = self.svc.heartbeat_timeout_s
        self._batch: _Registrations | None = None

    def set_on_change(self, hook: Callable[[], None]) -> None:
        self.svc.on_change = hook

    def register(self, name: str, compute_slowdown: float, bandwidth_mbps: float) -> str:
        req = RegisterIn(name=name, compute_slowdown=float(compute_slowdown), bandwidth_mbps=float(bandwidth_mbps))
        batch = self._batch
        if batch is not None and req.name not in batch.names:
            # What `ControllerService.register` does for a name it has never seen, the row written later.
            worker_id = batch.new_id()
            batch.rows.append((worker_id, req.name, req.model_dump(exclude={"name"}), self.clock()))
            batch.names.add(req.name)
            return worker_id
        self._flush_registrations()
        return self.svc.register(req).worker_id

    @contextlib.contextmanager
    def registering(self) -> Iterator[None]:
        """Register many workers at once (the initial 10⁵): their rows are written in one transaction at the end.

        `ControllerService.register` of a new name inserts the row, wakes the loop (`on_change`) and runs a
        scheduling pass. With no task pending (before the job is submitted) every one of those passes places
        nothing, so inserting the rows together and running one pass at the end leaves the store exactly as
        the calls one by one would, without 10⁵ transactions and 10⁵ empty passes. A name the store already
        knows, or anything registered while a task is pending, goes through the service one by one."""
        if self._batch is not None or self.store.pending_tasks():
            yield
            return
        self._batch = _Registrations({w.name for w in self.store.list_workers()})
        try:
            yield
        finally:
            self._flush_registrations()
            self._batch = None

    def _flush_registrations(self) -> None:
        batch = self._batch
        if batch is None or not batch.rows:
            return
        rows, batch.rows = batch.rows, []
        with self.store.tx():
            self.store.upsert_workers(rows)
        self.svc.on_change()
        self.svc.schedule()

    def submit(self, num_tasks: int, config: dict[str, Any]) -> str:
        """Insert the simulated job (see the module docstring for why not `submit_job`) and schedule it."""
        now = self.clock()
        job = Job(
            job_id=JOB_ID,
            name="simulation",
            config=config,
            num_tasks=num_tasks,
            priority=1,
            required_flops=1000.0,
            required_memory_gb=0.0,
            state="pending",
            created_at=now,
            updated_at=now,
        )
        with self.store.tx():
            self.store.insert_job(job)
            self.store.insert_tasks(JOB_ID, num_tasks, now)
        return JOB_ID

    def tick(self) -> TickReport:
        return self.detector.tick()

    def heartbeats_until(self, now: float, silent: Mapping[str, float]) -> None:
        """Bring every live worker's last heartbeat up to `now`, except the silent ones, which stay at theirs.

        Healthy workers heartbeat every interval, so their exact arrival times never matter to a detector
        whose timeout is whole intervals; silent ones (crashed, or stalled in retransmission) get the arrival
        time of the last heartbeat that actually reached the controller."""
        with self.store.tx():
            self.store.refresh_heartbeats(now, silent)

    def heartbeat(self, worker_id: str) -> None:
        """A heartbeat arriving now (a worker the controller may have declared dead comes back)."""
        self.svc.heartbeat(worker_id, "training")

    def loads(self) -> dict[str, int]:
        return self.store.worker_loads()

    def load_changes(self) -> dict[str, int]:
        """Workers whose number of assigned tasks changed since the last call, with that number now."""
        return self.store.take_load_changes()

    def has_pending(self) -> bool:
        return bool(self.store.pending_tasks())

    def set_throughput(self, values: Mapping[str, float]) -> None:
        with self.store.tx():
            for worker_id, v in values.items():
                self.store.set_throughput(worker_id, v)

    def counters(self) -> dict[str, int]:
        return self.store.counters()

    def close(self) -> None:
        self.store.close()


# -- parameter server --------------------------------------------------------------------------------------
def job_spec(cfg: SimConfig) -> JobSpec:
    """The simulated job: the run's strategy on a one-parameter vector with plain SGD (the maths is free)."""
    return JobSpec(
        job_id=JOB_ID,
        strategy=cfg.strategy_config,
        optimizer=OptimizerSpec("sgd", 0.01, 0.0),
        total_steps=max(1, cfg.rounds),
    )


class FastMembers(list[str]):
    """`JobState.members` with a set beside it: `worker in members` is O(1) instead of a scan of 10⁴ names.

    The PS checks membership on every push; with a plain list an async run of 10⁴ workers spends minutes in
    that scan. Only the two mutations JobState performs (`append`, wholesale replacement) are needed."""

    def __init__(self, items: list[str]) -> None:
        super().__init__(items)
        self._set = set(items)

    def __contains__(self, item: object) -> bool:
        return item in self._set

    def append(self, item: str) -> None:
        super().append(item)
        self._set.add(item)


def make_job_state(
    spec: JobSpec,
    members: list[str],
    clock: Callable[[], float],
    layout: Sequence[TensorSpec] | None = None,
    params: np.ndarray | None = None,
) -> JobState:
    """The PS's job object, by default on a one-parameter vector (one per region for a strategy with regions,
    e.g. Streaming DiLoCo's fragments): the rules are the real ones, the maths is free.

    Real numerics pass the model's layout and initial parameters."""
    if layout is None or params is None:
        n = build_strategy(spec.strategy).min_params()
        layout = [TensorSpec("theta", (n,), 0)]
        params = np.zeros(n, dtype=np.float32)
    JobState.validated(spec, layout, params, members)
    js = JobState(spec, layout, params, members, clock)
    js.members = FastMembers(js.members)
    return js


def push(js: JobState, worker_id: str, step: int, base_version: int) -> tuple[str, int]:
    """One update through the PS's push path; (outcome name, staleness). Refusals become their error code.

    An update the version rule refuses for its age takes `refuse_stale`, which does to the job exactly what
    `JobState.push` would; every other update goes through `JobState.push` itself."""
    refused = refuse_stale(js, worker_id, step, base_version)
    if refused is not None:
        return refused
    return push_to_ps(js, worker_id, step, base_version)


def push_to_ps(js: JobState, worker_id: str, step: int, base_version: int) -> tuple[str, int]:
    """`push` without the fast path: the update through `JobState.push`."""
    # One value per update: the free job has one parameter, or one per region (Strategy.min_params).
    payload = _PAYLOAD if js.num_params == 1 else bytes(4 * js.update_size(base_version))
    header = PushHeader(
        job_id=JOB_ID,
        worker_id=worker_id,
        step=step,
        base_version=base_version,
        codec="none",
        payload_bytes=len(payload),
        kind=js.strategy.update_kind,
    )
    try:
        result = js.push(header, payload)
    except PSError as err:
        return err.code.value, js.version - base_version
    return result.outcome.value, result.staleness


_REFUSED_BY_AGE = {
    StalenessGate: PushOutcome.STALE_REJECTED,
    StalenessBuffer: PushOutcome.STALE_REJECTED,  # refuses as the gate does, and changes nothing else then
    RoundBarrier: PushOutcome.LATE_DROPPED,
}
_FIXED_BOUND = (Async, BufferedAsync)  # strategies whose bound is the constant `max_staleness`


class StaleRefuser:
    """`push`'s fast path for one job: the outcome of an update too old for the job's version rule, or None.

    On cellular with 10⁴ async workers 99.9 % of updates are refused as stale; through `JobState.push` each
    costs a header, a decode and a finiteness check of a payload that is never used. This replays what
    `JobState.push` and `_decide_locked` do to the job for such an update, in their order: the push is
    timed (`ledger.observe_push`), the rule refuses it (`StalenessGate`, `StalenessBuffer`: staleness over the
    worker's bound, read after that timing as the rule reads it; `RoundBarrier`: any staleness), its step is
    remembered for replay detection, and the outcome, wire-byte and ledger counters move as the PS's do. It applies only
    to the rules as shipped (exact classes) on the free one-parameter job, to a member's new step with a
    plausible base version of a job not yet complete; anything else (and anything it cannot be sure is
    refused) returns None having changed nothing, and goes through `JobState.push`. The observer is told
    as the PS tells it; the bound its `worker_push` is given is not worked out for the no-op observer (a
    strategy's bound is a pure function of the ledger). The simulator is one thread, so the job's lock is
    not taken. A property test holds it to `JobState.push`."""

    def __init__(self, js: JobState) -> None:
        self.js = js
        outcome = _REFUSED_BY_AGE.get(type(js.rule)) if js.num_params == 1 else None
        self.outcome = outcome
        strategy = js.strategy
        # Plain async's and buffered async's bound is a constant: the refusal is known before the push is timed.
        self.fixed_bound: int | None = (
            strategy.max_staleness
            if isinstance(strategy, _FIXED_BOUND) and type(strategy) in _FIXED_BOUND  # exact classes only
            else None
        )
        kind = strategy.update_kind
        self.kind = kind
        self.name = outcome.value if outcome is not None else ""
        self.pushes_key = f"pushes_{self.name.lower()}"
        self.bytes_key, self.raw_key = f"bytes_received_{kind}", f"raw_bytes_{kind}"
        self.total_steps = js.spec.total_steps

    def __call__(self, worker_id: str, step: int, base_version: int) -> tuple[str, int] | None:
        outcome = self.outcome
        if outcome is None:
            return None
        js = self.js
        if not js.open_membership:
            members = js.members
            if worker_id not in (members._set if type(members) is FastMembers else members):
                return None  # PERMISSION_DENIED: the PS's own path says so
        version = js.version
        staleness = version - base_version
        if staleness <= 0 or version >= self.total_steps:  # not old, or the job is complete
            return None
        if js.replayed(worker_id, step):
            return None  # DUPLICATE
        ledger = js.ledger
        if outcome is PushOutcome.STALE_REJECTED and self.fixed_bound is not None:
            if staleness <= self.fixed_bound:
                return None
            # The plain async refusal, the bulk of a large run, inlined (the same steps as the general case
            # below: `ledger.observe_push`, `js._remember`, the counters, `ledger.record`).
            now = js._clock()
            records = ledger.records
            rec = records.get(worker_id)
            if rec is None:
                rec = records[worker_id] = WorkerRecord()
            last = rec.last_push
            if last is not None:
                gap = max(0.0, now - last)
                old = rec.interval_s
                rec.interval_s = gap if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * gap
            rec.last_push = now
            js._remember(worker_id, step)
            counters = js.counters
            counters[self.pushes_key] += 1
            counters[self.bytes_key] += _PAYLOAD_BYTES
            counters[self.raw_key] += 4  # 4 × num_params
            rec.pushes += 1
            rec.rejected += 1
            if js._obs is not NULL_OBSERVER:
                self._tell(worker_id, outcome)
            return self.name, staleness
        if outcome is PushOutcome.STALE_REJECTED:
            # The bound may depend on this very push's timing (adaptive): time it, then read the bound; if
            # the update turns out to be within it, undo the timing and let the PS take it.
            rec = ledger.records.get(worker_id)
            before = None if rec is None else (rec.last_push, rec.interval_s)
            ledger.observe_push(worker_id, js._clock())
            if staleness <= js.staleness_bound(worker_id):
                if before is None:
                    del ledger.records[worker_id]
                else:
                    rec = ledger.records[worker_id]
                    rec.last_push, rec.interval_s = before
                return None
        else:
            ledger.observe_push(worker_id, js._clock())
        js._remember(worker_id, step)
        counters = js.counters
        counters[self.pushes_key] += 1
        counters[self.bytes_key] += _PAYLOAD_BYTES
        counters[self.raw_key] += 4  # 4 × num_params
        ledger.record(worker_id, outcome, staleness)
        if js._obs is not NULL_OBSERVER:
            self._tell(worker_id, outcome)
        return self.name, staleness

    def _tell(self, worker_id: str, outcome: PushOutcome) -> None:
        """What `JobState.push` tells its observer after deciding."""
        js = self.js
        bound = js.staleness_bound(worker_id)
        js._obs.push_outcome(js.spec.job_id, outcome)
        js._obs.worker_push(js.spec.job_id, worker_id, outcome, bound)
        js._obs.update_bytes(js.spec.job_id, self.kind, "none", _PAYLOAD_BYTES)


_REFUSERS: weakref.WeakKeyDictionary[JobState, StaleRefuser] = weakref.WeakKeyDictionary()


def refuse_stale(js: JobState, worker_id: str, step: int, base_version: int) -> tuple[str, int] | None:
    """`StaleRefuser` of `js` (made on first use): the outcome of an update too old for it, or None."""
    refuser = _REFUSERS.get(js)
    if refuser is None:
        refuser = _REFUSERS[js] = StaleRefuser(js)
    return refuser(worker_id, step, base_version)


class FreeNumerics:
    """`engine.Numerics` on a one-parameter job: the PS's rules decide every update's fate, the maths is free."""

    def __init__(self, cfg: SimConfig) -> None:
        self.spec = job_spec(cfg)
        self._refuse: StaleRefuser | None = None

    def job_state(self, clock: Callable[[], float]) -> JobState:
        js = make_job_state(self.spec, [], clock)
        self._refuse = StaleRefuser(js)
        return js

    def begin_life(self, agent: int, slot: int) -> None:
        pass

    def pulled(self, js: JobState, agent: int, version: int) -> None:
        pass

    def push(self, js: JobState, worker_id: str, step: int, agent: int, base_version: int) -> tuple[str, int]:
        refuse = self._refuse
        if refuse is not None and refuse.js is js:
            refused = refuse(worker_id, step, base_version)
            if refused is not None:
                return refused
            return push_to_ps(js, worker_id, step, base_version)
        return push(js, worker_id, step, base_version)

    def loss(self, agent: int) -> float:
        return _NAN

    def end_life(self, agent: int) -> None:
        pass


def set_members(js: JobState, members: list[str]) -> None:
    js.set_members(list(members))
    js.members = FastMembers(js.members)


def expire(js: JobState, now: float) -> bool:
    return js.expire(now)


def round_deadline(js: JobState) -> float | None:
    return js.round_deadline()


def updates_aggregated(js: JobState) -> int:
    return int(js.counters.get("updates_aggregated", 0))
