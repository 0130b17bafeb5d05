"""`dist-llm-train run-experiments`: flags in, `experiments.runner.run_grid` with two progress bars, a summary out.

Exit codes: 0 the grid ran (refused or failed cells are results, listed in the report); 2 the grid file or
an option is invalid, or the backend cannot run here; 130 interrupted (finished runs are kept and skipped
next time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dist_llm_train.cli.common import console
from dist_llm_train.cli.options import JsonOpt
from dist_llm_train.experiments.backends import BACKENDS, BackendUnavailable
from dist_llm_train.experiments.grid import GridError, load_grid
from dist_llm_train.experiments.runner import GridResult, run_grid


class RichReporter:
    """Two bars: runs of the grid, and PS versions of the current run with its latest loss."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.grid_task: TaskID | None = None
        self.run_task: TaskID | None = None

    def start(self, total: int, skipped: int) -> None:
        info = f"{skipped} already done" if skipped else ""
        self.grid_task = self.progress.add_task("grid", total=total, info=info)

    def run_started(self, label: str, steps: int) -> None:
        if self.run_task is not None:
            self.progress.remove_task(self.run_task)
        self.run_task = self.progress.add_task(label, total=steps, info="starting")

    def run_progress(self, version: int, loss: float | None) -> None:
        if self.run_task is not None:
            info = f"loss {loss:.3f}" if loss is not None else ""
            self.progress.update(self.run_task, completed=version, info=info)

    def run_finished(self, label: str, status: str, detail: str) -> None:
        if self.grid_task is not None:
            self.progress.advance(self.grid_task)
        colour = {"ok": "green", "refused": "yellow"}.get(status, "red")
        suffix = f": {detail}" if detail else ""
        self.progress.console.print(f"[{colour}]{status}[/{colour}] {label}{suffix}")


def _summary_line(result: GridResult) -> str:
    parts = ", ".join(f"{n} {status}" for status, n in sorted(result.status_counts().items()))
    return (f"{len(result.planned)} runs ({parts}); ran {result.executed}, skipped {result.skipped} already "
            f"finished. Report: {result.out / 'report.md'}")


def run_experiments(
    grid: Annotated[Path, typer.Option("--grid", "-g", help="Grid file, e.g. experiments/smoke.yaml.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default results/<grid name>).")] = None,
    repeats: Annotated[int | None, typer.Option(min=1, max=100, help="Override the grid's repeats.")] = None,
    backend: Annotated[str, typer.Option(help=f"Where cells run: {', '.join(BACKENDS)}.")] = "embedded",
    json_out: JsonOpt = False,
) -> None:
    """Run a grid of experiments (profiles × strategies × codecs × ...): resumable, with tables and plots."""
    if backend not in BACKENDS:
        console.print(f"[red]invalid --backend[/red] {backend!r}: choose one of {', '.join(BACKENDS)}")
        raise typer.Exit(2)
    try:
        rg = load_grid(grid)
    except GridError as err:
        console.print(f"[red]invalid grid[/red]: {err}")
        raise typer.Exit(2) from None
    target = out or Path("results") / rg.grid.name
    columns = (TextColumn("[bold]{task.description}[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, disable=json_out) as progress:
            result = run_grid(rg, target, repeats=repeats, backend=backend, reporter=RichReporter(progress))
    except BackendUnavailable as err:
        console.print(f"[red]backend unavailable[/red]: {err}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: finished runs are in runs.csv and are skipped next time")
        raise typer.Exit(130) from None
    console.print(f"[green]done[/green]: {_summary_line(result)}")
    if json_out:
        print(json.dumps(result.outcome()))
