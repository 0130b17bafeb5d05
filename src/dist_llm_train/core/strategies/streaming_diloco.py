"""`streaming_diloco`: Streaming DiLoCo (Douillard et al., 2025, arXiv 2501.18512).

DiLoCo syncs the whole model every H inner steps and every worker waits for the sync. Streaming
DiLoCo splits the parameters into P fragments and syncs one fragment at a time, on a staggered
schedule — each fragment every H inner steps, fragment p offset by p·H/P — and a worker keeps
training while a fragment's sync is in flight:

    at a sync of fragment p:   Δ_p = θ̃_p − θ_p            (θ̃_p: the global fragment from its last sync)
    on the PS:                  θ̃_p ← θ̃_p − OuterSGD(mean of the round's Δ_p)   (Nesterov, per fragment)
    τ inner steps later:        θ_p ← α·θ_p + (1 − α)·θ̃_p  (the paper's delayed merge; α = merge_alpha)

so the τ = `overlap_steps` steps run while the outer gradient and the new fragment cross the
network, and each sync moves 1/P of the model (the paper's lower peak bandwidth).

Mapped onto the PS: a round is a PS version, and the round on version v syncs fragment v mod P,
so a version is published every H/P inner steps and each fragment once every H (`training.steps`
is, as for DiLoCo, the per-worker budget of inner steps). Fragments are contiguous, equal-size
slices of the flat parameter vector; the flat order is the model's layer order, so a fragment is
a run of consecutive layers (the paper's "sequential" pattern; it reports its "strided" pattern
slightly better). The PS steps only the fragment's slice of the outer optimizer
(`ServerOptimizer.step_region`), and sends only that slice back (`core.downlink`).

Worker-side state lives here, in the worker's own strategy object: θ̃ (the global parameters as
of each fragment's last sync) and the version the worker holds.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from dist_llm_train.core.strategies.base import HonestUpdate, Trainer
from dist_llm_train.core.strategies.diloco import DiLoCo, DiLoCoConfig


class StreamingDiLoCoConfig(DiLoCoConfig):
    """DiLoCo's fields (H is each fragment's sync interval) and the streaming schedule's."""

    name: Literal["streaming_diloco"] = "streaming_diloco"  # type: ignore[assignment]
    fragments: int = Field(4, ge=1, le=1024, description="P: fragments, synced in turn every H/P inner steps")
    overlap_steps: int = Field(
        1, ge=0, description="τ: inner steps run while a fragment's sync is in flight (at most H/P)"
    )
    merge_alpha: float = Field(
        0.5, ge=0, le=1, description="α: weight of the local fragment when the synced one arrives (0: replace)"
    )

    @model_validator(mode="after")
    def _schedule_fits(self) -> StreamingDiLoCoConfig:
        if self.local_steps % self.fragments:
            raise ValueError(
                f"streaming_diloco: local_steps H={self.local_steps} must be a multiple of fragments "
                f"P={self.fragments} (a fragment syncs every H/P inner steps)"
            )
        per_sync = self.local_steps // self.fragments
        if self.overlap_steps > per_sync:
            raise ValueError(
                f"streaming_diloco: overlap_steps τ={self.overlap_steps} exceeds H/P={per_sync}: a fragment's "
                "sync must land before the next one starts"
            )
        return self


def fragment_bounds(size: int, fragments: int) -> list[int]:
    """Boundaries of `fragments` contiguous, equal-size (±1) slices of a `size`-element vector."""
    if size < fragments:
        raise ValueError(f"a {size}-element parameter vector cannot be split into {fragments} fragments")
    return [round(i * size / fragments) for i in range(fragments + 1)]


class StreamingDiLoCo(DiLoCo):
    name = "streaming_diloco"
    Config = StreamingDiLoCoConfig

    def __init__(self, config: StreamingDiLoCoConfig) -> None:  # type: ignore[override]
        super().__init__(config)
        self.fragments = config.fragments
        self.per_sync = config.local_steps // config.fragments
        self.overlap_steps = config.overlap_steps
        self.merge_alpha = config.merge_alpha
        self._bounds: tuple[int, list[int]] | None = None
        # Worker side: θ̃ as of each fragment's last sync, and the version the worker holds.
        self._global: np.ndarray | None = None
        self._version = 0
        self._synced_once = False
        self._since_push: list[tuple[float, int, int]] = []  # (mean loss, steps, samples) of each run of steps

    # config time (DiLoCo's checks hold as they are: H within the budget, one update per sync for an attacker)
    def steps_per_update(self) -> int:
        return self.per_sync

    # PS time (and the worker's, to know which fragment a version syncs)
    def region(self, version: int, size: int) -> slice:
        if self._bounds is None or self._bounds[0] != size:
            self._bounds = (size, fragment_bounds(size, self.fragments))
        bounds = self._bounds[1]
        p = version % self.fragments
        return slice(bounds[p], bounds[p + 1])

    def min_params(self) -> int:
        return self.fragments

    # worker time
    def _steps(self, trainer: Trainer, h: int) -> tuple[float, int]:
        """Run h inner steps; they count towards the next push's loss and samples."""
        if h == 0:
            return float("nan"), 0
        _, loss, samples = self.inner_steps(trainer, h)
        self._since_push.append((loss, h, samples))
        return loss, samples

    def receive(self, trainer: Trainer, params: np.ndarray, version: int) -> None:
        """Merge the fragments whose rounds closed since the version held; the first pull (or a worker so far
        behind that every fragment moved) takes the parameters whole."""
        if self._global is None or version - self._version >= self.fragments:
            trainer.set_params(params)
            self._global = np.array(params, dtype=np.float32, copy=True)
        else:
            local = trainer.params()
            a = np.float32(self.merge_alpha)
            for v in range(self._version, version):
                r = self.region(v, local.size)
                local[r] = a * local[r] + (np.float32(1) - a) * params[r]
                self._global[r] = params[r]
            trainer.set_params(local)
        self._version = version

    def compute(self, trainer: Trainer) -> HonestUpdate:
        """The inner steps up to this sync (H/P, less the τ run while the previous sync was in flight), then
        the outer gradient of the fragment the held version syncs."""
        if self._global is None:
            raise RuntimeError("streaming_diloco: compute before the first pull")
        steps = self.per_sync if not self._synced_once else self.per_sync - self.overlap_steps
        self._synced_once = True
        self._steps(trainer, steps)
        # The push reports every inner step since the previous one (the overlap's included): H/P of them.
        runs, self._since_push = self._since_push, []
        total = sum(h for _, h, _ in runs)
        loss = sum(mean * h for mean, h, _ in runs) / total
        samples = sum(s for *_, s in runs)
        local = trainer.params()
        r = self.region(self._version, local.size)
        delta = self._global[r] - local[r]
        return HonestUpdate(delta, loss, samples, slot=self._version % self.fragments)

    def overlap(self, trainer: Trainer) -> tuple[float, int]:
        return self._steps(trainer, self.overlap_steps)
