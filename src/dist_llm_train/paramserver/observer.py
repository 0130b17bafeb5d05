"""What the store reports as it works; `metrics.PSMetrics` turns it into Prometheus series.

Kept as a tiny interface so the store (and its unit tests) need no metrics registry.
"""

from __future__ import annotations

from dist_llm_train.paramserver.types import PushOutcome


class StoreObserver:
    """No-op base: override what you need. Called with the job lock held, so keep it cheap."""

    def push_outcome(self, job_id: str, outcome: PushOutcome) -> None:
        pass

    def round_closed(self, job_id: str, seconds: float) -> None:
        pass

    def version(self, job_id: str, version: int) -> None:
        pass

    def members(self, job_id: str, count: int) -> None:
        pass

    def worker_push(self, job_id: str, worker_id: str, outcome: PushOutcome, staleness_bound: int) -> None:
        """One worker's push was decided; `staleness_bound` is the bound its next push is held to."""

    def update_bytes(self, job_id: str, kind: str, codec: str, nbytes: int) -> None:
        """Payload bytes of one received update, by kind (gradient / pseudo_gradient) and codec."""


NULL_OBSERVER = StoreObserver()
