"""`buffered_async`: buffered asynchronous aggregation (FedBuff: Nguyen, Malik, Zhao, Sanjabi, Esposito,
Rabbat & Huba, AISTATS 2022, "Federated Learning with Buffered Asynchronous Aggregation", arXiv 2106.06639).

Workers push gradients and pull again at once, as with `async`: there is no barrier. The PS does not
apply each update on arrival; it buffers the accepted ones and publishes a version every K =
`buffer_size` of them. An update computed on version b and arriving at version v has staleness
s = v - b (the version cannot move while a buffer fills: only this rule publishes, so the staleness an
update arrives with is the staleness it is applied with). Updates with s > `max_staleness` are refused
(`STALE_REJECTED`: the worker re-pulls). A full buffer Δ_1 … Δ_K is combined as

    a(s)  = 1/sqrt(1+s)               FedBuff's weight (`staleness_weighting`: inverse_sqrt, inverse, none)
    w_k   = a(s_k) / Σ_j a(s_j)       normalised over the buffer
    x_k   = K · w_k · Δ_k             so that mean(x_1 … x_K) = Σ_k w_k Δ_k
    θ_{v+1} = opt(θ_v, A(x_1 … x_K), lr · server_lr)

with A the job's aggregation rule. FedBuff itself divides by K (Σ a(s_k) Δ_k / K), which also shrinks
the step as the whole buffer grows stale; here the weights only rank a buffer's updates against each
other, and `server_lr` (FedBuff's η_g) is the one knob for the step size.

Robust aggregation is allowed: a buffer is a batch of K updates, so a rule over it is defined when its
precondition holds for n = K (checked at config time, beside the usual check for n = num_workers). Its
`f` counts updates in a buffer: a worker may hold several of a buffer's K slots (a fast worker pushes
more often), so a Byzantine worker pushing faster than the honest ones can hold more than one. For the
same reason central DP is refused: one worker's share of a version may be several clipped updates, so
the version's sensitivity to a worker is not the clip bound the noise is calibrated to (local DP is fine).

A buffer that does not fill (too few live workers, most updates refused) publishes what it holds
`straggler_timeout_s` after its first update, like a sync round's straggler timeout.

Budget: as for `async`, `training.steps` counts applied updates (one batch each), so the job runs
⌈steps / K⌉ versions. Buffered async at steps = N·S therefore applies as many samples as sync with N
workers at steps = S (S rounds of N updates). A buffer published short by its timeout still counts as
a version, so a run with timeouts applies fewer than `steps` updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field

from dist_llm_train.core.aggregation import validate_aggregator
from dist_llm_train.core.strategies.asynchronous import StalenessScaling, step_scale
from dist_llm_train.core.strategies.base import (
    HonestUpdate,
    JobPlan,
    JobView,
    Strategy,
    StrategyConfig,
    Trainer,
    VersionRule,
    WorkerLedger,
    refuse_if_stale,
)
from dist_llm_train.core.types import PushOutcome, PushResult


class BufferedAsyncConfig(StrategyConfig):
    name: Literal["buffered_async"] = "buffered_async"
    buffer_size: int = Field(
        4, ge=1, le=100_000, description="K: accepted updates per published version (paper: 10 of ~100s in flight)"
    )
    max_staleness: int = Field(5, ge=0, description="Oldest base version (in versions) accepted into a buffer")
    staleness_weighting: StalenessScaling = Field(
        "inverse_sqrt", description="a(s) weighting a buffer's updates by staleness, normalised over the buffer"
    )
    server_lr: float = Field(1.0, gt=0, le=10, description="eta_g: multiplies the PS learning rate of every version")
    straggler_timeout_s: float = Field(
        30.0, gt=0, description="A buffer publishes what it holds this many seconds after its first update"
    )


def staleness_weights(staleness: Sequence[int], kind: StalenessScaling) -> np.ndarray:
    """w_k = a(s_k) / Σ_j a(s_j): the normalised weights of a buffer's updates (float64, summing to 1)."""
    if not staleness:
        raise ValueError("a buffer needs at least one update to weigh")
    a = np.array([step_scale(kind, s) for s in staleness], dtype=np.float64)
    return a / a.sum()


@dataclass
class _Buffer:
    opened_at: float
    updates: list[np.ndarray] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)


class StalenessBuffer(VersionRule):
    """Accepted updates wait in a buffer; every `size`-th accepted one publishes a version combining them.

    An update staler than its worker's bound is refused (`STALE_REJECTED`). The buffer also publishes,
    short, `timeout_s` after its first update (`expire`); membership changes do not touch it.
    """

    def __init__(self, size: int, weighting: StalenessScaling, lr_scale: float, timeout_s: float) -> None:
        self.size = size
        self.weighting: StalenessScaling = weighting
        self.lr_scale = lr_scale
        self.timeout_s = timeout_s
        self._buffer: _Buffer | None = None

    def on_update(self, job: JobView, worker_id: str, vec: np.ndarray, staleness: int, now: float) -> PushResult:
        refused = refuse_if_stale(job, worker_id, staleness)
        if refused is not None:
            return refused
        job.join(worker_id)
        buf = self._buffer
        if buf is None:
            buf = self._buffer = _Buffer(now)
        buf.updates.append(vec)
        buf.staleness.append(staleness)
        if len(buf.updates) >= self.size:
            self._publish(job, now, timed_out=False)
            return PushResult(PushOutcome.APPLIED, job.version, staleness, f"buffer of {self.size} published")
        return PushResult(PushOutcome.BUFFERED, job.version, staleness, f"{len(buf.updates)} of {self.size} buffered")

    def _publish(self, job: JobView, now: float, timed_out: bool) -> None:
        buf = self._buffer
        assert buf is not None and buf.updates
        self._buffer = None
        n = len(buf.updates)
        rows = np.stack(buf.updates)  # a copy: decoded updates may be read-only views of their payloads
        if self.weighting != "none" and len(set(buf.staleness)) > 1:  # else every weight is 1/n: x_k = Δ_k
            scale = n * staleness_weights(buf.staleness, self.weighting)
            rows *= scale.astype(np.float32)[:, None]
        job.apply(np.asarray(job.aggregate(rows), dtype=np.float32), n, self.lr_scale)
        job.round_closed(now - buf.opened_at, timed_out)

    def deadline(self) -> float | None:
        buf = self._buffer
        return None if buf is None else buf.opened_at + self.timeout_s

    def expire(self, job: JobView, now: float) -> bool:
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return False
        self._publish(job, now, timed_out=True)
        return True

    def pending_updates(self) -> int:
        buf = self._buffer
        return 0 if buf is None else len(buf.updates)


class BufferedAsync(Strategy):
    name = "buffered_async"
    Config = BufferedAsyncConfig

    def __init__(self, config: BufferedAsyncConfig) -> None:
        super().__init__(config)
        self.buffer_size = config.buffer_size
        self.max_staleness = config.max_staleness
        self.staleness_weighting: StalenessScaling = config.staleness_weighting
        self.server_lr = config.server_lr
        self.straggler_timeout_s = config.straggler_timeout_s

    def validate(self, plan: JobPlan) -> None:
        super().validate(plan)
        try:
            validate_aggregator(plan.aggregation, self.buffer_size, **plan.aggregation_params)
        except ValueError as err:
            raise ValueError(
                f"{err} (n = strategy.buffer_size: a buffered_async version combines one buffer of K updates)"
            ) from None
        if plan.central_dp:
            raise ValueError(
                "central DP calibrates noise to one clipped update per worker and version, but a buffered_async "
                "worker may hold several updates of one buffer: use dp.mode: local"
            )

    def versions(self, steps: int) -> int:
        return math.ceil(steps / self.buffer_size)

    def steps_for_versions(self, versions: int) -> int:
        return versions * self.buffer_size

    def max_releases(self, steps: int) -> int:
        return steps  # a worker may have pushed any of the job's updates

    def compute(self, trainer: Trainer) -> HonestUpdate:
        return HonestUpdate(*trainer.compute_gradient())

    def version_rule(self) -> VersionRule:
        return StalenessBuffer(self.buffer_size, self.staleness_weighting, self.server_lr, self.straggler_timeout_s)

    def staleness_bound(self, worker_id: str, ledger: WorkerLedger, now: float | None) -> int:
        return self.max_staleness
