"""What every scheduler sees and the load-balancing rule they all obey.

A scheduler only decides *who gets what* among the candidates the balancing rule allows;
it never reads the store. `balanced_assign` runs it in rounds: in each round a task may
only go to a worker that fits it (enough memory) and has the fewest tasks among the
workers that fit it, and a worker takes at most one task per round. So a worker gets a
new task only if no live worker able to run it holds fewer, and tasks freed by a dead
worker spread across the survivors instead of piling onto the best one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Assignment = tuple[str, str]  # (task_id, worker_id)
Telemetry = Mapping[str, float]  # worker_id -> EWMA of measured samples/s


@dataclass(frozen=True)
class TaskView:
    """A pending task as schedulers see it."""

    task_id: str
    job_id: str
    priority: int = 1
    required_flops: float = 0.0
    required_memory_gb: float = 0.0
    order: int = 0  # submission order: older tasks win ties
    avoid: frozenset[str] = frozenset()  # workers that failed this task: others get it first


@dataclass(frozen=True)
class WorkerView:
    """A live worker as schedulers see it: declared capabilities plus current load."""

    worker_id: str
    name: str
    memory_gb: float = 16.0
    flops: float = 100.0
    bandwidth_mbps: float = 1000.0
    compute_slowdown: float = 1.0
    load: int = 0  # tasks it holds right now

    @property
    def effective_flops(self) -> float:
        """Declared flops divided by the declared slowdown (a straggler says it is slow)."""
        return self.flops / self.compute_slowdown

    def fits(self, task: TaskView) -> bool:
        """Enough memory, and not a worker that already failed the task."""
        return self.memory_gb >= task.required_memory_gb and self.worker_id not in task.avoid


class Scheduler(Protocol):
    """Maps pending tasks onto live workers; returns (task_id, worker_id) pairs."""

    name: str

    def assign(
        self, pending_tasks: Sequence[TaskView], live_workers: Sequence[WorkerView], telemetry: Telemetry
    ) -> list[Assignment]: ...


# One round: the tasks still waiting and, per task, the workers it may take this round.
RoundMatcher = Callable[[Sequence[TaskView], Mapping[str, list[WorkerView]]], list[Assignment]]


def task_order(task: TaskView) -> tuple[int, int, str]:
    """Highest priority first, then oldest, then id (determinism)."""
    return (-task.priority, task.order, task.task_id)


def balanced_assign(
    tasks: Sequence[TaskView], workers: Sequence[WorkerView], match_round: RoundMatcher
) -> list[Assignment]:
    """Run `match_round` until every task is placed or no task can be placed under the load rule.

    Whether a worker fits a task depends only on the task's memory requirement and the workers that failed it,
    so each round works out the candidates once per distinct pair and tasks that share it share the list
    (matchers only read it): a pass of many like tasks costs O(tasks + workers) per round rather than
    O(tasks × workers). A task goes back to a worker that failed it only when every live worker able to
    run it has failed it (its attempts still count, so a task nobody can run fails its job)."""
    loads = {w.worker_id: w.load for w in workers}
    remaining = sorted(tasks, key=task_order)
    out: list[Assignment] = []
    for _ in range(len(remaining)):  # each productive round places at least one task
        if not remaining:
            break
        candidates: dict[str, list[WorkerView]] = {}
        by_need: dict[tuple[float, frozenset[str]], list[WorkerView]] = {}
        for t in remaining:
            need = (t.required_memory_gb, t.avoid)
            cands = by_need.get(need)
            if cands is None:
                fitting = [w for w in workers if w.fits(t)]
                if not fitting and t.avoid:
                    fitting = [w for w in workers if w.memory_gb >= t.required_memory_gb]
                cands = []
                if fitting:
                    low = min(loads[w.worker_id] for w in fitting)
                    cands = [w for w in fitting if loads[w.worker_id] == low]
                by_need[need] = cands
            if cands:
                candidates[t.task_id] = cands
        placeable = [t for t in remaining if t.task_id in candidates]
        pairs = match_round(placeable, candidates) if placeable else []
        _check_round(pairs, candidates)
        if not pairs:
            break
        placed = set()
        for task_id, worker_id in pairs:
            loads[worker_id] += 1
            placed.add(task_id)
            out.append((task_id, worker_id))
        remaining = [t for t in remaining if t.task_id not in placed]
    return out


def _check_round(pairs: list[Assignment], candidates: Mapping[str, list[WorkerView]]) -> None:
    """A matcher that breaks the round's contract is a bug; fail loudly rather than overload a worker."""
    tasks = [t for t, _ in pairs]
    workers = [w for _, w in pairs]
    if len(set(tasks)) != len(tasks) or len(set(workers)) != len(workers):
        raise AssertionError(f"round matcher returned a non-matching: {pairs}")
    allowed: dict[int, set[str]] = {}  # per candidate list (tasks may share one)
    for t, w in pairs:
        cands = candidates.get(t, [])
        ids = allowed.get(id(cands))
        if ids is None:
            ids = allowed[id(cands)] = {c.worker_id for c in cands}
        if w not in ids:
            raise AssertionError(f"round matcher placed {t} on ineligible worker {w}")


def greedy_round(
    score: Callable[[WorkerView], tuple[float, ...]],
) -> RoundMatcher:
    """Tasks in priority order each take the best-scoring candidate not yet used this round.

    Best: highest score, then name; among equal keys the first in the candidate list. Each worker is scored
    once per round and each distinct candidate list sorted once (stably, so the first of equals stays first);
    a task then takes the first unused worker of its sorted list, which is exactly the minimum over its
    unused candidates."""

    def match(tasks: Sequence[TaskView], candidates: Mapping[str, list[WorkerView]]) -> list[Assignment]:
        used: set[str] = set()
        pairs: list[Assignment] = []
        keys: dict[int, tuple[tuple[float, ...], str]] = {}

        def key(w: WorkerView) -> tuple[tuple[float, ...], str]:
            k = keys.get(id(w))
            if k is None:
                k = keys[id(w)] = (tuple(-x for x in score(w)), w.name)
            return k

        ranked: dict[int, tuple[list[WorkerView], list[int]]] = {}  # per candidate list: sorted, next index
        for t in sorted(tasks, key=task_order):
            cands = candidates[t.task_id]
            entry = ranked.get(id(cands))
            if entry is None:
                entry = ranked[id(cands)] = (sorted(cands, key=key), [0])
            order, pos = entry
            i = pos[0]
            while i < len(order) and order[i].worker_id in used:
                i += 1
            pos[0] = i
            if i < len(order):
                best = order[i]
                used.add(best.worker_id)
                pairs.append((t.task_id, best.worker_id))
        return pairs

    return match
