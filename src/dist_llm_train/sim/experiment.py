"""The simulator as a `run-experiments` backend: one grid cell in, one run folder out.

`experiments.backends.SimBackend` calls `run_cell`; the folder it returns has what an embedded run leaves
(config, `summary.json`, `summary.md`, a per-update `metrics.csv` with empty losses) plus `rounds.csv`, so the
grid's round-time, byte and utilisation figures come out of the same code for both backends. Loss-based
figures (time and bytes to target) stay empty: nothing is trained in virtual time.
"""

from __future__ import annotations

from pathlib import Path

from dist_llm_train.config import Config
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.report import write_report
from dist_llm_train.sim.runner import simulate


def run_cell(cfg: Config, workers: int, profile: str | None, runs_dir: Path) -> Path:
    """Simulate the run `cfg` describes with `workers` workers on `profile` (None: unshaped links)."""
    sim_cfg = SimConfig.from_config(cfg, workers=workers)
    sim_cfg.profile = profile
    result = simulate(sim_cfg, telemetry=True)
    run_dir, _ = write_report(result, Path(runs_dir))
    return run_dir
