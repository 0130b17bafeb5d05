"""benchmarks/robustness.py: the grid's cells, configs and the table's verdicts (no training here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from dist_llm_train.config import parse_config

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_robustness", ROOT / "benchmarks" / "robustness.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_robustness"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def grid() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "experiments" / "robustness.yaml").read_text())


def test_the_main_block_is_every_rule_variant_attack_and_data_split_at_n_11(bench: ModuleType, grid: Any) -> None:
    main = next(b for b in grid["blocks"] if b["name"] == "main")
    cells = bench.cells_of(main)
    assert len(cells) == 7 * 3 * 8 * 2
    assert {c.workers for c in cells} == {11} and bench.byzantine_f(11) == 2
    assert {bench.byzantine_f(n) for n in (7, 15)} == {1, 3}


def test_every_cell_config_parses_or_is_refused_for_a_stated_precondition(bench: ModuleType, grid: Any) -> None:
    refused = []
    for block in [*grid["blocks"], grid["quick"]]:
        for cell in bench.cells_of(block):
            try:
                cfg = parse_config(bench.config_dict(grid, cell))
            except ValueError as err:
                refused.append((cell, str(err)))
                continue
            t = cfg.training
            assert t.num_workers == cell.workers and t.aggregation.f == bench.byzantine_f(cell.workers)
            assert (t.attack is None) == (cell.attack == "none")
    reasons = {(c.variant, c.update) for c, _ in refused}
    # Krum-family rules with buckets of 2 at n = 11 (6 buckets < 2f + 3 = 7), and attacks that estimate the
    # honest spread under DiLoCo: nothing else.
    assert {v for v, u in reasons if u == "gradient"} == {"krum+bucketing", "multi_krum+bucketing", "bulyan+bucketing"}
    assert all("buckets must meet" in m for c, m in refused if c.update == "gradient")
    assert all("estimates the honest spread" in m for c, m in refused if c.update == "diloco")


def _row(variant: str, attack: str, loss: float) -> dict[str, Any]:
    return {"block": "main", "variant": variant, "attack": attack, "data": "iid", "workers": 11,
            "update": "gradient", "status": "ran", "final_loss": loss, "loss_floor": 1.0}


def test_ratios_and_survivors(bench: ModuleType) -> None:
    rows = [
        _row("mean", "none", 2.0), _row("mean", "ipm_large", 4.0),
        _row("krum", "none", 2.2), _row("krum", "ipm_large", 2.3),
        _row("median", "none", 2.0), _row("median", "ipm_large", 2.05),
    ]
    bench.add_ratios(rows)
    krum = rows[3]
    assert krum["ratio_vs_own_clean"] == pytest.approx(2.3 / 2.2)
    assert krum["ratio_vs_clean_mean"] == pytest.approx(2.3 / 2.0)
    assert krum["excess_ratio_vs_own_clean"] == pytest.approx(1.3 / 1.2)
    assert krum["within_tolerance"] and not rows[1]["within_tolerance"]
    (summary,) = bench.survivors(rows)
    assert summary["rules_within_5pct"] == ["median", "krum"]  # best first
    assert summary["rules_within_5pct_of_clean_mean"] == ["median"]  # krum's clean run is 10 % worse than mean's
    assert summary["best_rule"] == "median" and summary["meets_target"]
    assert summary["rules_within_25pct_excess"] == ["median", "krum"]
    md = bench.markdown(rows, [summary], {"quick": True, "wall_s": 60, "jobs": 1, "machine": "m", "ran": 6,
                                           "refused": 0, "loss_floor": 1.0, "steps": 60})
    assert "4.000 (+100.0% / +100.0%) **✗**" in md
