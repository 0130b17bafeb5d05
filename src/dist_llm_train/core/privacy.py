"""Differential privacy for pushed updates: per-update L2 clipping, Gaussian noise, an RDP accountant.

The mechanism is DP-FedAvg's (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models"): every update a worker sends is clipped to L2 norm `clip`, and
Gaussian noise of standard deviation `noise_multiplier * clip` is added

* **locally**, by each worker to its own clipped update before it is encoded (the PS and
  the network only ever see noisy updates), or
* **centrally**, by the PS to the *sum* of the round's clipped updates before it divides by
  the count (the PS is trusted; the aggregate is what leaves it, with n times less noise
  per worker than the local variant).

Because whole updates are clipped (not per-example gradients), the sensitivity argument
covers everything one worker contributes to a release: the guarantee is *worker-level*
(user-level) DP, as in DP-FedAvg. Every worker takes part in every release (no sampling of
workers), so the sampling rate is 1 and each release is one Gaussian mechanism; `k`
releases compose. ε for a target δ comes from Google's `dp-accounting` RDP accountant;
nothing here hand-computes a privacy bound.

numpy only, `dp_accounting` imported on first use: the parameter server imports this module
for central DP and must stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dist_llm_train.core.aggregation import Aggregator

DPMode = Literal["local", "central"]
DP_MODES: tuple[DPMode, ...] = ("local", "central")


@dataclass(frozen=True)
class DPSettings:
    """One job's DP parameters, validated on construction (nonsense is a ValueError, never a silent no-op)."""

    noise_multiplier: float
    clip: float
    mode: DPMode = "local"
    delta: float = 1e-5

    def __post_init__(self) -> None:
        z, c, d = self.noise_multiplier, self.clip, self.delta
        if not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
            raise ValueError(
                f"DP noise multiplier must be a finite number > 0, got {z!r} "
                "(0 means no privacy: epsilon = inf)"
            )
        if not (isinstance(c, int | float) and math.isfinite(c) and c > 0):
            raise ValueError(f"DP clip bound (L2 norm) must be a finite number > 0, got {c!r}")
        if self.mode not in DP_MODES:
            raise ValueError(f"DP mode must be one of {DP_MODES}, got {self.mode!r}")
        if not (isinstance(d, int | float) and 0 < d < 1):
            raise ValueError(f"DP delta must be in (0, 1), got {d!r}")

    @property
    def sigma(self) -> float:
        """Standard deviation of the noise added per coordinate to one release (sum of clipped updates)."""
        return self.noise_multiplier * self.clip


def clip_update(vec: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """`vec` scaled down to L2 norm `clip` if it is longer; returns (clipped float32, original norm).

    The norm is taken in float64 so that a float32 vector of millions of elements does not
    round its way past the bound.
    """
    arr = np.asarray(vec, dtype=np.float32)
    if arr.ndim != 1:
        raise ValueError(f"clip_update takes a 1-D vector, got shape {arr.shape}")
    norm = float(np.linalg.norm(arr.astype(np.float64)))
    if not math.isfinite(norm):
        raise ValueError("cannot clip a vector containing NaN or Inf")
    if norm <= clip:
        return arr.copy(), norm
    # Scale by a factor a hair under clip/norm so float32 rounding can never land above the bound.
    scale = np.float32(clip / norm * (1.0 - 1e-6))
    return arr * scale, norm


class LocalDP:
    """A worker's privatiser: clip its update, add N(0, (z·C)²) per coordinate; counts every release.

    `seed=None` (production) draws noise from OS entropy: a restarted worker must never replay
    the noise of its earlier releases, or differences of releases would cancel it. Seeds are for
    tests that check the noise's statistics.
    """

    def __init__(self, settings: DPSettings, seed: int | None = None) -> None:
        if settings.mode != "local":
            raise ValueError("LocalDP needs mode='local'")
        self.settings = settings
        self._rng = np.random.default_rng(seed)
        self.releases = 0
        self.clipped = 0
        self.last_norm = 0.0  # of the last update before clipping
        self.max_sent_norm = 0.0  # largest clipped (pre-noise) norm so far: never above the bound

    def privatize(self, vec: np.ndarray) -> np.ndarray:
        clipped, norm = clip_update(vec, self.settings.clip)
        self.last_norm = norm
        self.max_sent_norm = max(self.max_sent_norm, float(np.linalg.norm(clipped.astype(np.float64))))
        self.clipped += int(norm > self.settings.clip)
        self.releases += 1
        noise = self._rng.normal(0.0, self.settings.sigma, size=clipped.shape).astype(np.float32)
        return clipped + noise


class CentralDP:
    """The PS's privatiser: clip each update of a round, add N(0, (z·C)²) to their sum, divide by n.

    As for `LocalDP`, `seed=None` draws from OS entropy so a restarted PS never replays noise.
    """

    def __init__(self, settings: DPSettings, seed: int | None = None) -> None:
        if settings.mode != "central":
            raise ValueError("CentralDP needs mode='central'")
        self.settings = settings
        self._rng = np.random.default_rng(seed)
        self.releases = 0
        self.clipped = 0
        self.max_clipped_norm = 0.0

    def clip_all(self, updates: np.ndarray) -> np.ndarray:
        """Rows clipped to the bound (vectorised: one norm per row); ValueError for NaN or Inf, before or
        after the cast to float32 (an infinite row's norm would turn its clipped values into NaN)."""
        raw = np.asarray(updates)
        if not np.isfinite(raw).all():
            raise ValueError("central DP: updates contain NaN or Inf")
        with np.errstate(over="ignore"):
            x = raw.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("central DP: updates overflow float32")
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
        over = norms > self.settings.clip
        self.clipped += int(over.sum())
        scale = np.where(over, self.settings.clip / np.maximum(norms, 1e-300) * (1.0 - 1e-6), 1.0)
        out = x * scale.astype(np.float32)[:, None]
        self.max_clipped_norm = max(
            self.max_clipped_norm, float(np.linalg.norm(out.astype(np.float64), axis=1).max())
        )
        return out

    def noisy_mean(self, updates: np.ndarray) -> np.ndarray:
        clipped = self.clip_all(updates)
        total = clipped.sum(axis=0, dtype=np.float64)
        total += self._rng.normal(0.0, self.settings.sigma, size=total.shape)
        self.releases += 1
        return (total / clipped.shape[0]).astype(np.float32)


class PrivacyConfig(BaseModel):
    """Differential privacy for pushed updates (`training.dp`; absent: off)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    noise_multiplier: float = Field(ge=0, description="z: noise std is z * clip")
    clip: float | None = Field(None, gt=0, description="L2 bound per update; None: training.gradient_clip_norm")
    mode: DPMode = Field("local", description="local: each worker adds noise; central: the PS does")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta)")

    def settings(self, default_clip: float) -> DPSettings:
        """Validated settings; ValueError for a missing clip bound or zero noise."""
        clip = self.clip if self.clip is not None else default_clip
        if clip <= 0:
            raise ValueError("differential privacy needs a clip bound: set dp.clip (gradient_clip_norm is 0)")
        return DPSettings(self.noise_multiplier, clip, self.mode, self.delta)


class PrivateMean(Aggregator):
    """Central DP as an aggregation rule: the noisy mean of clipped updates (wraps the plain mean only,
    whose sensitivity to one worker is clip / n; robust rules have another and are refused)."""

    name = "private_mean"
    transforms_single = True

    def __init__(self, settings: DPSettings, seed: int | None = None) -> None:
        self.dp = CentralDP(settings, seed)

    def counts(self) -> dict[str, int]:
        return {"dp_releases": self.dp.releases, "dp_clipped_updates": self.dp.clipped}

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return self.dp.noisy_mean(x)


def private_aggregator(rule: Aggregator, settings: DPSettings, seed: int | None = None) -> PrivateMean:
    """Wrap the job's rule with central DP; ValueError unless the rule is the mean."""
    if rule.name != "mean":
        raise ValueError(
            "central DP calibrates its noise to the mean of clipped updates; "
            f"aggregation {rule.name!r} has a different sensitivity (use local DP with robust rules)"
        )
    return PrivateMean(settings, seed)


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, releases: int, delta: float, sampling_rate: float = 1.0) -> float:
    """ε after `releases` Gaussian releases of noise multiplier z, for δ, from dp-accounting's RDP accountant.

    `sampling_rate` < 1 accounts Poisson-subsampled releases (DP-SGD style); this project's
    strategies take every worker every round, so they use 1.0. Zero releases cost ε = 0.
    """
    if releases < 0:
        raise ValueError(f"releases must be >= 0, got {releases}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    DPSettings(noise_multiplier, 1.0, "local", delta)  # validates z and delta
    if releases == 0:
        return 0.0
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    event: dp_event.DpEvent = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(event, releases))
    return float(accountant.get_epsilon(delta))


def dp_report(settings: DPSettings | None, releases: int, planned_releases: int) -> dict[str, object]:
    """What `/status` and the run report show about privacy (a plain JSON-able dict)."""
    if settings is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "mode": settings.mode,
        "noise_multiplier": settings.noise_multiplier,
        "clip": settings.clip,
        "delta": settings.delta,
        "releases": releases,
        "epsilon": epsilon(settings.noise_multiplier, releases, settings.delta),
        "planned_releases": planned_releases,
        "planned_epsilon": epsilon(settings.noise_multiplier, planned_releases, settings.delta),
        "accountant": "dp-accounting RDP (Gaussian mechanism, sampling rate 1, worker-level)",
    }
