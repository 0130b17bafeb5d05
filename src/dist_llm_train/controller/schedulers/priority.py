"""`priority`: the highest-priority task goes to the least-loaded, most capable worker.

Most capable means highest declared effective flops (flops / compute_slowdown), then
memory, then link bandwidth. Least-loaded is the shared balancing rule in `base`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dist_llm_train.controller.schedulers.base import (
    Assignment,
    TaskView,
    Telemetry,
    WorkerView,
    balanced_assign,
    greedy_round,
)


def declared_capability(w: WorkerView) -> tuple[float, ...]:
    return (w.effective_flops, w.memory_gb, w.bandwidth_mbps)


class PriorityScheduler:
    name = "priority"

    def assign(
        self, pending_tasks: Sequence[TaskView], live_workers: Sequence[WorkerView], telemetry: Telemetry
    ) -> list[Assignment]:
        return balanced_assign(pending_tasks, live_workers, greedy_round(declared_capability))
