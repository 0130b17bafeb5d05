"""`capability`: the best tasks go to the workers that *measured* fastest.

Workers are ranked by the EWMA of the samples/s they reported in telemetry. A worker that
has not reported yet is estimated from its declared flops, scaled by the median
samples-per-flop ratio of the workers that have (so measured and declared figures are in
the same unit); when nobody has reported, declared effective flops rank alone. Link
bandwidth breaks ties, since a fast worker behind a thin link still waits on the PS.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from dist_llm_train.controller.schedulers.base import (
    Assignment,
    TaskView,
    Telemetry,
    WorkerView,
    balanced_assign,
    greedy_round,
)


def estimated_throughput(workers: Sequence[WorkerView], telemetry: Telemetry) -> dict[str, float]:
    """samples/s per worker: measured where known, declared flops × measured ratio otherwise."""
    measured = {w.worker_id: telemetry[w.worker_id] for w in workers if telemetry.get(w.worker_id, 0) > 0}
    ratios = [measured[w.worker_id] / w.effective_flops for w in workers if w.worker_id in measured]
    scale = statistics.median(ratios) if ratios else 1.0
    return {w.worker_id: measured.get(w.worker_id, w.effective_flops * scale) for w in workers}


class CapabilityScheduler:
    name = "capability"

    def assign(
        self, pending_tasks: Sequence[TaskView], live_workers: Sequence[WorkerView], telemetry: Telemetry
    ) -> list[Assignment]:
        speed = estimated_throughput(live_workers, telemetry)
        return balanced_assign(
            pending_tasks, live_workers, greedy_round(lambda w: (speed[w.worker_id], w.bandwidth_mbps))
        )
