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


NULL_OBSERVER = StoreObserver()
