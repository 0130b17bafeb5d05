"""`diloco`: DiLoCo (Douillard et al., 2023, arXiv 2311.08105).

Each worker runs H local AdamW steps from the pulled parameters and pushes the pseudo-gradient
params_before - params_after; the PS averages a round of them (any aggregation rule) and applies
SGD with Nesterov momentum, the outer optimizer. `training.steps` is the per-worker budget of
inner steps, so the job runs ceil(steps / H) rounds and the sample budget matches the other
strategies' at equal `steps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from dist_llm_train.core.strategies.base import (
    HonestUpdate,
    JobPlan,
    OptimizerSpec,
    RoundStrategy,
    StrategyConfig,
    Trainer,
)


class DiLoCoConfig(StrategyConfig):
    name: Literal["diloco"] = "diloco"
    local_steps: int = Field(20, ge=1, le=1_000_000, description="H: inner steps per round (paper: 500)")
    inner_lr: float | None = Field(None, gt=0, le=10, description="Inner AdamW lr; None: training.learning_rate")
    outer_lr: float = Field(0.7, gt=0, le=10, description="Outer SGD (Nesterov) learning rate")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum")
    straggler_timeout_s: float = Field(
        30.0, gt=0, description="A round closes with whoever pushed after this many seconds"
    )
    inner_lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Inner lr multipliers by parameter-name prefix (longest prefix wins, e.g. {ngram: 2.0}): a worker's "
            "Adam normalises its own small-batch gradients, so sparse, noise-dominated rows move ~1/sqrt(workers) "
            "as far per step as under sync's Adam on the mean gradient (docs/training_protocol.md §7)"
        ),
    )

    @field_validator("inner_lr_scale")
    @classmethod
    def _finite_positive_scales(cls, scales: dict[str, float]) -> dict[str, float]:
        for prefix, factor in scales.items():
            if not prefix or prefix != prefix.strip():
                raise ValueError(f"inner_lr_scale: parameter-name prefix {prefix!r} must be non-empty, no spaces")
            if not (math.isfinite(factor) and 0 < factor <= 100):
                raise ValueError(f"inner_lr_scale[{prefix!r}] must be in (0, 100], got {factor!r}")
        return scales


class DiLoCo(RoundStrategy):
    name = "diloco"
    Config = DiLoCoConfig
    update_kind = "pseudo_gradient"

    def __init__(self, config: DiLoCoConfig) -> None:
        super().__init__(config)
        self.local_steps = config.local_steps
        self.straggler_timeout_s = config.straggler_timeout_s
        self.inner_lr = config.inner_lr
        self.inner_lr_scale: Mapping[str, float] = dict(config.inner_lr_scale)
        # Nesterov needs momentum to look ahead with; without it (SparseLoCo) the step is plain SGD either way.
        self.outer = OptimizerSpec("sgd", config.outer_lr, config.outer_momentum, nesterov=config.outer_momentum > 0)

    def validate(self, plan: JobPlan) -> None:
        super().validate(plan)
        if self.local_steps > plan.steps:
            raise ValueError(
                f"diloco local_steps H={self.local_steps} exceeds the inner-step budget steps={plan.steps}: "
                "not one round fits"
            )
        if plan.attack is not None and plan.attack_needs_spread:
            raise ValueError(
                f"attack {plan.attack!r} estimates the honest spread from several updates; a diloco attacker "
                "has one pseudo-gradient per round (use sign_flip, gaussian or ipm)"
            )

    def steps_per_update(self) -> int:
        return self.local_steps

    def server_optimizer(self, requested: OptimizerSpec) -> OptimizerSpec:
        return self.outer

    def compute(self, trainer: Trainer) -> HonestUpdate:
        return HonestUpdate(*self.inner_steps(trainer, self.local_steps))

    def inner_steps(self, trainer: Trainer, h: int) -> tuple[np.ndarray, float, int]:
        """h inner AdamW steps at the inner learning rate: (params before − after, mean loss, samples)."""
        lr = self.inner_lr if self.inner_lr is not None else trainer.learning_rate
        if self.inner_lr_scale:
            return trainer.local_steps(h, lr, self.inner_lr_scale)
        return trainer.local_steps(h, lr)
