"""One simulation as asked for from outside (files and flags), resolved into a `SimConfig`, run, and summarised.

Settings stack, later wins: SimConfig defaults ← the run config (`config`, the same file `dist-llm-train run`
takes) ← a `sim_config` YAML of SimConfig fields ← `overrides`. `from_run` takes the place of `config`: a
finished embedded run's config, profile, shaping and measured compute times (`sim.validation`), and the summary
then carries the run's measured round time next to the simulated one. `train` trains the real model on the
virtual clock (`sim.training`): the job of the run config (or of the run folder, for as many versions as it
ran) with the simulation's workers, strategy and links. Bad values raise `SimConfigError`, `ConfigError` or
`RunFolderError` naming the field before anything is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.config import Config, load_config
from dist_llm_train.experiments.grid import Target
from dist_llm_train.sim.config import SimConfig, SimConfigError, load_sim_overrides, merge_dotted
from dist_llm_train.sim.report import DEFAULT_TARGET, write_report
from dist_llm_train.sim.runner import SimResult, simulate, summary
from dist_llm_train.sim.surrogate import apply as apply_surrogate
from dist_llm_train.sim.surrogate import fit_from_folders
from dist_llm_train.sim.training import Progress, simulate_trained
from dist_llm_train.sim.validation import (
    DEFAULT_ROUNDS,
    WARMUP_ROUNDS,
    MeasuredRun,
    read_run,
    sim_config_for_run,
)


@dataclass(frozen=True)
class SimRequest:
    config: Path | None = None
    sim_config: Path | None = None
    from_run: Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """SimConfig fields, dotted paths allowed ("compute.mean_s"); a None value means "not given"."""
    train: bool = False
    """Real numerics: train the model on the virtual clock (a few dozen workers), not only the timing."""
    target: Target = DEFAULT_TARGET
    """The loss a trained run is measured against."""
    surrogate_from: tuple[Path, ...] = ()
    """Timing-only runs: trained simulation folders to fit a labelled loss surrogate from (`sim.surrogate`)."""


def build_config(config: Path | None, sim_config: Path | None, overrides: Mapping[str, Any]) -> SimConfig:
    """The SimConfig a run config, a SimConfig file and overrides describe, over the defaults."""
    base = load_config(config) if config is not None else Config()
    from_file: dict[str, Any] = load_sim_overrides(sim_config) if sim_config is not None else {}
    return SimConfig.from_config(base, **merge_dotted(from_file, dict(overrides)))


def build_from_run(
    run: MeasuredRun, sim_config: Path | None, overrides: Mapping[str, Any], train: bool = False
) -> SimConfig:
    """The simulation of a measured run (see `sim.validation`), with a SimConfig file and overrides over it.

    Timing alone runs DEFAULT_ROUNDS rounds (a long mean); a trained simulation runs the job's own versions."""
    from_file: dict[str, Any] = load_sim_overrides(sim_config) if sim_config is not None else {}
    merged = merge_dotted(from_file, dict(overrides))
    rounds = merged.pop("rounds", run.config.training.versions if train else DEFAULT_ROUNDS)
    return sim_config_for_run(run, rounds=rounds, **merged)


def base_config(request: SimRequest) -> Config:
    """The run config a request names (its file, the run folder's, or the defaults)."""
    if request.from_run is not None:
        return read_run(request.from_run).config
    return load_config(request.config) if request.config is not None else Config()


def resolve(request: SimRequest) -> tuple[SimConfig, MeasuredRun | None]:
    """The validated SimConfig of `request`, and the measured run it reproduces (when `from_run` names one)."""
    if request.from_run is not None and request.config is not None:
        raise SimConfigError(
            "a run folder (--from-run) and a run config (--config) both name the job: give one of them"
        )
    if request.from_run is None:
        return build_config(request.config, request.sim_config, request.overrides), None
    measured = read_run(request.from_run)
    return build_from_run(measured, request.sim_config, request.overrides, request.train), measured


def measured_vs_simulated(run: MeasuredRun, result: SimResult) -> dict[str, Any]:
    """The run's measured round time beside the simulated one (warm-up rounds left out of both)."""
    times = result.round_times[WARMUP_ROUNDS:]
    simulated = float(times.mean()) if times.size else None
    return {
        "run_dir": str(run.run_dir),
        "profile": run.profile_name,
        "shaper": run.shaper,
        "measured_round_s": run.round_s,
        "measured_versions": run.versions,
        "simulated_round_s": simulated,
        "relative_error": None if simulated is None else (simulated - run.round_s) / run.round_s,
    }


def run_request(
    request: SimRequest, runs_dir: Path | None, progress: Progress | None = None
) -> dict[str, Any]:
    """Resolve, simulate and summarise `request`; the report folder goes under `runs_dir` (None: no folder).

    The summary has a real run's summary keys, plus `measured_run` when the request reproduces one. A
    trained request calls `progress(version, loss)` at every version the simulated PS publishes.
    """
    if request.train and request.surrogate_from:
        raise SimConfigError("a loss surrogate is for timing-only runs; a --train run has the real loss")
    cfg, measured = resolve(request)
    fitted = fit_from_folders(list(request.surrogate_from)) if request.surrogate_from else None
    result = simulate_trained(base_config(request), cfg, progress=progress) if request.train else simulate(cfg)
    extra: dict[str, Any] = {}
    if measured is not None:
        extra["measured_run"] = measured_vs_simulated(measured, result)
    if fitted is not None:
        staleness = float(np.mean(list(result.stats.staleness_applied.elements()) or [0]))
        extra["surrogate"] = apply_surrogate(
            fitted, result.stats.publish_times, result.stats.updates_per_version,
            cfg.batch_size * cfg.steps_per_push, staleness, request.target.resolve(fitted.floor),
        )
    if runs_dir is None and result.trained is not None:
        # The target figures are read from a metrics.csv: write the folder somewhere that then goes away.
        with tempfile.TemporaryDirectory() as tmp:
            _, data = write_report(result, Path(tmp), extra=extra, target=request.target)
        return {**data, "run_id": "", "run_dir": ""}
    if runs_dir is None:
        return {**summary(result), **extra}
    _, data = write_report(result, runs_dir, extra=extra, target=request.target)
    return data
