"""What one pushed update may do: an L2 bound per update, adapted to what honest updates look like.

A parameter server that applies whatever it is sent can be broken by one push. A vector of
float32-max values is finite, so it passes every NaN/Inf check, and then overflows Adam's second
moment to inf: from that step on every parameter update is `m / inf = 0`, the model is frozen for
good while versions keep advancing. The PS therefore clips every update (before aggregation, before
central DP, before the optimizer) to an L2 norm

    B = factor × reference

where `reference` is the median L2 norm of the last `window` updates the job accepted (after their
own clipping), and, until `warmup` updates have been seen, the L2 norm of the current parameters
but at least 1 (an honest update does not move the parameters by many times their own length; 1 is
the largest norm of an honest gradient under the default `gradient_clip_norm`). An optional
absolute `max_norm` caps B further. The median ignores a minority of attackers, so they cannot
raise the bound; a clipped update keeps its direction.

Why `factor = 10` by default (`benchmarks/update_bound.py`): on this project's default GPT (103k
parameters, markov and markov-hard data) honest gradients have norm ≤ 1.0 with the default
`gradient_clip_norm` (3.4 with clipping off), DiLoCo pseudo-gradients 3.6 (H = 10), ||θ₀|| ≈ 18.5,
and no honest update was more than 1.95× the median of the 32 before it. So 10× never clipped an
honest update, and an update at the bound adds at most
(1 - β₂)·10² = 0.1 of an honest step's g² to Adam's second moment: it cannot stall Adam. The
docs (docs/security.md, "Input hygiene and poison-proof numerics") give the interplay with DP
clipping and robust rules.

numpy + pydantic only (the PS imports it); `l2_norm` is overflow-safe for any finite float32 vector.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class UpdateBoundConfig(BaseModel):
    """`training.update_bound`: the PS's per-update L2 bound (on by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(True, description="Clip every pushed update to the bound (false: apply as sent)")
    factor: float = Field(
        10.0, ge=1.0, le=1e6, description="B = factor x the median norm of recent accepted updates"
    )
    window: int = Field(32, ge=1, le=4096, description="How many recent accepted norms the median is taken over")
    warmup: int = Field(
        4, ge=1, le=4096, description="Until this many updates were seen, the reference is the parameters' norm"
    )
    max_norm: float | None = Field(None, gt=0, le=1e30, description="An absolute cap on B (None: none)")


_F32_TINY = float(np.finfo(np.float32).tiny)


def l2_norm(vec: np.ndarray) -> float:
    """The L2 norm of a finite vector without overflow (inf only if an element is not finite).

    One float32 BLAS dot in the common case; only when the squares overflow (norm above ~1.8e19)
    is the vector rescaled by its largest magnitude and the norm taken in float64."""
    flat = vec.reshape(-1)
    if flat.size == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        sq = float(np.dot(flat, flat))
    if math.isfinite(sq):
        return math.sqrt(sq)
    biggest = float(np.max(np.abs(flat)))
    if not math.isfinite(biggest):
        return math.inf
    scaled = flat.astype(np.float64) / biggest
    return biggest * math.sqrt(float(np.dot(scaled, scaled)))


def scale_to_norm(vec: np.ndarray, norm: float, bound: float) -> np.ndarray:
    """`vec` (of L2 norm `norm` > `bound`) scaled to norm a hair under `bound`, as a fresh float32 vector.

    A factor below float32's normal range (a huge input) is applied in float64, and the result cast back."""
    factor = bound / norm * (1.0 - 1e-6)  # float32 rounding can never land above the bound
    if factor >= _F32_TINY:  # the usual case: one float32 pass (rounding moves the norm by ~1e-7 relative)
        return np.multiply(vec, np.float32(factor), dtype=np.float32)
    return (vec.astype(np.float64) * factor).astype(np.float32)


class UpdateBound:
    """One job's bound: decides B from recent history and clips an update to it.

    Not thread-safe: the PS calls it with the job's lock held."""

    def __init__(self, config: UpdateBoundConfig) -> None:
        self.config = config
        self._recent: deque[float] = deque(maxlen=config.window)
        self.seen = 0

    def bound(self, params_norm: float) -> float:
        """The current B (inf when disabled); `params_norm` is the reference during warm-up."""
        cfg = self.config
        if not cfg.enabled:
            return math.inf
        if self.seen < cfg.warmup or not self._recent:
            # Warm-up: no honest norm seen yet. The parameters' own length, and at least 1 (the default
            # gradient_clip_norm: an honest clipped gradient's largest norm) for all-zero parameters.
            reference = max(params_norm, 1.0)
        else:
            # A tiny floor: a run of zero updates must not clip everything to exactly 0.
            reference = max(float(np.median(np.fromiter(self._recent, dtype=np.float64))), 1e-12)
        limit = cfg.factor * reference
        return limit if cfg.max_norm is None else min(limit, cfg.max_norm)

    def clip(self, vec: np.ndarray, norm: float, bound: float) -> tuple[np.ndarray, bool]:
        """(the update within `bound`, whether it was clipped); `norm` is `l2_norm(vec)`."""
        if norm <= bound:
            return vec, False
        return scale_to_norm(vec, norm, bound), True

    def record(self, norm: float) -> None:
        """Remember an accepted update's norm (after clipping)."""
        self._recent.append(norm)
        self.seen += 1
