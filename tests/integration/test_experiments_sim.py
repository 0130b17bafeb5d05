"""The `sim` backend through the grid runner: same run-folder format, same round figures, no loss figures."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dist_llm_train.experiments.grid import parse_grid
from dist_llm_train.experiments.runner import run_grid

pytestmark = pytest.mark.timeout(120)


def test_sim_backend_cells_produce_round_figures(tmp_path: Path) -> None:
    pytest.importorskip("dist_llm_train.sim.experiment")
    rg = parse_grid({"name": "simgrid", "steps": 20, "axes": {"profile": ["none", "cellular"],
                                                             "strategy": ["sync", "async"], "workers": [3]}})
    result = run_grid(rg, tmp_path, backend="sim")
    assert result.executed == 4
    with (tmp_path / "runs.csv").open() as f:
        rows = {(r["profile"], r["strategy"]): r for r in csv.DictReader(f)}
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert r["backend"] == "sim"
        assert float(r["round_measured_s"]) > 0 and float(r["round_bound_s"]) > 0
        assert r["time_to_target_s"] == "" and "no training loss" in r["note"]
    cell = rows[("cellular", "sync")]
    assert cell["bound_profile"] == "cellular"
    # 10 Mbit/s: every round moves 3 pulls through the PS egress, so the bound is over a second.
    assert float(cell["round_bound_s"]) > 1.0
    assert float(cell["round_measured_s"]) > float(rows[("none", "sync")]["round_measured_s"])
    assert rows[("none", "sync")]["bound_profile"].startswith("lan (stand-in")
    assert run_grid(rg, tmp_path, backend="sim").executed == 0
