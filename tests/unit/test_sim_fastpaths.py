"""The simulator's shortcuts for scale, each against what it stands in for.

* `adapters.refuse_stale` (an update too old for the version rule, without `JobState.push`) against a twin
  job that takes every update through `JobState.push`: same outcome, and the same job afterwards;
* `BlockScheduler`'s heap ranking against re-sorting every worker for every block;
* `SimController.registering` (initial workers written in one transaction) against registering one by one;
* `EventQueue` (a heap of times, events filed under them) against a heap of (time, kind, sequence) tuples;
* `SimStore`, `SimService` and `SimMembershipSync` (what a detector tick reads, answered from memory; a small
  scheduling pass offered only the least-loaded workers; a sync skipped when nothing changed) against the
  plain store, service and membership sync.
"""

from __future__ import annotations

import heapq
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.failure import FailureDetector
from dist_llm_train.controller.membership import MembershipSync
from dist_llm_train.controller.models import RegisterIn
from dist_llm_train.controller.records import Job
from dist_llm_train.controller.schedulers import TaskView, WorkerView, get_scheduler
from dist_llm_train.controller.service import ControllerService, PSEndpoint
from dist_llm_train.controller.store import Store
from dist_llm_train.core.types import PSError, PushHeader
from dist_llm_train.paramserver.job import JobState
from dist_llm_train.sim import adapters
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.events import EventQueue, Kind, VirtualClock

IDS = [f"w{i}" for i in range(6)]


def reference_push(js: JobState, worker_id: str, step: int, base_version: int) -> tuple[str, int]:
    """Every update through `JobState.push`, as `adapters.push` did before it had a fast path."""
    header = PushHeader(
        job_id=adapters.JOB_ID,
        worker_id=worker_id,
        step=step,
        base_version=base_version,
        codec="none",
        payload_bytes=4,
        kind=js.strategy.update_kind,
    )
    try:
        result = js.push(header, np.zeros(1, dtype=np.float32).tobytes())
    except PSError as err:
        return err.code.value, js.version - base_version
    return result.outcome.value, result.staleness


def job_state(js: JobState) -> dict[str, Any]:
    """Everything a push may change, in a comparable form (key order included where the PS keeps one)."""
    return {
        "version": js.version,
        "params": js.params.tolist(),
        "last_loss": js.last_loss,
        "members": list(js.members),
        "open": js.open_membership,
        "counters": sorted(js.counters.items()),
        "ledger": [(w, vars(r)) for w, r in js.ledger.records.items()],
        "seen": sorted(js._high_water.items()),
        "round": js.round_size(),
        "deadline": js.round_deadline(),
    }


strategies_st = st.one_of(
    st.builds(lambda s: {"mode": "async", "max_staleness": s}, st.integers(0, 3)),
    st.builds(
        lambda lo, mult: {"mode": "adaptive", "adaptive_min_staleness": lo, "adaptive_multiplier": mult},
        st.integers(0, 2),
        st.sampled_from([1.0, 2.0, 3.0]),
    ),
    st.builds(lambda t: {"mode": "sync", "straggler_timeout_s": t}, st.sampled_from([0.5, 2.0, 1e6])),
    st.builds(
        lambda s, k, t: {
            "mode": "buffered_async",
            "max_staleness": s,
            "straggler_timeout_s": t,
            "strategy_options": {"buffer_size": k},
        },
        st.integers(0, 3),
        st.integers(1, 4),
        st.sampled_from([0.5, 1e6]),
    ),
    st.builds(lambda t: {"mode": "diloco", "straggler_timeout_s": t, "local_steps": 2}, st.sampled_from([1.0, 1e6])),
)
ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 5), st.integers(0, 5), st.integers(-1, 4)),
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.3, 1.0, 2.5])),
        st.tuples(st.just("members"), st.lists(st.integers(0, 5), unique=True, max_size=5)),
        st.tuples(st.just("expire")),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(strategies_st, st.integers(1, 8), st.one_of(st.none(), st.lists(st.integers(0, 5), unique=True)), ops_st)
def test_refusing_a_stale_update_does_what_the_parameter_server_does(
    strategy: dict[str, Any], rounds: int, members: list[int] | None, ops: list[tuple[Any, ...]]
) -> None:
    clock = VirtualClock()
    spec = adapters.job_spec(SimConfig(rounds=rounds, **strategy))
    fast = adapters.make_job_state(spec, [], clock)
    ref = adapters.make_job_state(spec, [], clock)
    if members is not None:
        for js in (fast, ref):
            adapters.set_members(js, [IDS[i] for i in members])
    for op in ops:
        if op[0] == "push":
            _, who, step, age = op
            base = fast.version - age if age >= 0 else fast.version + 1  # -1: ahead of the server
            base = max(0, base)
            before = job_state(fast)
            got = adapters.refuse_stale(fast, IDS[who], step, base)
            if got is None:  # not refused for its age (or not sure): nothing changed, the PS decides
                assert job_state(fast) == before
                got = adapters.push(fast, IDS[who], step, base)
            assert got == reference_push(ref, IDS[who], step, base)
        elif op[0] == "wait":
            clock.advance(clock.now + op[1])
        elif op[0] == "members":
            for js in (fast, ref):
                adapters.set_members(js, [IDS[i] for i in op[1]])
        else:
            assert adapters.expire(fast, clock.now) == adapters.expire(ref, clock.now)
        assert job_state(fast) == job_state(ref)


def test_the_fast_path_is_taken_for_stale_async_updates() -> None:
    clock = VirtualClock()
    spec = adapters.job_spec(SimConfig(rounds=10, mode="async", max_staleness=1))
    fast = adapters.make_job_state(spec, [], clock)
    ref = adapters.make_job_state(spec, [], clock)
    for step in range(4):
        clock.advance(clock.now + 1.0)
        assert adapters.push(fast, "a", step, fast.version) == ("APPLIED", 0)
        assert reference_push(ref, "a", step, ref.version) == ("APPLIED", 0)
    # 4 versions published: base version 1 is 3 old, over the bound of 1.
    before = dict(fast.counters)
    assert adapters.refuse_stale(fast, "b", 0, 1) == ("STALE_REJECTED", 3)
    assert reference_push(ref, "b", 0, 1) == ("STALE_REJECTED", 3)
    assert fast.counters["pushes_stale_rejected"] == before.get("pushes_stale_rejected", 0) + 1
    assert job_state(fast) == job_state(ref)
    assert adapters.refuse_stale(fast, "b", 1, 3) is None  # within the bound: the PS takes it


# -- BlockScheduler -----------------------------------------------------------------------------------------
workers_st = st.lists(
    st.builds(
        lambda i, name, flops, slow, load: WorkerView(f"id{i}", name, 16.0, flops, 1000.0, slow, load),
        st.integers(0, 10_000),
        st.sampled_from([f"n{k}" for k in range(8)]),  # names may tie: the heap must break ties as `sorted`
        st.sampled_from([10.0, 100.0]),
        st.sampled_from([1.0, 2.0]),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=30,
    unique_by=lambda w: w.worker_id,
)


@settings(max_examples=200, deadline=None)
@given(workers_st, st.integers(1, 40), st.integers(2, 5), st.sampled_from(["priority", "gale-shapley", "capability"]))
def test_block_scheduler_heap_ranks_as_sorting_every_block(
    workers: list[WorkerView], n_tasks: int, block: int, name: str
) -> None:
    tasks = [TaskView(f"t{i:03d}", "job", 1, 0.0, 0.0, i) for i in range(n_tasks)]
    telemetry = {w.worker_id: w.flops / 3 for w in workers[:3]}
    sched = adapters.BlockScheduler(get_scheduler(name), block)
    if n_tasks <= block or len(workers) <= block:  # small passes go to the scheduler whole either way
        want = sched.inner.assign(tasks, workers, telemetry)
    else:
        want = sched._assign_sorted(tasks, workers, telemetry, {w.worker_id: w.load for w in workers})
    assert sched.assign(tasks, workers, telemetry) == want


# -- registration ---------------------------------------------------------------------------------------
def _controller(clock: VirtualClock, changes: list[float]) -> adapters.SimController:
    ctl = adapters.SimController("priority", 1.0, 3, 0.3, clock, lambda job, members: None)
    ctl.set_on_change(lambda: changes.append(clock.now))
    return ctl


def _rows(ctl: adapters.SimController) -> list[dict[str, Any]]:
    """Workers in insertion order, without their random ids."""
    rows = ctl.store._all("SELECT * FROM workers ORDER BY rowid")
    return [{k: r[k] for k in r.keys() if k != "worker_id"} for r in rows]  # noqa: SIM118 (a Row yields values)


def test_batched_registration_leaves_the_store_as_one_by_one() -> None:
    specs = [(f"worker-{i}", 1.0 + i % 3, 10.0 * (i + 1)) for i in range(20)]
    clock = VirtualClock(5.0)
    one_changes: list[float] = []
    one = _controller(clock, one_changes)
    ids_one = [one.register(*s) for s in specs]
    batch_changes: list[float] = []
    batch = _controller(clock, batch_changes)
    with batch.registering():
        ids_batch = [batch.register(*s) for s in specs[:10]]
        ids_batch.append(batch.register(*specs[0]))  # a name seen twice: the second goes through the service
        ids_batch += [batch.register(*s) for s in specs[10:]]
    assert ids_batch[10] == ids_batch[0]
    del ids_batch[10]
    assert _rows(batch) == _rows(one)
    assert len(set(ids_batch)) == len(ids_one) == 20
    assert bool(batch_changes) and set(batch_changes) == set(one_changes) == {5.0}
    by_name = {w.name: w.worker_id for w in batch.store.list_workers()}
    assert [by_name[s[0]] for s in specs] == ids_batch


def test_registration_is_not_batched_while_a_task_waits() -> None:
    clock = VirtualClock()
    ctl = _controller(clock, [])
    ctl.submit(1, {})
    with ctl.registering():
        first = ctl.register("a", 1.0, 100.0)
        assert ctl.loads() == {first: 1}  # the service's own pass placed the task at once
        ctl.register("b", 1.0, 100.0)
    assert ctl.loads() == {first: 1}


# -- the event queue ---------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("at"), st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.sampled_from(list(Kind))),
            st.tuples(st.just("pop")),
            st.tuples(st.just("until"), st.sampled_from([0.0, 0.5, 1.5, 10.0])),
        ),
        max_size=80,
    )
)
def test_event_queue_orders_as_a_heap_of_time_kind_sequence(ops: list[tuple[Any, ...]]) -> None:
    """Ties are the point: many events at one instant come out by kind, then in the order scheduled."""
    queue = EventQueue(VirtualClock())
    ref: list[tuple[float, int, int, Any]] = []
    seq = 0
    for op in ops:
        if op[0] == "at":
            t = queue.clock.now + op[1]
            seq += 1
            queue.at(t, op[2], seq)
            heapq.heappush(ref, (t, op[2], seq, seq))
        elif op[0] == "pop" and ref:
            assert queue.pop() == heapq.heappop(ref)
        elif op[0] == "until":
            limit = queue.clock.now + op[1]
            got = queue.pop_until(limit)
            if ref and ref[0][0] <= limit:
                t, kind, _, data = heapq.heappop(ref)
                assert got == (kind, data) and queue.clock.now == t
            else:
                assert got is None
        assert len(queue) == len(ref)
        assert queue.peek_time() == (ref[0][0] if ref else float("inf"))
    assert queue.processed == seq - len(ref)


# -- the controller's store, service and membership under the simulator's shortcuts ---------------------------
def _twins(scheduler: str, clock: VirtualClock) -> tuple[Any, Any]:
    """(the simulator's controller parts, the plain ones) on the same settings; each collects what it sends."""
    cfg = ControllerConfig(scheduler=scheduler, heartbeat_interval_s=1.0, heartbeat_miss_limit=3)  # type: ignore[arg-type]
    out = []
    for sim in (True, False):
        store = adapters.SimStore() if sim else Store(":memory:")
        sched = adapters.BlockScheduler(get_scheduler(scheduler), block=3)
        cls = adapters.SimService if sim else ControllerService
        svc = cls(store, sched, cfg, PSEndpoint("sim", "virtual"), clock=clock)  # type: ignore[arg-type]
        sent: list[tuple[str, list[str]]] = []
        notifier = adapters.CallbackNotifier(lambda job, members, sent=sent: sent.append((job, members)))
        if sim:
            sync: MembershipSync = adapters.SimMembershipSync(
                notifier, svc.desired_members, lambda store=store: store.membership_version
            )
        else:
            sync = MembershipSync(notifier, svc.desired_members)
        out.append((store, svc, FailureDetector(svc, sync), sent))
    return out[0], out[1]


controller_ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.integers(0, 9)),
        st.tuples(st.just("heartbeat"), st.integers(0, 9)),
        st.tuples(st.just("submit"), st.integers(1, 6)),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 4.0]), st.lists(st.integers(0, 9), unique=True)),
        st.tuples(st.just("finish"),),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["priority", "gale-shapley", "capability"]), controller_ops_st)
def test_simulator_store_and_service_decide_as_the_plain_ones(scheduler: str, ops: list[tuple[Any, ...]]) -> None:
    """Random controller histories (registrations, comebacks, heartbeats, jobs, silent workers, ticks) through
    `SimStore` + `SimService` + `SimMembershipSync` and through the plain parts: the same deaths, placements,
    membership sent to the PS, loads and stale workers."""
    clock = VirtualClock()
    (sim_store, sim_svc, sim_det, sim_sent), (store, svc, det, sent) = _twins(scheduler, clock)
    ids: dict[int, str] = {}
    loads_before: dict[str, int] = {}
    jobs = 0
    for op in ops:
        if op[0] == "register":
            name = f"n{op[1]}"
            wid = ids.setdefault(op[1], f"w-{op[1]:03d}")
            req = RegisterIn(name=name, compute_slowdown=1.0 + op[1] % 2, flops=100.0 * (op[1] % 3 + 1))
            with mock.patch("dist_llm_train.controller.service.new_id", lambda prefix, wid=wid: wid):
                assert sim_svc.register(req).worker_id == svc.register(req).worker_id == wid
        elif op[0] == "heartbeat" and op[1] in ids:
            sim_svc.heartbeat(ids[op[1]], "training")
            svc.heartbeat(ids[op[1]], "training")
        elif op[0] == "submit":
            jobs += 1
            job = Job(f"job{jobs}", "j", {}, op[1], 1, 1.0, 0.0, "pending", clock.now, clock.now)
            for s in (sim_store, store):
                with s.tx():
                    s.insert_job(job)
                    s.insert_tasks(job.job_id, op[1], clock.now)
        elif op[0] == "finish" and jobs:
            for s in (sim_store, store):
                with s.tx():
                    s.set_job_state("job1", "completed", clock.now)
                    s.close_open_tasks("job1", "cancelled", clock.now)
        elif op[0] == "tick":
            clock.advance(clock.now + op[1])
            alive = {w.worker_id for w in store.list_workers("alive")}
            silent = {ids[i]: clock.now - 2.0 * op[1] - i % 2 for i in op[2] if i in ids and ids[i] in alive}
            with sim_store.tx():
                sim_store.refresh_heartbeats(clock.now, silent)
            with store.tx():  # what the simulator did before it had `refresh_heartbeats`
                store.refresh_alive_heartbeats(clock.now)
                for worker_id, last in silent.items():
                    store.touch_worker(worker_id, last, None)
            for cutoff in (clock.now - 3.0, clock.now - 0.5, clock.now):
                assert [w.worker_id for w in sim_store.stale_workers(cutoff)] == [
                    w.worker_id for w in store.stale_workers(cutoff)
                ]
            a, b = sim_det.tick(), det.tick()
            assert (a.dead, a.assigned) == (b.dead, b.assigned)
        assert sim_sent == sent
        assert sim_store.job_members() == store.job_members()
        loads = store.worker_loads()
        assert {w: n for w, n in sim_store._load.items() if n} == loads
        assert sim_store._alive == {w.worker_id for w in store.list_workers("alive")}
        changes = sim_store.take_load_changes()
        assert all(changes[w] == loads.get(w, 0) for w in changes)
        assert {w for w in set(loads) | set(loads_before) if loads.get(w, 0) != loads_before.get(w, 0)} <= set(changes)
        loads_before = loads


@pytest.mark.parametrize("scheduler", ["priority", "gale-shapley"])
def test_a_pass_with_more_tasks_than_least_loaded_workers_offers_everyone(scheduler: str) -> None:
    """Two tasks freed, one idle worker: the second task goes to the best of the rest, as the plain pass says."""
    clock = VirtualClock()
    (sim_store, sim_svc, sim_det, _), (store, svc, det, _) = _twins(scheduler, clock)
    reports = []
    for s, service, detector in ((sim_store, sim_svc, sim_det), (store, svc, det)):
        for i, flops in enumerate([50.0, 400.0, 100.0, 200.0]):
            with mock.patch("dist_llm_train.controller.service.new_id", lambda prefix, i=i: f"w-{i}"):
                service.register(RegisterIn(name=f"n{i}", flops=flops))
            if i == 2:  # three workers, three tasks: one each; the fourth registers idle
                job = Job("job", "j", {}, 3, 1, 1.0, 0.0, "pending", clock.now, clock.now)
                with s.tx():
                    s.insert_job(job)
                    s.insert_tasks("job", 3, clock.now)
                detector.tick()
        assert sorted(s.worker_loads().values()) == [1, 1, 1]
        for w in ("w-0", "w-2"):  # two holders die: two tasks pending, one worker at the lowest load
            s.mark_worker_dead(w)
            s.release_tasks_of_worker(w, clock.now)
        reports.append(detector.tick().assigned)
    assert reports[0] == reports[1] and len(reports[0]) == 2
    assert sorted(w for _, w in reports[0]) == ["w-1", "w-3"]


def test_task_updates_are_written_before_any_read_and_dropped_with_a_rolled_back_transaction() -> None:
    store = adapters.SimStore()
    job = Job("job", "j", {}, 2, 1, 1.0, 0.0, "pending", 0.0, 0.0)
    with store.tx():
        store.insert_job(job)
        store.insert_tasks("job", 2, 0.0)
    store.upsert_worker("w-1", "n1", RegisterIn(name="n1").model_dump(exclude={"name"}), 0.0)
    with store.tx():
        store.update_task("job.0", "assigned", "w-1", 1.0)
        assert store.worker_loads() == {"w-1": 1}  # a read inside the transaction sees it
        store.update_task("job.1", "assigned", "w-1", 1.0)
    assert store.worker_loads() == {"w-1": 2}
    with pytest.raises(RuntimeError), store.tx():
        store.update_task("job.0", "pending", None, 2.0)
        raise RuntimeError("a refused pass")
    assert store.worker_loads() == {"w-1": 2} and store.get_task("job.0").state == "assigned"  # type: ignore[union-attr]
