"""The engine contract: what simulates training on the virtual clock, under the control plane.

Two engines implement it. `actor_engine.ActorEngine` makes every message an event against the real
`JobState` (any strategy); `sync_engine.SyncRoundEngine` computes a round-based strategy's rounds whole, in
numpy. Both are the control plane's `DataPlane`, run until the job has its versions, nothing is left that
could publish one or virtual time runs out, and count what happened in the same `DataStats`, `Throughput`
and `TelemetryLog`. That shared part lives here; each engine's file holds how it advances time and how it
applies the PS's rules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from dist_llm_train.sim.agents import Agents
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.control import ControlPlane
from dist_llm_train.sim.dataplane import DataPlane
from dist_llm_train.sim.draws import VersionDraws
from dist_llm_train.sim.events import EventQueue
from dist_llm_train.sim.metrics import DataStats, TelemetryLog, Throughput
from dist_llm_train.sim.steps import StepModel

if TYPE_CHECKING:
    from dist_llm_train.paramserver.job import JobState

Outcome = Literal["running", "completed", "stalled", "time_limit"]
"""How a run ended ("running" until it has): the job has its versions, nothing is left that could publish one,
or virtual time ran out."""


class Numerics(Protocol):
    """What an update is made of. The per-event engine asks it for the PS's job and for every update.

    `adapters.FreeNumerics` is a one-parameter job whose maths is free (only the PS's rules and the timing
    matter: 10⁴ workers are affordable); `training.RealNumerics` trains the real model, so every update is
    the real worker pipeline's output on the parameters it pulled and the PS applies it for real."""

    def job_state(self, clock: Callable[[], float]) -> JobState:
        """A fresh job (no members yet) on the simulated PS."""
        ...

    def begin_life(self, agent: int, slot: int) -> None:
        """Worker `slot` starts a new life as `agent` (a fresh process: fresh local state)."""
        ...

    def pulled(self, js: JobState, agent: int, version: int) -> None:
        """`agent` pulled `version` (the job's current one) and computes its update from it."""
        ...

    def push(self, js: JobState, worker_id: str, step: int, agent: int, base_version: int) -> tuple[str, int]:
        """`agent`'s update arrives at the PS: (outcome name or error code, staleness)."""
        ...

    def loss(self, agent: int) -> float:
        """The training loss of `agent`'s latest update (NaN when nothing is trained)."""
        ...

    def end_life(self, agent: int) -> None:
        """`agent` died or lost its task with an update unsent: forget what it holds."""
        ...


class Engine(DataPlane, ABC):
    """Simulates the data plane (pulls, compute, pushes, the PS's versions) of one job.

    An engine implements `_set_up` (its own state), `on_members` (how it applies a membership change),
    `_advance` (one unit of progress: an event, a round) and `_wind_up` (what is still open when the run
    ends); `run` drives them.
    """

    def __init__(
        self,
        cfg: SimConfig,
        queue: EventQueue,
        control: ControlPlane,
        steps: StepModel,
        draws: VersionDraws,
        stats: DataStats,
        throughput: Throughput,
        log: TelemetryLog | None = None,
        numerics: Numerics | None = None,
    ) -> None:
        self.cfg, self.queue, self.control, self.steps = cfg, queue, control, steps
        self.numerics = numerics
        self.draws, self.stats, self.throughput, self.log = draws, stats, throughput, log
        self.agents = Agents(cfg.capacity)
        self.published = 0  # the newest version workers can pull
        self.published_at = 0.0
        self.egress_free = 0.0  # when the PS's shared egress queue has sent everything queued so far
        self.end: float | None = None
        self.outcome: Outcome = "running"
        self._set_up()

    @abstractmethod
    def _set_up(self) -> None:
        """The engine's own state, on top of the shared wiring above (which it may read)."""

    # -- DataPlane ------------------------------------------------------------------------------------------
    @abstractmethod
    def on_members(self, slots: list[int]) -> None: ...

    def on_death(self, slot: int) -> None:
        self.agents.kill(slot, self.queue.clock.now)

    def activate(self, slot: int, first_request_at: float) -> None:
        # The new life's first pull request time is all a round-at-a-time engine needs to know.
        self.agents.spawn(slot, first_request_at)

    def deactivate(self, slot: int) -> None:
        self.agents.halt(slot, self.queue.clock.now)

    def telemetry(self) -> dict[int, float]:
        return self.throughput.take()

    # -- driving --------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Advance until the job has published its versions or `_advance` says it cannot go on."""
        self._start()
        while self.published < self.cfg.rounds:
            stopped = self._advance()
            if stopped is not None:
                self.outcome = stopped
                break
        else:
            self.outcome = "completed"
        # `_wind_up` may depend on the outcome (an update after the last version meets a completed job).
        self.end = self._wind_up()

    def _start(self) -> None:
        """Called once before the first `_advance`; by default there is nothing to prepare."""

    @abstractmethod
    def _advance(self) -> Outcome | None:
        """Make one unit of progress; return why the run stops ("stalled", "time_limit") or None."""

    @abstractmethod
    def _wind_up(self) -> float:
        """Settle what is still open now that the run has stopped, and return its end in virtual time."""

    # -- what both count ------------------------------------------------------------------------------------
    def _count_pulls(self, n: int) -> None:
        """`n` workers received the parameters."""
        self.stats.pulls += n
        self.stats.bytes_received += n * self.steps.sizes.pull_bytes

    def _count_pushes(self, n: int, compute_s: float) -> None:
        """`n` workers sent an update after computing for `compute_s` seconds between them."""
        self.stats.pushes_sent += n
        self.stats.bytes_sent += n * self.steps.sizes.push_bytes
        self.stats.compute_s += compute_s

    def _observe_update(
        self, slot: int, at: float, step_time: float, compute: float, version: int, loss: float = float("nan")
    ) -> None:
        """An update reached the PS at `at`: its worker's throughput, step time and telemetry row.

        The per-event engine observes millions of single updates, hence a scalar twin of `_observe_updates`."""
        self.throughput.observe_1(slot, step_time)
        if self.log is not None:
            self.log.add_1(slot, at, step_time, compute, version, loss)
        self.stats.step_time_sum_s += step_time
        self.stats.steps += 1

    def _observe_updates(
        self, slots: np.ndarray, at: np.ndarray, step_time: np.ndarray, compute: np.ndarray, version: np.ndarray
    ) -> None:
        """Updates that reached the PS, one per element (see `_observe_update`)."""
        self.throughput.observe(slots, step_time)
        self.stats.step_time_sum_s += float(step_time.sum())
        self.stats.steps += int(slots.size)
        if self.log is not None:
            self.log.add(slots, at, step_time, compute, version)

    def _count_accepted_first(
        self, slots: np.ndarray, at: np.ndarray, compute: np.ndarray, distinct: int | None = None
    ) -> None:
        """Updates the PS took in one round: each worker's first to arrive (a second is a DUPLICATE).

        `distinct`, when known, is how many different workers these are: equal to the count, nothing to sort."""
        if slots.size == 0:
            return
        if distinct == slots.size:
            self.stats.accepted_compute_s += float(compute.sum())
            return
        order = np.argsort(at, kind="stable")
        _, first = np.unique(slots[order], return_index=True)
        self.stats.accepted_compute_s += float(compute[order][first].sum())

    def _count_lost_1(self, agent: int, wasted_s: float) -> None:
        """One agent's update died with it (see `_count_lost`)."""
        self._count_lost(np.array([agent]), np.array([wasted_s]))

    def _count_lost(self, agents: np.ndarray, wasted_s: np.ndarray) -> None:
        """These agents had the parameters and computed, then died before their update reached the PS.

        The cause is the death's: an availability trace's leave (the control plane lists those) or a crash;
        `wasted_s` is the compute each had spent on the lost update."""
        leaves = self.control.stats.leave_times
        for a, wasted in zip(agents.tolist(), wasted_s.tolist(), strict=True):
            cause = "leave" if (int(self.agents.slot[a]), float(self.agents.death[a])) in leaves else "crash"
            self.stats.lost_updates[cause] += 1
            self.stats.lost_compute_s += wasted

    def _record_close(self, updates: int, members: int) -> None:
        """The PS closed a version that aggregated `updates` updates while the job had `members` members."""
        self.stats.updates_per_version.append(updates)
        self.stats.members_per_version.append(members)

    def _record_publish(self, version: int, at: float) -> None:
        """The PS published `version` at `at`: pulls may now take it."""
        self.published, self.published_at = version, at
        self.stats.publish_times.append(at)
