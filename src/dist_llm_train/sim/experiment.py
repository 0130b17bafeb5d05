"""The simulator as a `run-experiments` backend: one grid cell in, one run folder out.

`experiments.backends.SimBackend` calls `run_cell`; the folder it returns has what an embedded run leaves
(config, `summary.json`, `summary.md`, a per-update `metrics.csv`) plus `rounds.csv`, so the grid's figures come
out of the same code for both backends. A cell of up to `TRAIN_UP_TO` workers trains the real model on the
virtual clock (`sim.training`), so its loss curves and time and bytes to target are real; a larger cell is
simulated for its timing alone (free numerics: losses empty, and the summary says `numerics: free`).
"""

from __future__ import annotations

from pathlib import Path

from dist_llm_train.config import Config
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.report import write_report
from dist_llm_train.sim.runner import simulate
from dist_llm_train.sim.training import simulate_trained

TRAIN_UP_TO = 64
"""Cells with at most this many workers train for real (minutes on two cores for the default model)."""


def run_cell(cfg: Config, workers: int, profile: str | None, runs_dir: Path, train: bool | None = None) -> Path:
    """Simulate the run `cfg` describes with `workers` workers on `profile` (None: unshaped links).

    `train` forces real numerics on or off; by default a cell trains when it has at most TRAIN_UP_TO workers."""
    sim_cfg = SimConfig.from_config(cfg, workers=workers)
    sim_cfg.profile = profile
    if train is None:
        train = workers <= TRAIN_UP_TO
    result = simulate_trained(cfg, sim_cfg) if train else simulate(sim_cfg, telemetry=True)
    run_dir, _ = write_report(result, Path(runs_dir))
    return run_dir
