"""`gale-shapley`: tasks propose, workers accept; the result is a stable matching.

Preferences, both sides:

* **Tasks rank workers by capability fit.** A worker without enough memory for the task
  is unacceptable (not on the list). Acceptable workers are ranked by effective flops
  (declared flops / compute_slowdown, higher first), then link bandwidth (higher first),
  then memory surplus over what the task needs (smaller first: best fit, so big-memory
  workers stay free for big tasks), then name.
* **Workers rank tasks by priority, then required flops.** Higher priority first, then
  the heavier task (more required flops) first, since a worker can only be as useful as
  the work it takes; then submission order and id for determinism.

Each round of the shared balancing rule (see `base`) is one task-proposing deferred
acceptance over the workers the rule allows, so every round's matching has no blocking
pair: no task and worker that both prefer each other to what they got.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

from dist_llm_train.controller.schedulers.base import (
    Assignment,
    TaskView,
    Telemetry,
    WorkerView,
    balanced_assign,
)


def task_preference(task: TaskView, w: WorkerView) -> tuple[float, float, float, str]:
    """Sort key for a task's list of workers (smaller = more preferred)."""
    return (-w.effective_flops, -w.bandwidth_mbps, w.memory_gb - task.required_memory_gb, w.name)


def worker_preference(t: TaskView) -> tuple[int, float, int, str]:
    """Sort key for a worker's ranking of tasks (smaller = more preferred)."""
    return (-t.priority, -t.required_flops, t.order, t.task_id)


def stable_match(
    task_prefs: Mapping[str, Sequence[str]], worker_rank: Mapping[str, Mapping[str, int]]
) -> dict[str, str]:
    """Task-proposing deferred acceptance (Gale & Shapley, 1962); returns task -> worker.

    `task_prefs[t]` lists acceptable workers, most preferred first. `worker_rank[w][t]` is
    w's rank of t (lower is better); a task w has no rank for is unacceptable to w.
    """
    next_choice = {t: 0 for t in task_prefs}
    held: dict[str, str] = {}  # worker -> task it tentatively accepted
    free = sorted(task_prefs)
    # Each task proposes to each worker at most once, and leaves the free list once exhausted.
    bound = sum(len(p) for p in task_prefs.values()) + len(task_prefs)
    for _ in range(bound):
        if not free:
            break
        t = free.pop()
        prefs = task_prefs[t]
        if next_choice[t] >= len(prefs):
            continue  # t exhausted its list: stays unmatched
        w = prefs[next_choice[t]]
        next_choice[t] += 1
        ranks = worker_rank.get(w, {})
        if t not in ranks:
            free.append(t)
            continue
        current = held.get(w)
        if current is None:
            held[w] = t
        elif ranks[t] < ranks[current]:
            held[w] = t
            free.append(current)
        else:
            free.append(t)
    return {t: w for w, t in held.items()}


def _round(tasks: Sequence[TaskView], candidates: Mapping[str, list[WorkerView]]) -> list[Assignment]:
    by_id = {t.task_id: t for t in tasks}
    task_prefs: dict[str, list[str]] = {}
    for t in tasks:
        ranked = sorted(candidates[t.task_id], key=partial(task_preference, t))
        task_prefs[t.task_id] = [w.worker_id for w in ranked]
    proposers: dict[str, list[TaskView]] = {}
    for t in tasks:
        for w in candidates[t.task_id]:
            proposers.setdefault(w.worker_id, []).append(t)
    worker_rank = {
        w: {t.task_id: i for i, t in enumerate(sorted(ts, key=worker_preference))}
        for w, ts in proposers.items()
    }
    matching = stable_match(task_prefs, worker_rank)
    return sorted(((t, w) for t, w in matching.items()), key=lambda p: worker_preference(by_id[p[0]]))


class GaleShapleyScheduler:
    name = "gale-shapley"

    def assign(
        self, pending_tasks: Sequence[TaskView], live_workers: Sequence[WorkerView], telemetry: Telemetry
    ) -> list[Assignment]:
        return balanced_assign(pending_tasks, live_workers, _round)
