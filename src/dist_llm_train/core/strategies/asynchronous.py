"""`async`: asynchronous SGD with bounded staleness.

Each gradient is applied the moment it arrives unless it was computed on a version more than
`max_staleness` versions old (then `STALE_REJECTED`: the worker re-pulls). Optional step
scaling shrinks the learning rate for stale updates: `inverse` multiplies it by 1/(1+s)
(Zhang et al., IJCAI 2016, "Staleness-aware async-SGD"), `inverse_sqrt` by 1/sqrt(1+s).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from dist_llm_train.core.strategies.base import (
    HonestUpdate,
    StalenessGate,
    Strategy,
    StrategyConfig,
    Trainer,
    VersionRule,
    WorkerLedger,
)

StalenessScaling = Literal["none", "inverse", "inverse_sqrt"]


def step_scale(kind: StalenessScaling, staleness: int) -> float:
    """Learning-rate multiplier for an update `staleness` versions old."""
    if kind == "inverse":
        return 1.0 / (1.0 + staleness)
    if kind == "inverse_sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    return 1.0


class AsyncConfig(StrategyConfig):
    name: Literal["async"] = "async"
    max_staleness: int = Field(5, ge=0, description="Oldest base version (in versions) applied")
    staleness_scaling: StalenessScaling = Field("none", description="Learning-rate scaling of stale updates")


class Async(Strategy):
    name = "async"
    Config = AsyncConfig
    takes_robust_aggregation = False

    def __init__(self, config: AsyncConfig) -> None:
        super().__init__(config)
        self.max_staleness = config.max_staleness
        self.staleness_scaling: StalenessScaling = config.staleness_scaling

    def compute(self, trainer: Trainer) -> HonestUpdate:
        return HonestUpdate(*trainer.compute_gradient())

    def version_rule(self) -> VersionRule:
        return StalenessGate(lambda s: step_scale(self.staleness_scaling, s))

    def staleness_bound(self, worker_id: str, ledger: WorkerLedger, now: float | None) -> int:
        return self.max_staleness
