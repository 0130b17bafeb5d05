"""Schedulers: each one's preferences, the shared load rule, and Gale-Shapley stability."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.controller.schedulers import SCHEDULERS, TaskView, WorkerView, get_scheduler
from dist_llm_train.controller.schedulers.base import balanced_assign, greedy_round, task_order
from dist_llm_train.controller.schedulers.capability import estimated_throughput
from dist_llm_train.controller.schedulers.gale_shapley import (
    _round,
    stable_match,
    task_preference,
    worker_preference,
)
from dist_llm_train.controller.schedulers.priority import declared_capability


def w(name: str, flops: float = 100, load: int = 0, memory: float = 16, bw: float = 1000, slow: float = 1.0):
    return WorkerView(
        name, name, memory_gb=memory, flops=flops, bandwidth_mbps=bw, compute_slowdown=slow, load=load
    )


def t(task_id: str, priority: int = 1, flops: float = 0, memory: float = 0, order: int = 0) -> TaskView:
    return TaskView(
        task_id, "job", priority=priority, required_flops=flops, required_memory_gb=memory, order=order
    )


def test_registry_names_and_unknown_name() -> None:
    assert set(SCHEDULERS) == {"priority", "gale-shapley", "capability"}
    for name in SCHEDULERS:
        assert get_scheduler(name).name == name
    with pytest.raises(ValueError, match="unknown scheduler 'fifo'.*capability"):
        get_scheduler("fifo")


def test_priority_gives_highest_priority_task_to_most_capable_worker() -> None:
    pairs = get_scheduler("priority").assign(
        [t("low", priority=1, order=0), t("high", priority=9, order=1)], [w("slow", 50), w("fast", 500)], {}
    )
    assert dict(pairs) == {"high": "fast", "low": "slow"}


def test_declared_slowdown_lowers_capability() -> None:
    pairs = get_scheduler("priority").assign([t("only")], [w("a", 300, slow=10), w("b", 100)], {})
    assert pairs == [("only", "b")]


def test_least_loaded_wins_over_most_capable() -> None:
    pairs = get_scheduler("priority").assign([t("x")], [w("fast", 1000, load=1), w("slow", 10, load=0)], {})
    assert pairs == [("x", "slow")]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_reassigned_tasks_spread_over_survivors(name: str) -> None:
    workers = [w("a", 1000, load=2), w("b", 100, load=1), w("c", 10, load=1)]
    pairs = get_scheduler(name).assign([t("d0", order=0), t("d1", order=1)], workers, {})
    assert sorted(wid for _, wid in pairs) == ["b", "c"]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_memory_requirement_is_respected(name: str) -> None:
    pairs = get_scheduler(name).assign(
        [t("big", memory=32)], [w("small", 1000, memory=8), w("large", 1, memory=64)], {}
    )
    assert pairs == [("big", "large")]
    assert get_scheduler(name).assign([t("huge", memory=128)], [w("small", memory=8)], {}) == []


def test_capability_ranks_by_measured_throughput_not_declared_flops() -> None:
    workers = [w("claims-fast", 1000), w("is-fast", 10)]
    telemetry = {"claims-fast": 5.0, "is-fast": 80.0}
    pairs = get_scheduler("capability").assign(
        [t("hi", priority=5, order=0), t("lo", order=1)], workers, telemetry
    )
    assert dict(pairs) == {"hi": "is-fast", "lo": "claims-fast"}
    # Without telemetry it falls back to the declared flops.
    pairs = get_scheduler("capability").assign([t("hi", priority=5)], workers, {})
    assert pairs == [("hi", "claims-fast")]


def test_capability_estimates_unmeasured_workers_in_measured_units() -> None:
    workers = [w("m", 100), w("new", 300)]
    est = estimated_throughput(workers, {"m": 20.0})
    assert est == {"m": 20.0, "new": pytest.approx(60.0)}  # 0.2 samples/s per flop, measured on m


def test_gale_shapley_workers_prefer_higher_priority_then_heavier_tasks() -> None:
    gs = get_scheduler("gale-shapley")
    pairs = gs.assign(
        [t("p1", priority=1, order=0), t("p5", priority=5, order=1)], [w("best", 900), w("ok", 90)], {}
    )
    assert dict(pairs) == {"p5": "best", "p1": "ok"}
    pairs = gs.assign(
        [t("light", flops=10, order=0), t("heavy", flops=1e6, order=1)], [w("best", 900), w("ok", 90)], {}
    )
    assert dict(pairs) == {"heavy": "best", "light": "ok"}


def test_stable_match_classic_example() -> None:
    # Tasks x, y both want worker A first; A prefers y, so x settles for B.
    prefs = {"x": ["A", "B"], "y": ["A", "B"]}
    ranks = {"A": {"y": 0, "x": 1}, "B": {"x": 0, "y": 1}}
    assert stable_match(prefs, ranks) == {"y": "A", "x": "B"}
    # A worker that does not rank a task never takes it.
    assert stable_match({"x": ["A"]}, {"A": {}}) == {}


@st.composite
def preference_profiles(draw: st.DrawFn) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    tasks = [f"t{i}" for i in range(draw(st.integers(0, 7)))]
    workers = [f"w{i}" for i in range(draw(st.integers(0, 7)))]
    task_prefs = {
        task: draw(st.lists(st.sampled_from(workers), unique=True)) if workers else [] for task in tasks
    }
    worker_rank = {}
    for wk in workers:
        acceptable = draw(st.lists(st.sampled_from(tasks), unique=True)) if tasks else []
        worker_rank[wk] = {task: i for i, task in enumerate(acceptable)}
    return task_prefs, worker_rank


@settings(max_examples=300, deadline=None)
@given(preference_profiles())
def test_stable_match_has_no_blocking_pair(
    profile: tuple[dict[str, list[str]], dict[str, dict[str, int]]],
) -> None:
    task_prefs, worker_rank = profile
    match = stable_match(task_prefs, worker_rank)
    held_by = {wk: task for task, wk in match.items()}
    assert len(held_by) == len(match), "a worker got two tasks"
    for task, wk in match.items():
        assert wk in task_prefs[task] and task in worker_rank[wk], "matched an unacceptable pair"
    for task, prefs in task_prefs.items():
        mine = match.get(task)
        better = prefs if mine is None else prefs[: prefs.index(mine)]
        for wk in better:
            ranks = worker_rank[wk]
            if task not in ranks:
                continue
            current = held_by.get(wk)
            assert current is not None and ranks[current] < ranks[task], f"blocking pair ({task}, {wk})"


workers_st = st.lists(
    st.builds(
        lambda i, flops, mem, bw, slow, load: WorkerView(f"w{i}", f"w{i}", mem, flops, bw, slow, load),
        st.integers(0, 1000),
        st.sampled_from([10.0, 100.0, 1000.0]),
        st.sampled_from([4.0, 16.0, 64.0]),
        st.sampled_from([10.0, 1000.0]),
        st.sampled_from([1.0, 3.0]),
        st.integers(0, 3),
    ),
    max_size=6,
    unique_by=lambda x: x.worker_id,
)
tasks_st = st.lists(
    st.builds(
        lambda i, pr, fl, mem: TaskView(f"t{i}", "j", pr, fl, mem, i),
        st.integers(0, 1000),
        st.integers(-2, 2),
        st.sampled_from([0.0, 1e3, 1e6]),
        st.sampled_from([0.0, 8.0, 32.0, 128.0]),
    ),
    max_size=10,
    unique_by=lambda x: x.task_id,
)


@settings(max_examples=150, deadline=None)
@given(tasks_st, workers_st, st.sampled_from(sorted(SCHEDULERS)))
def test_every_scheduler_obeys_the_load_rule(
    tasks: list[TaskView], workers: list[WorkerView], name: str
) -> None:
    pairs = get_scheduler(name).assign(tasks, workers, {x.worker_id: x.flops / 7 for x in workers[:2]})
    loads = {x.worker_id: x.load for x in workers}
    by_id = {x.task_id: x for x in tasks}
    wmap = {x.worker_id: x for x in workers}
    assert len({p[0] for p in pairs}) == len(pairs)
    for task_id, worker_id in pairs:
        task = by_id[task_id]
        fitting = [x for x in workers if x.fits(task)]
        assert wmap[worker_id].fits(task)
        assert loads[worker_id] == min(loads[x.worker_id] for x in fitting), (
            "a less-loaded worker was skipped"
        )
        loads[worker_id] += 1
    placed = {p[0] for p in pairs}
    for task in tasks:  # anything that fits somewhere is placed
        assert (task.task_id in placed) == any(x.fits(task) for x in workers)


@settings(max_examples=150, deadline=None)
@given(tasks_st, workers_st)
def test_each_gale_shapley_round_is_stable(tasks: list[TaskView], workers: list[WorkerView]) -> None:
    candidates = {}
    for task in tasks:
        fitting = [x for x in workers if x.fits(task)]
        if fitting:
            low = min(x.load for x in fitting)
            candidates[task.task_id] = [x for x in fitting if x.load == low]
    placeable = [x for x in tasks if x.task_id in candidates]
    match = dict(_round(placeable, candidates))
    held_by = {wk: tid for tid, wk in match.items()}
    by_id = {x.task_id: x for x in tasks}
    for task in placeable:
        for wk in candidates[task.task_id]:
            mine = match.get(task.task_id)
            task_prefers = mine is None or task_preference(task, wk) < task_preference(
                task, next(x for x in workers if x.worker_id == mine)
            )
            holder = held_by.get(wk.worker_id)
            worker_prefers = holder is None or worker_preference(task) < worker_preference(by_id[holder])
            assert not (task_prefers and worker_prefers), f"blocking pair ({task.task_id}, {wk.worker_id})"


def _plain_balanced_assign(tasks, workers, match_round):  # type: ignore[no-untyped-def]
    """The load rule as first written: every task's candidates worked out on their own, every round."""
    loads = {x.worker_id: x.load for x in workers}
    remaining = sorted(tasks, key=task_order)
    out = []
    while remaining:
        candidates = {}
        for task in remaining:
            fitting = [x for x in workers if x.fits(task)]
            if fitting:
                low = min(loads[x.worker_id] for x in fitting)
                candidates[task.task_id] = [x for x in fitting if loads[x.worker_id] == low]
        placeable = [x for x in remaining if x.task_id in candidates]
        pairs = match_round(placeable, candidates) if placeable else []
        if not pairs:
            break
        for task_id, worker_id in pairs:
            loads[worker_id] += 1
            out.append((task_id, worker_id))
        placed = {p[0] for p in pairs}
        remaining = [x for x in remaining if x.task_id not in placed]
    return out


def _plain_greedy_round(score):  # type: ignore[no-untyped-def]
    """Each task, in priority order, scans its unused candidates for the best score (then name)."""

    def match(tasks, candidates):  # type: ignore[no-untyped-def]
        used: set[str] = set()
        pairs = []
        for task in sorted(tasks, key=task_order):
            free = [x for x in candidates[task.task_id] if x.worker_id not in used]
            if free:
                best = min(free, key=lambda x: (tuple(-v for v in score(x)), x.name))
                used.add(best.worker_id)
                pairs.append((task.task_id, best.worker_id))
        return pairs

    return match


# Many like tasks and workers whose scores and names tie: what the shared candidate lists and the sorted
# greedy scan must get exactly as the plain definitions do (the simulator's first pass is 10⁵ × 10⁵).
tied_workers_st = st.lists(
    st.builds(
        lambda i, name, flops, mem, load: WorkerView(f"w{i}", name, mem, flops, 1000.0, 1.0, load),
        st.integers(0, 1000),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([10.0, 100.0]),
        st.sampled_from([4.0, 16.0, 64.0]),
        st.integers(0, 2),
    ),
    max_size=25,
    unique_by=lambda x: x.worker_id,
)
like_tasks_st = st.lists(
    st.builds(
        lambda i, pr, mem: TaskView(f"t{i}", "j", pr, 0.0, mem, i),
        st.integers(0, 1000),
        st.integers(0, 1),
        st.sampled_from([0.0, 8.0, 32.0]),
    ),
    max_size=40,
    unique_by=lambda x: x.task_id,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(tasks_st, like_tasks_st), st.one_of(workers_st, tied_workers_st))
def test_balanced_greedy_equals_the_plain_definition(tasks: list[TaskView], workers: list[WorkerView]) -> None:
    telemetry = {x.worker_id: x.flops / 7 for x in workers[:2]}
    speed = estimated_throughput(workers, telemetry)
    for score in (declared_capability, lambda x: (speed[x.worker_id], x.bandwidth_mbps)):
        want = _plain_balanced_assign(tasks, workers, _plain_greedy_round(score))
        assert balanced_assign(tasks, workers, greedy_round(score)) == want
    assert get_scheduler("priority").assign(tasks, workers, telemetry) == _plain_balanced_assign(
        tasks, workers, _plain_greedy_round(declared_capability)
    )
    assert get_scheduler("gale-shapley").assign(tasks, workers, telemetry) == _plain_balanced_assign(
        tasks, workers, _round
    )
