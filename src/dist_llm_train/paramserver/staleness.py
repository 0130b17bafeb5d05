"""Staleness bounds for the asynchronous strategies, and staleness-aware step scaling.

`async` uses one bound for everyone (`spec.max_staleness`). `adaptive` gives each worker its
own bound from the measured speeds: the PS times the interval tau_j between each worker's
consecutive pushes (an EWMA on the PS clock, so a worker cannot lie about it). While worker w
computes one update, the others publish about

    m_w = tau_w * sum_{j != w} 1 / tau_j

versions, so that is the staleness its updates naturally have. Treating the count as Poisson,
m + 2 sqrt(m) covers ~97 % of a steady worker's updates, and

    bound_w = clamp(ceil(m_w + 2 sqrt(m_w)), min_staleness, min_staleness * multiplier)

A fast worker sees few versions go by and keeps a tight bound; a worker k times slower sees
about k times more and gets a looser one, so its data still reaches the model instead of
being rejected forever (what a single static bound does to a straggler). Only updates much
staler than that worker's own norm are refused. Workers silent for more than `STALE_AFTER`
of their own intervals stop counting towards the others' rates. Until a worker has pushed
twice its speed is unknown and it gets the job's static `max_staleness`.

Step scaling (`staleness_scaling` option, off by default): `inverse` multiplies the
server learning rate by 1/(1+s) (Zhang et al., IJCAI 2016, "Staleness-aware async-SGD"),
`inverse_sqrt` by 1/sqrt(1+s).

Per-worker records are soft state: they are not checkpointed, and a restarted PS measures
speeds again within two pushes per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_llm_train.paramserver.types import JobSpec, PushOutcome, WorkerStats

STALENESS_SCALING = ("none", "inverse", "inverse_sqrt")
EWMA_ALPHA = 0.3  # weight of the newest push interval: reacts within a few pushes, ignores one hiccup
STALE_AFTER = 5.0  # a worker silent for this many of its own intervals no longer counts as publishing


def step_scale(kind: str, staleness: int) -> float:
    """Learning-rate multiplier for an update `staleness` versions old."""
    if kind == "inverse":
        return 1.0 / (1.0 + staleness)
    if kind == "inverse_sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    return 1.0


@dataclass
class _Record:
    pushes: int = 0
    accepted: int = 0
    rejected: int = 0
    staleness_sum: int = 0
    last_push: float | None = None
    interval_s: float | None = None


class StalenessPolicy:
    """Decides the staleness bound of each worker and keeps the per-worker acceptance record."""

    def __init__(self, spec: JobSpec, min_staleness: int, multiplier: float) -> None:
        self.adaptive = spec.mode == "adaptive"
        self.static_bound = spec.max_staleness
        self.min_staleness = min_staleness
        self.max_bound = max(min_staleness, int(math.floor(min_staleness * multiplier)))
        self._records: dict[str, _Record] = {}

    def observe_push(self, worker_id: str, now: float) -> None:
        """Time this push against the worker's previous one (called once per accepted-for-processing push)."""
        rec = self._records.setdefault(worker_id, _Record())
        if rec.last_push is not None:
            gap = max(0.0, now - rec.last_push)
            old = rec.interval_s
            rec.interval_s = gap if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * gap
        rec.last_push = now

    def expected_staleness(self, worker_id: str, now: float | None = None) -> float | None:
        """m_w: versions the other (recently active) workers publish during one of w's updates."""
        rec = self._records.get(worker_id)
        if rec is None or rec.interval_s is None:
            return None
        rate = 0.0
        for other, r in self._records.items():
            if other == worker_id or r.interval_s is None or r.last_push is None:
                continue
            if now is not None and now - r.last_push > STALE_AFTER * max(r.interval_s, 1e-9):
                continue
            rate += 1.0 / max(r.interval_s, 1e-9)
        return rec.interval_s * rate

    def bound(self, worker_id: str, now: float | None = None) -> int:
        if not self.adaptive:
            return self.static_bound
        m = self.expected_staleness(worker_id, now)
        if m is None:
            return self.static_bound
        want = math.ceil(m + 2.0 * math.sqrt(m) - 1e-9)
        return int(min(self.max_bound, max(self.min_staleness, want)))

    def record(self, worker_id: str, outcome: PushOutcome, staleness: int) -> None:
        rec = self._records.setdefault(worker_id, _Record())
        rec.pushes += 1
        if outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED):
            rec.accepted += 1
            rec.staleness_sum += staleness
        elif outcome in (PushOutcome.STALE_REJECTED, PushOutcome.LATE_DROPPED):
            rec.rejected += 1

    def stats(self) -> list[WorkerStats]:
        out = []
        for worker_id in sorted(self._records):
            rec = self._records[worker_id]
            out.append(
                WorkerStats(
                    worker_id=worker_id,
                    pushes=rec.pushes,
                    accepted=rec.accepted,
                    rejected=rec.rejected,
                    staleness_bound=self.bound(worker_id),
                    push_interval_s=rec.interval_s or 0.0,
                    mean_staleness=rec.staleness_sum / rec.accepted if rec.accepted else 0.0,
                )
            )
        return out
