"""`adaptive`: async SGD with a per-worker staleness bound from each worker's measured speed.

The PS times the interval tau_j between each worker's consecutive pushes (an EWMA on the PS
clock, so a worker cannot lie about it; see `WorkerLedger`). While worker w computes one
update, the others publish about

    m_w = tau_w * sum_{j != w} 1 / tau_j

versions, so that is the staleness its updates naturally have. Treating the count as Poisson,
m + 2 sqrt(m) covers ~97 % of a steady worker's updates, and

    bound_w = clamp(ceil(m_w + 2 sqrt(m_w)), min_staleness, min_staleness * multiplier)

A fast worker sees few versions go by and keeps a tight bound; a worker k times slower sees
about k times more and gets a looser one, so its data still reaches the model instead of being
rejected forever (what a single static bound does to a straggler). Workers silent for more than
`STALE_AFTER` of their own intervals stop counting towards the others' rates. Until a worker has
pushed twice its speed is unknown and it gets the static `max_staleness`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from dist_llm_train.core.strategies.asynchronous import Async, AsyncConfig
from dist_llm_train.core.strategies.base import WorkerLedger

STALE_AFTER = 5.0  # a worker silent for this many of its own intervals no longer counts as publishing


class AdaptiveConfig(AsyncConfig):
    name: Literal["adaptive"] = "adaptive"  # type: ignore[assignment]
    min_staleness: int = Field(5, ge=0, description="The fastest worker's bound")
    max_staleness_multiplier: float = Field(
        10.0, ge=1, description="No bound exceeds min_staleness times this"
    )


def expected_staleness(ledger: WorkerLedger, worker_id: str, now: float | None = None) -> float | None:
    """m_w: versions the other (recently active) workers publish during one of w's updates."""
    rec = ledger.records.get(worker_id)
    if rec is None or rec.interval_s is None:
        return None
    rate = 0.0
    for other, r in ledger.records.items():
        if other == worker_id or r.interval_s is None or r.last_push is None:
            continue
        if now is not None and now - r.last_push > STALE_AFTER * max(r.interval_s, 1e-9):
            continue
        rate += 1.0 / max(r.interval_s, 1e-9)
    return rec.interval_s * rate


class Adaptive(Async):
    name = "adaptive"
    Config = AdaptiveConfig

    def __init__(self, config: AdaptiveConfig) -> None:
        super().__init__(config)
        self.min_staleness = config.min_staleness
        ceiling = int(math.floor(config.min_staleness * config.max_staleness_multiplier))
        self.max_bound = max(config.min_staleness, ceiling)

    def staleness_bound(self, worker_id: str, ledger: WorkerLedger, now: float | None) -> int:
        m = expected_staleness(ledger, worker_id, now)
        if m is None:
            return self.max_staleness
        want = math.ceil(m + 2.0 * math.sqrt(m) - 1e-9)
        return int(min(self.max_bound, max(self.min_staleness, want)))
