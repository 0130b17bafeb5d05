"""`sparseloco`: SparseLoCo (Sarfi, Thérien, Lidin & Belilovsky, 2025, arXiv 2508.15706).

DiLoCo with its outer momentum replaced by the workers' error feedback. Each worker runs H inner
AdamW steps, forms the pseudo-gradient Δ_r, and compresses it through a *decaying* error-feedback
accumulator before pushing:

    e_r ← β·e_r + Δ_r;   Δ̂_r = Q(TopK(e_r));   e_r ← e_r − Δ̂_r

The PS averages the round's Δ̂_r (or applies the robust rule) and takes a plain SGD step with the outer
learning rate α and no momentum: θ ← θ − α·mean(Δ̂_r). The paper's observation is that the decayed
accumulator already acts as momentum (what a coordinate did not send builds up until it is among the
top-k), so with 1–3 % chunk-wise top-k and 2-bit values it matches or beats full-precision DiLoCo at
two to three orders of magnitude fewer bytes.

The compression itself is the worker's codec (`training.codec`, normally `sparseloco`: chunk-wise top-k
with 2-bit values, `core.codecs`) with error feedback on; this strategy sets the accumulator's decay β
and the PS's outer step, and refuses to run without a lossy codec with error feedback.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dist_llm_train.core.strategies.base import JobPlan
from dist_llm_train.core.strategies.diloco import DiLoCo, DiLoCoConfig


class SparseLoCoConfig(DiLoCoConfig):
    name: Literal["sparseloco"] = "sparseloco"  # type: ignore[assignment]
    outer_lr: float = Field(1.0, gt=0, le=10, description="α: the outer SGD learning rate (no momentum)")
    outer_momentum: float = Field(0.0, ge=0, le=0, description="Always 0: error feedback takes momentum's place")
    error_decay: float = Field(0.95, gt=0, le=1, description="β: decay of the error-feedback accumulator")


class SparseLoCo(DiLoCo):
    name = "sparseloco"
    Config = SparseLoCoConfig

    def __init__(self, config: SparseLoCoConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.error_feedback_decay = config.error_decay

    def validate(self, plan: JobPlan) -> None:
        super().validate(plan)
        if plan.codec == "none" or not plan.error_feedback:
            raise ValueError(
                f"strategy sparseloco compresses pseudo-gradients through error feedback, but training.codec is "
                f"{plan.codec!r} with error feedback {'on' if plan.error_feedback else 'off'}: set e.g. "
                "training.codec: {name: sparseloco, ratio: 0.01}"
            )
