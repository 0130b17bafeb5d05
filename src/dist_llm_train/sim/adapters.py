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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.failure import FailureDetector, TickReport
from dist_llm_train.controller.membership import MembershipSync
from dist_llm_train.controller.models import RegisterIn
from dist_llm_train.controller.records import Job
from dist_llm_train.controller.schedulers import Assignment, Scheduler, TaskView, WorkerView, get_scheduler
from dist_llm_train.controller.schedulers.base import task_order
from dist_llm_train.controller.service import ControllerService, PSEndpoint
from dist_llm_train.controller.store import Store
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.strategies import OptimizerSpec
from dist_llm_train.core.types import PSError, PushHeader, TensorSpec
from dist_llm_train.paramserver.job import JobState
from dist_llm_train.sim.config import SimConfig

JOB_ID = "sim"
BLOCK = 128
_PAYLOAD = np.zeros(1, dtype=np.float32).tobytes()


class BlockScheduler:
    """A real scheduler, fed at most BLOCK tasks and BLOCK workers per call.

    `balanced_assign` is O(tasks × workers) per matching round, which is minutes for the 10⁴ × 10⁴ first
    pass of a large run. Tasks are taken in the scheduler's own task order, BLOCK at a time, each block
    offered to the BLOCK least-loaded workers (ties: higher declared effective flops, then name). With one
    job's interchangeable shards this gives every worker one task exactly as a single call would; passes
    below the threshold (every reassignment after a failure) go to the scheduler whole.
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
        self.store = Store(":memory:")
        cfg = ControllerConfig(
            scheduler=scheduler,  # type: ignore[arg-type]
            heartbeat_interval_s=heartbeat_interval_s,
            heartbeat_miss_limit=miss_limit,
            telemetry_alpha=telemetry_alpha,
        )
        self.scheduler = BlockScheduler(get_scheduler(scheduler))
        self.svc = ControllerService(
            self.store, self.scheduler, cfg, PSEndpoint("sim", "virtual"), clock=clock
        )
        self.membership = MembershipSync(CallbackNotifier(deliver_members), self.svc.desired_members)
        self.detector = FailureDetector(self.svc, self.membership)
        self.clock = clock
        self.tick_interval_s = self.detector.interval_s
        self.timeout_s = self.svc.heartbeat_timeout_s

    def set_on_change(self, hook: Callable[[], None]) -> None:
        self.svc.on_change = hook

    def register(self, name: str, compute_slowdown: float, bandwidth_mbps: float) -> str:
        req = RegisterIn(name=name, compute_slowdown=compute_slowdown, bandwidth_mbps=bandwidth_mbps)
        return self.svc.register(req).worker_id

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
            self.store.refresh_alive_heartbeats(now)
            for worker_id, last in silent.items():
                self.store.touch_worker(worker_id, last, None)

    def heartbeat(self, worker_id: str) -> None:
        """A heartbeat arriving now (a worker the controller may have declared dead comes back)."""
        self.svc.heartbeat(worker_id, "training")

    def loads(self) -> dict[str, int]:
        return self.store.worker_loads()

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


def make_job_state(spec: JobSpec, members: list[str], clock: Callable[[], float]) -> JobState:
    """The PS's job object on a one-parameter vector: the rules are the real ones, the maths is free."""
    layout = [TensorSpec("theta", (1,), 0)]
    params = np.zeros(1, dtype=np.float32)
    JobState.validated(spec, layout, params, members)
    js = JobState(spec, layout, params, members, clock)
    js.members = FastMembers(js.members)
    return js


def push(js: JobState, worker_id: str, step: int, base_version: int) -> tuple[str, int]:
    """One update through the PS's push path; (outcome name, staleness). Refusals become their error code."""
    header = PushHeader(
        job_id=JOB_ID,
        worker_id=worker_id,
        step=step,
        base_version=base_version,
        codec="none",
        payload_bytes=len(_PAYLOAD),
        kind=js.strategy.update_kind,
    )
    try:
        result = js.push(header, _PAYLOAD)
    except PSError as err:
        return err.code.value, js.version - base_version
    return result.outcome.value, result.staleness


class FreeNumerics:
    """`engine.Numerics` on a one-parameter job: the PS's rules decide every update's fate, the maths is free."""

    def __init__(self, cfg: SimConfig) -> None:
        self.spec = job_spec(cfg)

    def job_state(self, clock: Callable[[], float]) -> JobState:
        return make_job_state(self.spec, [], clock)

    def begin_life(self, agent: int, slot: int) -> None:
        pass

    def pulled(self, js: JobState, agent: int, version: int) -> None:
        pass

    def push(self, js: JobState, worker_id: str, step: int, agent: int, base_version: int) -> tuple[str, int]:
        return push(js, worker_id, step, base_version)

    def loss(self, agent: int) -> float:
        return float("nan")

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
