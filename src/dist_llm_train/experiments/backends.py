"""Where a cell runs: embedded processes on loopback now; Compose and the simulator when they are wired.

A backend turns (cell, config) into a run folder holding `metrics.csv` and `summary.json` in the embedded
launcher's format; everything after that (figures, tables, plots) is backend-independent. A backend that
cannot run here says why with `BackendUnavailable` before any cell starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from dist_llm_train.config import Config, TrainingConfig, format_validation_error
from dist_llm_train.experiments.grid import Cell

BACKENDS = ("embedded", "compose", "sim")


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run in this build or on this machine; the message says what is missing."""


class CellRefused(ValueError):
    """The cell's configuration was refused before anything started (unknown codec, rule, strategy...)."""


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    shaped_profile: str | None
    """The profile that actually shaped the links (None: unshaped loopback)."""
    note: str = ""
    ps_egress_shared: bool = True
    """Whether all pulls share one shaped PS egress (see physics.LinkModel)."""


Progress = Callable[[int, float | None], None]
"""Called with (current PS version, latest training loss) while a run is going."""


class Backend(Protocol):
    name: str

    def run(
        self, cell: Cell, cfg: Config, runs_dir: Path, timeout_s: float, progress: Progress
    ) -> RunOutcome: ...


def precheck(cfg: Config, workers: int) -> None:
    """Refuse in milliseconds what a worker would otherwise refuse after the services started.

    Runs the project's own cross-field rules (`TrainingConfig`'s validators: codec, aggregation rule and
    its worker-count precondition, attack, DP, strategy) for `workers` workers. Configs built by
    `ResolvedGrid.config_for` already passed them; this guards a backend called with any other config.
    """
    data = cfg.training.model_dump()
    data["num_workers"] = workers
    try:
        TrainingConfig.model_validate(data)
    except ValidationError as err:
        raise CellRefused(f"training: {format_validation_error(err)}") from None


def launcher_takes_profile() -> bool:
    """True once `RunOptions` has a `profile` field (the embedded launcher then shapes the links)."""
    from dist_llm_train.embedded.launcher import RunOptions

    return "profile" in {f.name for f in dataclasses.fields(RunOptions)}


class EmbeddedBackend:
    """Controller, PS and workers as local processes (the `run` launcher), in one child process per cell."""

    name = "embedded"

    def run(
        self, cell: Cell, cfg: Config, runs_dir: Path, timeout_s: float, progress: Progress
    ) -> RunOutcome:
        from dist_llm_train.experiments.cell_process import run_embedded_cell

        precheck(cfg, cell.workers)
        extra: dict[str, Any] = {}
        shaped: str | None = None
        note = ""
        if cell.profile is not None:
            if launcher_takes_profile():
                extra["profile"] = cell.profile
                shaped = cell.profile
            else:
                note = f"profile {cell.profile} recorded, not applied: the embedded launcher cannot shape yet"
        summary = run_embedded_cell(cfg.model_dump(mode="json"), cell.workers, runs_dir, timeout_s, extra,
                                    progress)
        run_dir = Path(summary["run_dir"])
        written = _read_summary(run_dir)
        if "profile" in written:  # a launcher that shapes reports what it applied: trust it over the request
            shaped = written["profile"] or None
        # The userspace shaper relays each worker's PS connection on its own (both directions per worker).
        return RunOutcome(run_dir, summary, shaped, note, ps_egress_shared=shaped is None)


class ComposeBackend:
    name = "compose"

    def __init__(self) -> None:
        raise BackendUnavailable(
            "backend 'compose' is not available yet: run-experiments cannot drive `make up` stacks; "
            "use --backend embedded"
        )

    def run(
        self, cell: Cell, cfg: Config, runs_dir: Path, timeout_s: float, progress: Progress
    ) -> RunOutcome:
        raise BackendUnavailable("compose backend is not wired")  # pragma: no cover - __init__ refuses first


SIM_ENTRY = ("dist_llm_train.sim.experiment", "run_cell")
"""The simulator's hook: run_cell(cfg, workers, profile, runs_dir) -> a run folder like an embedded run's."""


class SimBackend:
    """The discrete-event simulator, through the entry point `SIM_ENTRY` once the sim package provides it."""

    name = "sim"

    def __init__(self) -> None:
        module, attr = SIM_ENTRY
        try:
            mod = importlib.import_module(module)
        except ImportError:
            mod = None
        fn = getattr(mod, attr, None) if mod is not None else None
        if fn is None:
            raise BackendUnavailable(
                f"backend 'sim' is not available yet: {module}.{attr} does not exist in this build; "
                "use --backend embedded"
            )
        self._run_cell: Callable[..., Path] = fn

    def run(
        self, cell: Cell, cfg: Config, runs_dir: Path, timeout_s: float, progress: Progress
    ) -> RunOutcome:
        run_dir = Path(self._run_cell(cfg, workers=cell.workers, profile=cell.profile, runs_dir=runs_dir))
        summary = _read_summary(run_dir)
        sim = summary.get("simulation") if isinstance(summary.get("simulation"), dict) else {}
        shared = (sim or {}).get("ps_egress", "shared") == "shared"  # as the simulated links had it
        numerics = (sim or {}).get("numerics", "free")
        kind = "real numerics" if numerics == "real" else "timing only"
        note = f"simulated (virtual clock, {kind})"
        return RunOutcome(run_dir, summary, cell.profile, note, shared)


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def get_backend(name: str) -> Backend:
    if name == "embedded":
        return EmbeddedBackend()
    if name == "compose":
        return ComposeBackend()
    if name == "sim":
        return SimBackend()
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
