"""The `sim` backend through the grid runner: same run-folder format and figures as embedded cells.

Small cells train the real model on the virtual clock (real numerics), so loss curves and time to target come
out; cells above `sim.experiment.TRAIN_UP_TO` workers are simulated for their timing alone and say so."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dist_llm_train.experiments.grid import parse_grid
from dist_llm_train.experiments.runner import run_grid

pytestmark = pytest.mark.timeout(300)


def _rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (out / "runs.csv").open() as f:
        return {(r["profile"], r["strategy"]): r for r in csv.DictReader(f)}


def test_sim_backend_trains_small_cells_and_reports_time_to_target(tmp_path: Path) -> None:
    rg = parse_grid({"name": "simgrid", "steps": 60, "axes": {"profile": ["none", "cellular"],
                                                             "strategy": ["sync", "async"], "workers": [3]}})
    result = run_grid(rg, tmp_path, backend="sim")
    assert result.executed == 4
    rows = _rows(tmp_path)
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert r["backend"] == "sim"
        assert float(r["round_measured_s"]) > 0 and float(r["round_bound_s"]) > 0
        assert float(r["final_loss"]) < float(r["initial_loss"]) - 0.3, r  # it really trained (async: 60 small steps)
    for profile in ("none", "cellular"):
        sync = rows[(profile, "sync")]
        assert float(sync["time_to_target_s"]) > 0 and int(sync["bytes_to_target"]) > 0, sync
    # Same job, same versions: cellular costs virtual time, not learning.
    assert float(rows[("cellular", "sync")]["time_to_target_s"]) > 5 * float(rows[("none", "sync")]["time_to_target_s"])
    cell = rows[("cellular", "sync")]
    assert cell["bound_profile"] == "cellular"
    # 10 Mbit/s: every round moves 3 pulls through the PS egress, so the bound is over a second.
    assert float(cell["round_bound_s"]) > 1.0
    assert rows[("none", "sync")]["bound_profile"].startswith("lan (stand-in")
    pngs = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert {"loss_vs_step.png", "loss_vs_wall.png", "loss_vs_bytes.png"} <= set(pngs), pngs
    assert run_grid(rg, tmp_path, backend="sim").executed == 0


def test_sim_backend_large_cells_are_timing_only_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_llm_train.sim import experiment

    monkeypatch.setattr(experiment, "TRAIN_UP_TO", 2)  # a 3-worker cell is now "large"
    rg = parse_grid({"name": "simfree", "steps": 20, "axes": {"profile": ["cellular"], "strategy": ["sync"],
                                                             "workers": [3]}})
    run_grid(rg, tmp_path, backend="sim")
    (r,) = _rows(tmp_path).values()
    assert r["status"] == "ok", r["error"]
    assert r["time_to_target_s"] == "" and "free numerics" in r["note"]
    assert float(r["round_measured_s"]) > 1.0
