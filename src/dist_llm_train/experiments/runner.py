"""Running a grid: plan every (cell, repeat), skip the ones `runs.csv` already has, run the rest, report.

Each run is independent and recorded the moment it ends, so a grid interrupted after an hour resumes where it
stopped. A cell whose configuration is refused (by the config models, the codec or aggregation registries, or
the services at start-up) becomes a `refused` row carrying the message; a run that fails midway becomes an
`error` row; neither stops the grid. Only a backend that cannot run at all stops it, before the first cell.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dist_llm_train.config import ConfigError
from dist_llm_train.experiments.backends import Backend, BackendUnavailable, CellRefused, get_backend
from dist_llm_train.experiments.figures import compute_figures
from dist_llm_train.experiments.grid import NAMED_AXES, Cell, ResolvedGrid
from dist_llm_train.experiments.metrics import MetricsError
from dist_llm_train.experiments.report import write_outputs
from dist_llm_train.experiments.store import RunStore, run_key
from dist_llm_train.netem.profile.schema import ProfileError

SEED_STRIDE = 1000
"""Repeat r of a cell trains with seed + r × SEED_STRIDE: repeats differ in data and init, not only timing."""

MAX_ERROR_CHARS = 600


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    repeat: int
    key: str


@dataclass
class GridResult:
    out: Path
    planned: list[PlannedRun]
    executed: int
    skipped: int
    rows: list[dict[str, Any]]

    def status_counts(self) -> dict[str, int]:
        """Planned runs per status (ok, refused, error), whether they ran in this session or an earlier one."""
        counts: dict[str, int] = {}
        for row in self.rows:
            status = str(row.get("status"))
            counts[status] = counts.get(status, 0) + 1
        return counts

    def outcome(self) -> dict[str, Any]:
        """The grid's outcome as one JSON-able object: where it is, how many runs ran, and how they ended."""
        counts = self.status_counts()
        return {"out": str(self.out), "planned": len(self.planned), "executed": self.executed,
                "skipped": self.skipped, **{s: counts.get(s, 0) for s in ("ok", "refused", "error")}}


class Reporter(Protocol):
    """What the runner tells a progress display; every method is optional work for the display."""

    def start(self, total: int, skipped: int) -> None: ...
    def run_started(self, label: str, steps: int) -> None: ...
    def run_progress(self, version: int, loss: float | None) -> None: ...
    def run_finished(self, label: str, status: str, detail: str) -> None: ...


class NullReporter:
    def start(self, total: int, skipped: int) -> None:
        pass

    def run_started(self, label: str, steps: int) -> None:
        pass

    def run_progress(self, version: int, loss: float | None) -> None:
        pass

    def run_finished(self, label: str, status: str, detail: str) -> None:
        pass


def plan(rg: ResolvedGrid, repeats: int | None, backend: str) -> list[PlannedRun]:
    n = repeats if repeats is not None else rg.grid.repeats
    if n < 1:
        raise ValueError("repeats must be >= 1")
    return [PlannedRun(c, r, run_key(c.cell_id, backend, r)) for c in rg.expand() for r in range(n)]


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " | ")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def base_row(p: PlannedRun, backend: str) -> dict[str, Any]:
    labels = p.cell.labels
    builtin = {"profile", "workers", "seed", *NAMED_AXES}
    extra = ";".join(f"{k}={v}" for k, v in labels.items() if k not in builtin)
    return {
        "run_key": p.key, "cell_id": p.cell.cell_id, "repeat": p.repeat, "backend": backend,
        **{k: labels.get(k) for k in ("profile", *NAMED_AXES)},
        "workers": p.cell.workers, "seed": p.cell.seed, "extra": extra,
        "run_seed": p.cell.seed + p.repeat * SEED_STRIDE, "steps": p.cell.steps,
    }


def execute_one(
    rg: ResolvedGrid, p: PlannedRun, backend: Backend, out: Path, reporter: Reporter
) -> dict[str, Any]:
    row = base_row(p, backend.name)
    started = time.monotonic()

    def finish(status: str, **fields: Any) -> dict[str, Any]:
        row.update(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields)
        row.setdefault("wall_s", time.monotonic() - started)
        return row

    try:
        cfg = rg.config_for(p.cell, seed_offset=p.repeat * SEED_STRIDE)
    except ConfigError as err:
        return finish("refused", error=str(err))
    row["mode"] = cfg.training.strategy.name
    try:
        outcome = backend.run(p.cell, cfg, out / "runs", rg.grid.timeout_s, reporter.run_progress)
    except CellRefused as err:
        return finish("refused", error=str(err))
    except (BackendUnavailable, KeyboardInterrupt):
        raise
    except Exception as err:  # a failed run is a result to record, not a reason to stop the grid
        return finish("error", error=_short(err))
    s = outcome.summary
    mode = str(s.get("mode") or row["mode"])
    row.update(
        mode=mode, shaping=outcome.shaped_profile or "none", run_dir=str(outcome.run_dir),
        initial_loss=s.get("initial_loss"), final_loss=s.get("final_loss"), steps_done=s.get("steps"),
        wall_s=s.get("wall_seconds"),
    )
    notes = [outcome.note] if outcome.note else []
    if s.get("job_state") not in (None, "completed"):
        notes.append(f"job {s.get('job_state')}")
    try:
        fig = compute_figures(outcome.run_dir, rg.grid.target, p.cell.workers, mode, outcome.shaped_profile,
                              s.get("loss_floor"), outcome.ps_egress_shared)
    except (MetricsError, ProfileError, ValueError) as err:
        return finish("error", error=f"figures: {_short(err)}", note="; ".join(notes))
    figures = fig.as_row()
    if figures.pop("note"):
        notes.append(fig.note)
    row.update(figures)
    return finish("ok", note="; ".join(notes))


def run_grid(
    rg: ResolvedGrid,
    out: Path,
    repeats: int | None = None,
    backend: str | Backend = "embedded",
    reporter: Reporter | None = None,
) -> GridResult:
    """Run what is missing from `out/runs.csv`, then (re)write summary.json, report.md and the plots.

    `backend` is a name (see `backends.BACKENDS`) or a `Backend` object (tests, custom drivers).
    """
    rep = reporter or NullReporter()
    impl = get_backend(backend) if isinstance(backend, str) else backend
    planned = plan(rg, repeats, impl.name)
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out)
    todo = [p for p in planned if not store.finished(p.key)]
    varying = rg.varying_axes([p.cell for p in planned])
    rep.start(len(todo), len(planned) - len(todo))
    for p in todo:
        label = p.cell.label(varying) + (f" r{p.repeat}" if p.repeat else "")
        rep.run_started(label, p.cell.steps)
        row = execute_one(rg, p, impl, out, rep)
        store.put(row)
        rep.run_finished(label, row["status"], row.get("error") or "")
    rows = [store.rows[p.key] for p in planned if p.key in store.rows]
    write_outputs(rg, out, rows, planned_cells=[p.cell for p in planned], backend=impl.name)
    return GridResult(out, planned, len(todo), len(planned) - len(todo), rows)
