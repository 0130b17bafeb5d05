"""What a training strategy is: one object that owns an algorithm end to end.

A strategy answers, for one job (Flower's `Strategy` ABC is the model):

* **config time** — `validate(plan)`: is it defined for this many workers, this step budget,
  this aggregation rule and attack? (`ValueError` naming the keys and the numbers);
  `versions(steps)`: how many PS versions the job's step budget buys (`steps_for_versions` is its
  inverse, `max_releases` the most updates one worker may have applied); `server_optimizer`: which
  optimizer the PS runs (DiLoCo swaps in its outer optimizer).
* **worker time** — `compute(trainer)`: the honest update a worker computes at the pulled
  parameters and its kind (`update_kind`: gradient or pseudo-gradient, which is also the byte
  class the PS counts it under); `next_min_version`: whether the worker waits for the next
  version before pulling again; `receive`: what a pulled vector does to the worker's parameters
  (load them, or merge one fragment); `overlap_steps` / `overlap`: local steps run while the push
  and the next pull are in flight. The worker loop is, for every strategy:
  receive(pull) → [compute → push ‖ overlap → receive(pull)]*.
* **PS time** — `version_rule()`: a fresh `VersionRule` per job that decides what a push does to
  the job and when a version closes. Two rules here cover most strategies: `RoundBarrier` (a
  version per round of member updates, aggregated; sync and the DiLoCo family) and
  `StalenessGate` (each update applied on arrival if it is not staler than the worker's bound;
  async and adaptive). A new strategy either reuses one of them or brings its own
  (buffered_async's `StalenessBuffer`). `region(version, size)`: which part of the parameters a
  version's updates cover (all of it, except Streaming DiLoCo's fragments).
* **surface** — `describe()`: the strategy's own fields for `/status` and the run report.

Everything generic around it stays outside: the worker's attack / local DP / codec pipeline is
`core.worker_update`, aggregation rules and central DP are `core.aggregation` / `core.privacy`,
the PS's bookkeeping (versions, optimizer, counters, replay protection) is `paramserver.job`.

numpy + pydantic only: the PS builds strategies and must not import torch. The worker hands
`compute` an object satisfying the `Trainer` protocol (the torch-side `training.trainer`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from dist_llm_train.core.types import PushOutcome, PushResult, WorkerStats

UpdateKind = Literal["gradient", "pseudo_gradient"]
UPDATE_KINDS: tuple[UpdateKind, ...] = ("gradient", "pseudo_gradient")


class StrategyConfig(BaseModel):
    """A strategy's own settings. Subclasses narrow `name` to a Literal and add their fields (with docs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str


class Trainer(Protocol):
    """The torch-side trainer as a strategy sees it (implemented by `training.trainer.LocalTrainer`)."""

    @property
    def learning_rate(self) -> float:
        """The configured local learning rate (`training.learning_rate`)."""
        ...

    def compute_gradient(self) -> tuple[np.ndarray, float, int]:
        """(flat gradient, loss, samples) of one batch at the current parameters."""
        ...

    def local_steps(
        self, h: int, lr: float, lr_scale: Mapping[str, float] | None = None
    ) -> tuple[np.ndarray, float, int]:
        """Run h local optimizer steps, lr times `lr_scale`'s factor for parameters whose name has one of its
        prefixes (longest wins); (params_before - params_after, mean loss, samples)."""
        ...

    def params(self) -> np.ndarray:
        """The current parameters, flat float32 (a copy)."""
        ...

    def set_params(self, vec: np.ndarray) -> None:
        """Load flat float32 parameters."""


@dataclass(frozen=True)
class JobPlan:
    """What a strategy may check its settings against at config time."""

    num_workers: int
    steps: int  # the training budget in worker steps (`training.steps`)
    aggregation: str  # the aggregation rule's name
    attack: str | None = None
    attack_needs_spread: bool = False  # the attack estimates the honest updates' spread from several draws
    aggregation_params: dict[str, float] = field(default_factory=dict)  # the rule's parameters for num_workers
    central_dp: bool = False  # the PS clips and noises each version (DP-FedAvg's trusted aggregator)
    codec: str = "none"  # the codec workers push with (`training.codec.name`)
    error_feedback: bool = False  # whether workers keep what the codec dropped


@dataclass(frozen=True)
class OptimizerSpec:
    """The PS optimizer of a job: `sgd` (momentum, optional Nesterov) or `adam`."""

    name: str = "adam"
    learning_rate: float = 0.003
    momentum: float = 0.9
    nesterov: bool = False
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class HonestUpdate:
    """What a worker computed before any attack, privacy or codec touched it."""

    vec: np.ndarray
    loss: float
    samples: int
    slot: int = 0  # which part of the parameters `vec` covers (Streaming DiLoCo's fragment): error feedback's key


# -- what the PS offers a version rule ----------------------------------------------------------
class JobView(Protocol):
    """The parts of a PS job a `VersionRule` may read and change (implemented by `paramserver.job.JobState`)."""

    @property
    def version(self) -> int: ...

    @property
    def members(self) -> Sequence[str]: ...

    def join(self, worker_id: str) -> None:
        """Add a worker to an open-membership job (no-op when membership is fixed)."""

    def aggregate(self, updates: np.ndarray) -> np.ndarray:
        """Combine (n, d) updates with the job's rule (central DP and fallbacks included); a lone plain
        update comes back as it is, without a copy (the async hot path)."""
        ...

    def apply(self, update: np.ndarray, count: int, lr_scale: float = 1.0) -> None:
        """Step the optimizer on `update` (the combination of `count` updates) and publish version + 1.
        `update` covers the strategy's `region` of the current version (the whole vector by default)."""

    def round_closed(self, duration_s: float, timed_out: bool) -> None:
        """Count a closed round."""

    def staleness_bound(self, worker_id: str) -> int:
        """The bound the strategy sets for this worker now (see `Strategy.staleness_bound`)."""
        ...


class VersionRule(ABC):
    """Per-job PS state of a strategy: what a push does, and when a version closes."""

    @abstractmethod
    def on_update(self, job: JobView, worker_id: str, vec: np.ndarray, staleness: int, now: float) -> PushResult:
        """Take one decoded, validated update computed on version `job.version - staleness`."""

    def deadline(self) -> float | None:
        """Clock time at which `expire` must be called (None: nothing pending)."""
        return None

    def expire(self, job: JobView, now: float) -> bool:
        """Close whatever waited too long; True when a version was published."""
        return False

    def members_changed(self, job: JobView, now: float) -> None:  # noqa: B027 - optional hook
        """Membership was replaced: a version waiting for no one may close now."""

    def pending_updates(self) -> int:
        """Updates buffered for the next version (sizes work; a racy read is fine)."""
        return 0


@dataclass
class _Round:
    base_version: int
    opened_at: float
    updates: dict[str, np.ndarray] = field(default_factory=dict)


class RoundBarrier(VersionRule):
    """A version per round: the updates computed on the current version, aggregated by the job's rule.

    A round opens with its first update and closes when every current member has contributed,
    when its straggler timeout expires (with whoever pushed), or when a membership change leaves
    no one outstanding. An update computed on an older version is dropped (`LATE_DROPPED`): its
    round is over. With open membership a worker joins by pushing.
    """

    def __init__(self, straggler_timeout_s: float) -> None:
        self.straggler_timeout_s = straggler_timeout_s
        self._round: _Round | None = None

    def on_update(self, job: JobView, worker_id: str, vec: np.ndarray, staleness: int, now: float) -> PushResult:
        if staleness > 0:
            return PushResult(
                PushOutcome.LATE_DROPPED,
                job.version,
                staleness,
                f"round {job.version - staleness} already closed; pull version {job.version}",
            )
        rnd = self._round
        if rnd is not None and worker_id in rnd.updates:
            return PushResult(
                PushOutcome.DUPLICATE, job.version, 0, f"{worker_id!r} already contributed to round {job.version}"
            )
        if rnd is None:
            rnd = self._round = _Round(job.version, now)
        rnd.updates[worker_id] = vec
        job.join(worker_id)
        if self._done(job):
            self._close(job, now, timed_out=False)
            return PushResult(PushOutcome.APPLIED, job.version, 0, "round closed")
        return PushResult(
            PushOutcome.BUFFERED, job.version, 0, f"waiting for {len(self.outstanding(job))} more member(s)"
        )

    def outstanding(self, job: JobView) -> list[str]:
        done = self._round.updates if self._round is not None else {}
        return [m for m in job.members if m not in done]

    def _done(self, job: JobView) -> bool:
        return self._round is not None and bool(self._round.updates) and not self.outstanding(job)

    def _close(self, job: JobView, now: float, timed_out: bool) -> None:
        rnd = self._round
        assert rnd is not None and rnd.updates
        # In worker-id order, not arrival order: float sums then do not depend on who was first, so a run is
        # repeatable and P parameter-server shards (each seeing its own arrival order) sum bit-identically.
        updates = [rnd.updates[w] for w in sorted(rnd.updates)]
        combined = job.aggregate(np.stack(updates))
        self._round = None
        job.apply(np.asarray(combined, dtype=np.float32), len(updates))
        job.round_closed(now - rnd.opened_at, timed_out)

    def deadline(self) -> float | None:
        rnd = self._round
        return None if rnd is None else rnd.opened_at + self.straggler_timeout_s

    def expire(self, job: JobView, now: float) -> bool:
        deadline = self.deadline()
        if deadline is None or now < deadline or self._round is None or not self._round.updates:
            return False
        self._close(job, now, timed_out=True)
        return True

    def members_changed(self, job: JobView, now: float) -> None:
        if self._done(job):
            self._close(job, now, timed_out=False)

    def pending_updates(self) -> int:
        rnd = self._round
        return 0 if rnd is None else len(rnd.updates)


def refuse_if_stale(job: JobView, worker_id: str, staleness: int) -> PushResult | None:
    """`STALE_REJECTED` for an update staler than its worker's bound (asynchronous rules), else None."""
    bound = job.staleness_bound(worker_id)
    if staleness <= bound:
        return None
    why = f"staleness {staleness} > this worker's bound {bound}; re-pull"
    return PushResult(PushOutcome.STALE_REJECTED, job.version, staleness, why)


class StalenessGate(VersionRule):
    """Each update is applied on arrival unless it is staler than its worker's bound (`STALE_REJECTED`).

    `step_scale` maps an accepted update's staleness to a learning-rate multiplier (1.0: none).
    """

    def __init__(self, step_scale: Callable[[int], float]) -> None:
        self.step_scale = step_scale

    def on_update(self, job: JobView, worker_id: str, vec: np.ndarray, staleness: int, now: float) -> PushResult:
        refused = refuse_if_stale(job, worker_id, staleness)
        if refused is not None:
            return refused
        job.join(worker_id)
        job.apply(job.aggregate(vec[None, :]), 1, self.step_scale(staleness))
        return PushResult(PushOutcome.APPLIED, job.version, staleness)


# -- the strategy ------------------------------------------------------------------------------
class Strategy(ABC):
    """One training algorithm. Subclasses set `name`, `Config`, and implement the abstract methods."""

    name: ClassVar[str]
    Config: ClassVar[type[StrategyConfig]]
    update_kind: ClassVar[UpdateKind] = "gradient"
    rounds: ClassVar[bool] = False  # True: a barrier per version (workers wait for the round they pushed)
    takes_robust_aggregation: ClassVar[bool] = True  # False: updates are applied one by one

    def __init__(self, config: StrategyConfig) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    # config time
    def validate(self, plan: JobPlan) -> None:
        """Raise ValueError if the strategy is not defined for this job."""
        if not self.takes_robust_aggregation and plan.aggregation != "mean":
            raise ValueError(
                f"aggregation rule {plan.aggregation!r} combines a round of updates, but strategy {self.name!r} "
                "applies each update on its own: use a round-based strategy with robust aggregation"
            )

    def steps_per_update(self) -> int:
        """Local steps behind one pushed update (DiLoCo: H; 1 for a gradient)."""
        return 1

    def versions(self, steps: int) -> int:
        """PS versions the job runs for, given the per-worker step budget."""
        return math.ceil(steps / self.steps_per_update())

    def steps_for_versions(self, versions: int) -> int:
        """The step budget that buys `versions` versions (the inverse of `versions`; the simulator's rounds)."""
        return versions * self.steps_per_update()

    def max_releases(self, steps: int) -> int:
        """The most updates one worker may have applied in a job of `steps` (DP's planned releases): one per
        version for round strategies, whose members each contribute once per round."""
        return self.versions(steps)

    def server_optimizer(self, requested: OptimizerSpec) -> OptimizerSpec:
        """The optimizer the PS runs: the configured one unless the strategy brings its own."""
        return requested

    # worker time
    @abstractmethod
    def compute(self, trainer: Trainer) -> HonestUpdate:
        """The honest update at the trainer's current parameters."""

    def next_min_version(self, base_version: int) -> int:
        """Version to wait for before the next pull; 0 pulls at once."""
        return 0

    def receive(self, trainer: Trainer, params: np.ndarray, version: int) -> None:
        """The worker pulled `params` at `version`: start the next update from them (Streaming DiLoCo
        instead merges only the fragment whose round closed)."""
        trainer.set_params(params)

    overlap_steps: int = 0
    """Local steps a worker runs while its push and the next pull are in flight (0: it waits for them)."""

    error_feedback_decay: float = 1.0
    """β in e ← β·e + u before compressing (1: classic error feedback; SparseLoCo decays it like momentum)."""

    def overlap(self, trainer: Trainer) -> tuple[float, int]:
        """Run the `overlap_steps` steps; (mean loss, samples). Only called when `overlap_steps` > 0."""
        return float("nan"), 0

    def pull_wait_s(self) -> float:
        """How long that pull may wait on the PS for the version (0: it does not wait)."""
        return 0.0

    # PS time
    @abstractmethod
    def version_rule(self) -> VersionRule:
        """A fresh rule holding one job's PS-side state."""

    def staleness_bound(self, worker_id: str, ledger: WorkerLedger, now: float | None) -> int:
        """The staleness an update from `worker_id` may have and still be applied."""
        return 0

    def region(self, version: int, size: int) -> slice | None:
        """The part of a `size`-element parameter vector that updates computed on `version` cover, and
        that the version they make changes; None: all of it (every strategy but Streaming DiLoCo)."""
        return None

    def min_params(self) -> int:
        """The shortest parameter vector the strategy is defined on (its regions need one value each)."""
        return 1

    # surface
    def describe(self) -> dict[str, Any]:
        """The strategy's fields for `/status` and the run report."""
        return self.config.model_dump(exclude={"name"})


class RoundStrategy(Strategy):
    """Strategies with a barrier per version: workers wait for the round they pushed to close."""

    rounds = True
    straggler_timeout_s: float = 30.0

    def next_min_version(self, base_version: int) -> int:
        return base_version + 1

    def pull_wait_s(self) -> float:
        # A round closes within its straggler timeout; the margin covers closing it and the transfer.
        return self.straggler_timeout_s + 5.0

    def version_rule(self) -> VersionRule:
        return RoundBarrier(self.straggler_timeout_s)


# -- what the PS knows about each worker ------------------------------------------------------------
EWMA_ALPHA = 0.3  # weight of the newest push interval: reacts within a few pushes, ignores one hiccup


@dataclass
class WorkerRecord:
    pushes: int = 0
    accepted: int = 0
    rejected: int = 0
    staleness_sum: int = 0
    last_push: float | None = None
    interval_s: float | None = None  # EWMA of the time between this worker's pushes, on the PS clock


class WorkerLedger:
    """Per-worker push records kept by the PS: speed (timed on the PS clock, so a worker cannot lie about
    it) and acceptance. Soft state: not checkpointed; a restarted PS measures again within two pushes."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}

    def observe_push(self, worker_id: str, now: float) -> None:
        rec = self.records.setdefault(worker_id, WorkerRecord())
        if rec.last_push is not None:
            gap = max(0.0, now - rec.last_push)
            old = rec.interval_s
            rec.interval_s = gap if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * gap
        rec.last_push = now

    def record(self, worker_id: str, outcome: PushOutcome, staleness: int) -> None:
        rec = self.records.setdefault(worker_id, WorkerRecord())
        rec.pushes += 1
        if outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED):
            rec.accepted += 1
            rec.staleness_sum += staleness
        elif outcome in (PushOutcome.STALE_REJECTED, PushOutcome.LATE_DROPPED):
            rec.rejected += 1

    def stats(self, bound: Callable[[str], int]) -> list[WorkerStats]:
        out = []
        for worker_id in sorted(self.records):
            rec = self.records[worker_id]
            out.append(
                WorkerStats(
                    worker_id=worker_id,
                    pushes=rec.pushes,
                    accepted=rec.accepted,
                    rejected=rec.rejected,
                    staleness_bound=bound(worker_id),
                    push_interval_s=rec.interval_s or 0.0,
                    mean_staleness=rec.staleness_sum / rec.accepted if rec.accepted else 0.0,
                )
            )
        return out
