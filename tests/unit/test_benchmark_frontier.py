"""benchmarks/frontier.py: the issue's figures from the cells (pure arithmetic, no training here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def frontier() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "benchmarks" / "frontier.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_frontier"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(method: str, profile: str, loss: float, t: float | None, b: float | None, **kw: Any) -> dict[str, Any]:
    return {"method": method, "profile": profile, "workers": kw.get("workers", 4), "final_loss": loss,
            "excess": loss - 1.0, "time_to_target_s": t, "bytes_to_target": b,
            "compute_utilisation": kw.get("util")}


def test_figures_pick_the_best_method_within_the_loss_bound(frontier: ModuleType) -> None:
    rows = [
        _row("sync", "cellular", 1.10, 1000.0, 1e12),
        _row("diloco", "cellular", 1.11, 100.0, 1e10),  # loss ratio 1.009: eligible, 100x
        _row("sparseloco", "cellular", 1.20, 50.0, 1e8),  # 10,000x fewer bytes but 9 % worse: not eligible
        _row("streaming_diloco+int4", "intercontinental", 1.11, 80.0, 5e9, util=0.93),
        _row("buffered_async", "good", 1.12, 90.0, 1e12),
        _row("sync", "good", 1.30, 500.0, 2e11, workers=1),
    ]
    figs = frontier.figures(rows)
    assert figs["best_method"] == "diloco" and figs["bytes_ratio"] == pytest.approx(100.0)
    assert figs["loss_ratio"] == pytest.approx(1.11 / 1.10)
    assert figs["time_ratio_method"] == "sparseloco" and figs["time_ratio_cellular"] == pytest.approx(20.0)
    assert figs["utilization_intercontinental"] == 0.93
    assert figs["single_worker_excess_ratio"] == pytest.approx(0.30 / 0.10)
    assert figs["buffered_async_loss_ratio"] == pytest.approx(1.12 / 1.10)
    met = figs["targets_met"]
    assert not met["bytes_ratio"] and met["time_ratio_cellular"] and met["utilization_intercontinental"]


def test_a_method_that_never_reaches_the_target_has_no_ratio(frontier: ModuleType) -> None:
    rows = [_row("sync", "cellular", 1.1, 1000.0, 1e12), _row("diloco", "cellular", 1.5, None, None)]
    figs = frontier.figures(rows)
    assert figs["methods_cellular"][0]["bytes_ratio"] is None
    assert figs["targets_met"]["bytes_ratio"] is False


def test_when_no_method_reaches_the_target_the_closest_loss_is_reported(frontier: ModuleType) -> None:
    rows = [
        _row("sync", "cellular", 1.10, 1000.0, 1e12),
        _row("sparseloco", "cellular", 1.30, None, None),
        _row("streaming_diloco+int4", "cellular", 1.15, None, None),
    ]
    figs = frontier.figures(rows)
    assert figs["best_method"] == "streaming_diloco+int4" and figs["bytes_ratio"] is None
