"""Per-run figures computed from a run folder: the numbers one row of `runs.csv` carries.

Everything is derived from `metrics.csv` (telemetry) and `summary.json` (initial/final eval loss, floor), so a
run folder can be re-analysed later with a different target without re-running anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.grid import Target
from dist_llm_train.experiments.metrics import (
    compute_utilisation,
    first_hit,
    loss_series,
    read_metrics,
    total_bytes,
    training_wall_s,
)
from dist_llm_train.experiments.physics import link_model, measure_rounds, round_bound

STAND_IN_PROFILE = "lan"
"""Unshaped loopback has no profile; its bound uses the LAN profile's figures and says so."""


@dataclass
class RunFigures:
    loss_floor: float | None = None
    target_loss: float | None = None
    time_to_target_s: float | None = None
    steps_to_target: int | None = None
    bytes_to_target: int | None = None
    train_wall_s: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    compute_utilisation: float | None = None
    round_measured_s: float | None = None
    round_bound_s: float | None = None
    measured_over_bound: float | None = None
    bound_profile: str = "n/a"
    ps_egress: str = "n/a"
    note: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def default_window(workers: int) -> int:
    """Two telemetry rows per worker: about two sync rounds, enough to smooth one lucky batch."""
    return max(2, 2 * workers)


def compute_figures(
    run_dir: Path,
    target: Target,
    workers: int,
    mode: str,
    shaped_profile: str | None,
    loss_floor: float | None,
    ps_egress_shared: bool = True,
) -> RunFigures:
    """All figures for one run; a figure that cannot be computed stays None and `note` says why."""
    from dist_llm_train.netem.profile.loading import load_profile

    notes: list[str] = []
    rows = read_metrics(run_dir / "metrics.csv")
    fig = RunFigures(loss_floor=loss_floor, target_loss=target.resolve(loss_floor))
    if not rows:
        fig.note = "no telemetry rows"
        return fig
    fig.train_wall_s = training_wall_s(rows)
    fig.bytes_sent, fig.bytes_received = total_bytes(rows)
    fig.compute_utilisation = compute_utilisation(rows, workers)
    if all(r.loss is None for r in rows):
        notes.append("no training loss in the telemetry (simulated for timing only: free numerics)")
    elif fig.target_loss is None:
        notes.append("target needs the entropy floor, unknown for this corpus")
    else:
        hit = first_hit(loss_series(rows, target.window or default_window(workers)), fig.target_loss)
        if hit is None:
            notes.append("target not reached")
        else:
            fig.time_to_target_s, fig.bytes_to_target, fig.steps_to_target = hit.time_s, hit.bytes, hit.step
    measure = measure_rounds(rows)
    if measure is None:
        notes.append("too few PS versions to measure a round")
    else:
        fig.round_measured_s = measure.round_s
        name = shaped_profile or STAND_IN_PROFILE
        fig.bound_profile = name if shaped_profile else f"{name} (stand-in: links unshaped)"
        links = link_model(load_profile(name), workers, ps_egress_shared)
        fig.ps_egress = "shared" if ps_egress_shared else "per-worker"
        fig.round_bound_s = round_bound(measure, links, mode)
        if fig.round_bound_s > 0:
            fig.measured_over_bound = measure.round_s / fig.round_bound_s
    fig.note = "; ".join(notes)
    return fig
