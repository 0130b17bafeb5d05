"""The shipped smoke grid on the embedded backend: real controller, PS and workers per cell, then a resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dist_llm_train.experiments.grid import load_grid
from dist_llm_train.experiments.runner import run_grid

pytestmark = pytest.mark.timeout(420)

SMOKE = Path(__file__).parents[2] / "experiments" / "smoke.yaml"


def test_smoke_grid_runs_for_real_and_resumes(tmp_path: Path) -> None:
    rg = load_grid(SMOKE)
    out = tmp_path / "smoke"
    first = run_grid(rg, out, backend="embedded")
    assert first.executed == len(rg.expand()) and first.skipped == 0

    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == first.executed
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert int(r["steps_done"]) >= int(r["steps"])
        assert float(r["final_loss"]) < float(r["initial_loss"])
        margin = rg.grid.target.floor_plus
        assert margin is not None
        assert float(r["target_loss"]) == pytest.approx(float(r["loss_floor"]) + margin)
        assert float(r["time_to_target_s"]) > 0 and int(r["bytes_to_target"]) > 0
        assert 0 < float(r["compute_utilisation"]) <= 1
        # Unshaped loopback can move bytes faster than the LAN stand-in, so only the ratio's definition holds.
        assert float(r["round_bound_s"]) > 0 and float(r["round_measured_s"]) > 0
        assert float(r["measured_over_bound"]) == pytest.approx(
            float(r["round_measured_s"]) / float(r["round_bound_s"]))
        assert r["bound_profile"].startswith("lan")
        assert (Path(r["run_dir"]) / "metrics.csv").is_file()
    assert {r["strategy"] for r in rows} == {"sync", "async"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grid"] == "smoke" and len(summary["runs"]) == len(rows)
    assert "strategy=sync" in (out / "report.md").read_text()
    for png in ("loss_vs_step.png", "loss_vs_wall.png", "loss_vs_bytes.png", "time_to_target.png",
                "bytes_to_target.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    before = (out / "runs.csv").read_bytes()
    second = run_grid(rg, out, backend="embedded")
    assert second.executed == 0 and second.skipped == first.executed
    assert (out / "runs.csv").read_bytes() == before
    assert len(list((out / "runs").iterdir())) == first.executed  # no new run folders
