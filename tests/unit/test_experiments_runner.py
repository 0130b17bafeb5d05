"""The grid runner with a scripted backend: resumability, refused and failed cells, outputs, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from dist_llm_train.cli.experiments import run_experiments
from dist_llm_train.config import Config, parse_config
from dist_llm_train.experiments.backends import (
    BackendUnavailable,
    CellRefused,
    RunOutcome,
    get_backend,
    precheck,
)
from dist_llm_train.experiments.grid import Cell, parse_grid
from dist_llm_train.experiments.runner import run_grid

COLUMNS = ["wall_time", "worker", "step", "ps_version", "loss", "step_time_s", "compute_time_s", "bytes_sent",
           "bytes_received"]


class ScriptedBackend:
    """Writes a synthetic run folder; async runs learn twice as fast per byte. Fails as told."""

    name = "scripted"

    def __init__(self, fail_once: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail_once = set(fail_once or ())

    def run(self, cell: Cell, cfg: Config, runs_dir: Path, timeout_s: float, progress: Any) -> RunOutcome:
        self.calls.append(cell.cell_id)
        mode = cfg.training.strategy.name
        if mode in self.fail_once:
            self.fail_once.discard(mode)
            raise RuntimeError("every worker exited before the job finished")
        run_dir = runs_dir / f"{cell.cell_id}-{cfg.training.seed}"
        run_dir.mkdir(parents=True)
        speed = 2.0 if mode == "async" else 1.0
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for v in range(1, cell.steps + 1):
                progress(v, None)
                for i in range(cell.workers):
                    w.writerow([1000 + v + i / 100, f"worker-{i}", v, v, 3.0 - 0.05 * v * speed, 1.0, 0.5,
                                500 * v, 500 * v])
        summary = {"run_dir": str(run_dir), "initial_loss": 3.0, "final_loss": 2.0, "loss_floor": 1.5,
                   "steps": cell.steps, "wall_seconds": cell.steps + 5.0, "mode": mode,
                   "job_state": "completed"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return RunOutcome(run_dir, summary, None)


def _grid(**over: Any) -> Any:
    data: dict[str, Any] = {"name": "unit", "steps": 12, "target": {"floor_plus": 0.9, "window": 2},
                            "axes": {"strategy": ["sync", "async"], "workers": [2]}}
    data.update(over)
    return parse_grid(data)


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def test_runs_every_cell_writes_outputs_and_resumes(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    result = run_grid(_grid(), tmp_path, backend=backend)
    assert result.executed == 2 and result.skipped == 0
    rows = _csv_rows(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    by_strategy = {r["strategy"]: r for r in rows}
    # Target 1.5 + 0.9 = 2.4: sync reaches it at v = 12 (3.0 - 0.6), async at v = 6.
    assert int(by_strategy["sync"]["steps_to_target"]) == 12
    assert int(by_strategy["async"]["steps_to_target"]) == 6
    assert int(by_strategy["async"]["bytes_to_target"]) == 2 * 2 * 500 * 6
    for name in ("report.md", "summary.json", "loss_vs_step.png", "loss_vs_wall.png", "loss_vs_bytes.png",
                 "time_to_target.png", "bytes_to_target.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = (tmp_path / "report.md").read_text()
    assert "strategy=sync" in report and "strategy=async" in report and "| 2 |" in report  # 2x fewer bytes
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {c["label"] for c in summary["cells"]} == {"strategy=sync", "strategy=async"}
    before = (tmp_path / "runs.csv").read_bytes()

    again = run_grid(_grid(), tmp_path, backend=backend)
    assert again.executed == 0 and again.skipped == 2
    assert len(backend.calls) == 2
    assert (tmp_path / "runs.csv").read_bytes() == before


def test_failed_runs_are_recorded_then_retried(tmp_path: Path) -> None:
    backend = ScriptedBackend(fail_once={"async"})
    run_grid(_grid(), tmp_path, backend=backend)
    rows = {r["strategy"]: r for r in _csv_rows(tmp_path)}
    assert rows["async"]["status"] == "error"
    assert "every worker exited" in rows["async"]["error"]
    assert "Refused and failed runs" in (tmp_path / "report.md").read_text()
    result = run_grid(_grid(), tmp_path, backend=backend)
    assert result.executed == 1
    assert [r["status"] for r in _csv_rows(tmp_path)] == ["ok", "ok"]


def test_refused_configs_become_rows_without_running(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    grid = _grid(axes={"strategy": ["sync", "diloco-someday"], "workers": [2]})
    run_grid(grid, tmp_path, backend=backend)
    rows = {r["strategy"]: r for r in _csv_rows(tmp_path)}
    assert rows["diloco-someday"]["status"] == "refused"
    assert "training.strategy" in rows["diloco-someday"]["error"]
    assert len(backend.calls) == 1


def test_repeats_use_distinct_seeds_and_report_spread(tmp_path: Path) -> None:
    result = run_grid(_grid(axes={"strategy": ["sync"], "workers": [2]}), tmp_path, repeats=3,
                      backend=ScriptedBackend())
    assert result.executed == 3
    seeds = sorted(int(r["run_seed"]) for r in _csv_rows(tmp_path))
    assert seeds == [0, 1000, 2000]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells"][0]["stats"]["steps_to_target"] == {"mean": 12.0, "std": 0.0, "n": 3}


def test_precheck_applies_the_project_rules_for_the_cell_worker_count() -> None:
    cfg = parse_config({"training": {"aggregation_rule": "krum", "byzantine_f": 1, "num_workers": 5}})
    precheck(cfg, 5)
    with pytest.raises(CellRefused, match="krum"):
        precheck(cfg, 3)  # Krum needs n >= 2f + 3
    unchecked = cfg.model_copy(update={"training": cfg.training.model_copy(update={"codec": {"name": "zip"}})})
    with pytest.raises(CellRefused, match="codec"):
        precheck(unchecked, 5)


def test_backends_that_cannot_run_say_so() -> None:
    with pytest.raises(BackendUnavailable, match="compose"):
        get_backend("compose")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        get_backend("kubernetes")


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("run-experiments")(run_experiments)
    app.command("noop")(lambda: None)
    return app


def test_cli_rejects_bad_grids_and_backends(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\naxes:\n  workers: [0]\n")
    res = CliRunner().invoke(_cli(), ["run-experiments", "--grid", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "axes.workers.0" in res.output
    good = tmp_path / "good.yaml"
    good.write_text("name: good\nsteps: 5\n")
    res = CliRunner().invoke(_cli(), ["run-experiments", "--grid", str(good), "--backend", "compose",
                                      "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not available yet" in res.output
    res = CliRunner().invoke(_cli(), ["run-experiments", "--grid", str(good), "--backend", "k8s"])
    assert res.exit_code == 2 and "--backend" in res.output
    assert not (tmp_path / "o" / "runs.csv").exists()
