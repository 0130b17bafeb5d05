"""A loss surrogate for timing-only simulations: fitted from trained ones, always labelled as such.

A simulation of 10⁴–10⁵ workers cannot train the model, but a planner still wants a loss curve. This module
fits, from trained simulations (real numerics, `simulate --train`) of the same task, the curve

    loss(S, s) = floor + A · (S / (1 + β·s) + S0)^(−α)

where S is the number of training samples behind the updates the PS accepted so far, s the run's mean
applied staleness (0 for sync and DiLoCo), and `floor` the corpus's entropy rate. A stale update counts for
1 / (1 + β·s) of a fresh one. β is fitted only when the runs it is fitted from differ in staleness; otherwise it
is 0 and the fit says so. The surrogate is then applied to a timing-only run's published versions (samples
accepted per version from the PS's own counts), giving a predicted loss per version and a predicted time to
target — reported under `surrogate`, never as the run's `final_loss`, with the runs it came from.

Fitting uses numpy only: for each (S0, β) on a log grid, log(loss − floor) is linear in log(S_eff + S0), so A
and α come from least squares; the grid point with the smallest squared error in log space wins.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dist_llm_train.sim.config import SimConfig

WINDOW = 8
"""Telemetry rows averaged into one fitting point (one update's loss is one noisy batch)."""


NOISE_NATS = 0.02
"""Excess losses below this are not fitted (see `fit`)."""


class SurrogateError(ValueError):
    """The surrogate cannot be fitted or applied: a folder is not a trained simulation, too few points..."""


@dataclass(frozen=True)
class RunPoints:
    """One trained simulation, reduced to what the fit needs."""

    run_dir: str
    floor: float
    staleness: float
    samples: np.ndarray  # cumulative accepted samples at each point
    loss: np.ndarray  # windowed training loss at each point
    samples_per_version: float  # mean samples one version aggregated


@dataclass(frozen=True)
class Surrogate:
    floor: float
    a: float
    alpha: float
    s0: float
    beta: float
    beta_fitted: bool
    rms_log_error: float
    fitted_from: list[str]
    max_samples_per_version: float = 0.0
    """The largest batch (samples per version) in the runs fitted: beyond it the curve is extrapolated."""

    def predict(self, samples: np.ndarray, staleness: float) -> np.ndarray:
        eff = np.asarray(samples, dtype=np.float64) / (1.0 + self.beta * staleness)
        return self.floor + self.a * np.power(eff + self.s0, -self.alpha)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_trained_run(run_dir: Path) -> RunPoints:
    """A trained simulation's folder (`simulate --train`): its losses against accepted samples."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as err:
        raise SurrogateError(f"{run_dir}: not a simulation run folder: {err}") from None
    s = summary.get("simulation", {}) if isinstance(summary, dict) else {}
    if s.get("numerics") != "real" or summary.get("loss_floor") is None:
        raise SurrogateError(f"{run_dir}: not a trained simulation with a known loss floor (simulate --train)")
    try:
        sim = SimConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        with (run_dir / "metrics.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as err:
        raise SurrogateError(f"{run_dir}: unreadable: {err}") from None
    try:
        with (run_dir / "rounds.csv").open(newline="") as f:
            updates = [int(r["updates"]) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError) as err:
        raise SurrogateError(f"{run_dir}: rounds.csv: {err}") from None
    # Samples behind version v: the PS's own count of updates it aggregated into versions 1..v.
    per_update = sim.batch_size * sim.steps_per_push
    behind = np.concatenate([[0.0], np.cumsum(updates, dtype=np.float64) * per_update])
    points = sorted(
        (behind[min(int(r["ps_version"]), len(behind) - 1)], float(r["loss"]))
        for r in rows
        if r.get("loss") not in ("", None)
    )
    if len(points) < 2 * WINDOW:
        raise SurrogateError(f"{run_dir}: {len(points)} updates with a loss; at least {2 * WINDOW} are needed")
    arr = np.array(points)
    kernel = np.ones(WINDOW) / WINDOW  # one update's loss is one batch: average neighbours in S
    samples = np.convolve(arr[:, 0], kernel, mode="valid")
    windowed = np.convolve(arr[:, 1], kernel, mode="valid")
    staleness = (s.get("staleness_applied") or {}).get("mean") or 0.0
    per_version = float(np.mean(updates)) * per_update if updates else 0.0
    return RunPoints(str(run_dir), float(summary["loss_floor"]), float(staleness), samples, windowed, per_version)


def fit(runs: list[RunPoints]) -> Surrogate:
    """Least squares in log space over a (S0, β) grid; see the module docstring."""
    if not runs:
        raise SurrogateError("no runs to fit the surrogate from")
    floors = {round(r.floor, 9) for r in runs}
    if len(floors) > 1:
        raise SurrogateError(f"runs come from different tasks (loss floors {sorted(floors)})")
    floor = runs[0].floor
    stalenesses = {round(r.staleness, 6) for r in runs}
    beta_grid = np.concatenate([[0.0], np.geomspace(0.01, 10.0, 25)]) if len(stalenesses) > 1 else np.array([0.0])
    top = max(float(r.samples.max()) for r in runs)
    s0_grid = np.concatenate([[0.0], np.geomspace(1.0, top, 40)])
    # Points within NOISE_NATS of the floor are mostly batch noise, and in log space they would dominate the
    # fit (log of a tiny, noisy excess): the curve is fitted on the part of training that shows its shape.
    excess = [(r, r.loss - floor > NOISE_NATS) for r in runs]
    y = np.concatenate([np.log(r.loss[m] - floor) for r, m in excess])
    if y.size < 3:
        raise SurrogateError("fewer than three points above the loss floor")
    best: tuple[float, float, float, float, float] | None = None
    for beta in beta_grid:
        eff = np.concatenate([r.samples[m] / (1.0 + beta * r.staleness) for r, m in excess])
        for s0 in s0_grid:
            x = np.log(eff + s0)
            slope, intercept = np.polyfit(x, y, 1)
            err = float(np.mean((intercept + slope * x - y) ** 2))
            if best is None or err < best[0]:
                best = (err, float(beta), float(s0), float(slope), float(intercept))
    assert best is not None
    err, beta, s0, slope, intercept = best
    if slope >= 0:
        raise SurrogateError("the loss does not fall with samples in these runs: nothing to extrapolate")
    return Surrogate(floor=floor, a=math.exp(intercept), alpha=-slope, s0=s0, beta=beta,
                     beta_fitted=len(beta_grid) > 1, rms_log_error=math.sqrt(err),
                     fitted_from=[r.run_dir for r in runs],
                     max_samples_per_version=max(r.samples_per_version for r in runs))


def fit_from_folders(folders: list[Path]) -> Surrogate:
    return fit([read_trained_run(Path(f)) for f in folders])


def apply(
    surrogate: Surrogate,
    publish_times: list[float],
    updates_per_version: list[int],
    samples_per_update: int,
    staleness: float,
    target_loss: float | None,
) -> dict[str, Any]:
    """The surrogate's loss after every published version of a timing-only run, and its time to target.

    `updates_per_version` are the PS's counts (what each version aggregated), as in the fit."""
    if not publish_times:
        return {"label": "surrogate", "final_loss": None, "time_to_target_s": None}
    samples = np.cumsum(np.asarray(updates_per_version, dtype=np.float64)) * samples_per_update
    predicted = surrogate.predict(samples, staleness)
    hit = None
    if target_loss is not None:
        reached = np.nonzero(predicted <= target_loss)[0]
        hit = int(reached[0]) if reached.size else None
    warnings = []
    batch = float(np.mean(updates_per_version)) * samples_per_update
    if surrogate.max_samples_per_version and batch > 4 * surrogate.max_samples_per_version:
        warnings.append(
            f"this run's versions aggregate {batch:,.0f} samples, {batch / surrogate.max_samples_per_version:,.0f}x "
            "the fitted runs': the curve assumes every sample counts the same, which overstates progress past "
            "the critical batch size (fit from runs with larger batches)"
        )
    return {
        "label": "surrogate (fitted from trained simulations; nothing was trained in this run)",
        "warnings": warnings,
        "model": surrogate.to_json(),
        "staleness_mean": staleness,
        "final_loss": float(predicted[-1]),
        "target_loss": target_loss,
        "time_to_target_s": None if hit is None else float(publish_times[hit]),
        "versions_to_target": None if hit is None else hit + 1,
    }
