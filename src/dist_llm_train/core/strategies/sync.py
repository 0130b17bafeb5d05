"""`sync`: synchronous data parallelism with a parameter server.

Every member pushes the gradient of one batch computed on version v; the PS combines the
round with the job's aggregation rule (robust rules welcome) and takes one optimizer step,
publishing v + 1. A member that misses the straggler timeout loses that round's update
(`LATE_DROPPED`) and pulls the new version.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dist_llm_train.core.strategies.base import HonestUpdate, RoundStrategy, StrategyConfig, Trainer


class SyncConfig(StrategyConfig):
    name: Literal["sync"] = "sync"
    straggler_timeout_s: float = Field(
        30.0, gt=0, description="A round closes with whoever pushed after this many seconds"
    )


class Sync(RoundStrategy):
    name = "sync"
    Config = SyncConfig

    def __init__(self, config: SyncConfig) -> None:
        super().__init__(config)
        self.straggler_timeout_s = config.straggler_timeout_s

    def compute(self, trainer: Trainer) -> HonestUpdate:
        return HonestUpdate(*trainer.compute_gradient())
