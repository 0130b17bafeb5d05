"""Figure maths on synthetic metrics.csv files whose answers are worked out by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dist_llm_train.experiments.figures import compute_figures
from dist_llm_train.experiments.grid import Target
from dist_llm_train.experiments.metrics import (
    MetricsError,
    compute_utilisation,
    first_hit,
    loss_series,
    read_metrics,
    training_wall_s,
)
from dist_llm_train.experiments.physics import link_model, measure_rounds, round_bound
from dist_llm_train.netem.profile.schema import parse_profile

COLUMNS = ["wall_time", "worker", "step", "ps_version", "loss", "step_time_s", "compute_time_s",
           "samples_per_s", "tokens_per_s", "bytes_sent", "bytes_received", "push_outcome"]


def write_sync_run(path: Path, versions: int = 10, warmup_compute: float | None = None) -> Path:
    """2 workers, one round per second; worker-0 computes 0.4 s, worker-1 0.6 s (both `warmup_compute` in
    round 1 when given); each step sends 1000 bytes and receives 2000; loss at version v is 3.0 - 0.1 v."""
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for v in range(1, versions + 1):
            for i, (lag, compute) in enumerate(((0.01, 0.4), (0.0, 0.6))):
                w.writerow({"wall_time": 100 + v - lag, "worker": f"worker-{i}", "step": v, "ps_version": v,
                            "loss": 3.0 - 0.1 * v, "step_time_s": 1.0,
                            "compute_time_s": warmup_compute if warmup_compute and v == 1 else compute,
                            "samples_per_s": 1, "tokens_per_s": 1, "bytes_sent": 1000 * v,
                            "bytes_received": 2000 * v, "push_outcome": "APPLIED"})
    return path


def test_time_and_bytes_to_target(tmp_path: Path) -> None:
    rows = read_metrics(write_sync_run(tmp_path) / "metrics.csv")
    series = loss_series(rows, window=2)
    # Window of 2 rows: at worker-1's row of version v both losses are 3.0 - 0.1 v; at worker-0's row of v+1
    # the mean is 0.05 higher. First mean <= 2.52 is worker-1 at v = 5 (2.50); worker-0 at v=5 gives 2.55.
    hit = first_hit(series, 2.52)
    assert hit is not None
    assert hit.step == 5
    assert hit.loss == pytest.approx(2.5)
    # The run starts when the first step started: 101 - 0.01 - 1.
    assert hit.time_s == pytest.approx(105 - 99.99)
    assert hit.bytes == 2 * (5000 + 10000)
    assert first_hit(series, 1.0) is None


def test_window_must_fill_before_a_point_counts(tmp_path: Path) -> None:
    rows = read_metrics(write_sync_run(tmp_path, versions=3) / "metrics.csv")
    assert len(loss_series(rows, window=6).loss) == 1
    assert loss_series(rows, window=7).loss == []
    with pytest.raises(ValueError):
        loss_series(rows, window=0)


def test_compute_utilisation(tmp_path: Path) -> None:
    rows = read_metrics(write_sync_run(tmp_path) / "metrics.csv")
    assert training_wall_s(rows) == pytest.approx(110 - 99.99)
    assert compute_utilisation(rows, 2) == pytest.approx(10 * (0.4 + 0.6) / (2 * (110 - 99.99)))
    # A third configured worker that never reported counts as idle.
    assert compute_utilisation(rows, 3) == pytest.approx(10 / (3 * (110 - 99.99)))


def test_round_measure_and_sync_bound(tmp_path: Path) -> None:
    rows = read_metrics(write_sync_run(tmp_path) / "metrics.csv")
    m = measure_rounds(rows)
    assert m is not None
    assert m.round_s == pytest.approx(1.0)  # worker-1 rows, versions 1..10 over 9 s
    assert m.compute_s == pytest.approx(0.6)  # slowest member per round
    assert m.up_bytes == {"worker-0": 1000, "worker-1": 1000}
    assert m.down_bytes == {"worker-0": 2000, "worker-1": 2000}
    prof = parse_profile({"name": "x", "link": {"delay_ms": 100, "rate_mbit": 1}})  # 50 ms each way
    links = link_model(prof, 2)
    assert links.workers["worker-0"].rtt_s == pytest.approx(0.1)
    # Own cycles: net = 0.1 + 8000/1e6 + 16000/1e6 = 0.124, slowest member 0.6 + 0.124. Through the PS
    # egress: fastest compute 0.4 + 0.1 + 0.008 + 2 * 0.016 = 0.54. The larger wins.
    assert round_bound(m, links, "sync") == pytest.approx(0.724)
    # At 10 kbit/s and no delay the shared PS egress dominates: own cycle 0.6 + 0.8 + 1.6 = 3.0;
    # shared 0.4 + 0.8 + 2 * 1.6 = 4.4. Userspace relays (per-worker paths) drop the shared term.
    slow = parse_profile({"name": "slow", "link": {"rate_mbit": 0.01}})
    assert round_bound(m, link_model(slow, 2), "sync") == pytest.approx(4.4)
    assert round_bound(m, link_model(slow, 2, ps_egress_shared=False), "sync") == pytest.approx(3.0)


def test_warm_up_round_is_not_charged_to_compute(tmp_path: Path) -> None:
    m = measure_rounds(read_metrics(write_sync_run(tmp_path, warmup_compute=5.0) / "metrics.csv"))
    assert m is not None
    assert m.compute_s == pytest.approx(0.6)
    assert m.worker_compute_s == pytest.approx({"worker-0": 0.4, "worker-1": 0.6})


def test_async_bound_is_per_version(tmp_path: Path) -> None:
    rows = read_metrics(write_sync_run(tmp_path) / "metrics.csv")
    m = measure_rounds(rows)
    assert m is not None
    links = link_model(parse_profile({"name": "x", "link": {"delay_ms": 100, "rate_mbit": 1}}), 2)
    cycles = (0.4 + 0.124, 0.6 + 0.124)
    assert round_bound(m, links, "async") == pytest.approx(1 / (1 / cycles[0] + 1 / cycles[1]))


def test_slow_node_and_schedule_shape_the_link_model() -> None:
    straggler = parse_profile({"name": "s", "link": {"delay_ms": 20, "rate_mbit": 100},
                               "nodes": {"$last_worker": {"link": {"delay_ms": 100, "rate_mbit": 5},
                                                          "ingress": {"rate_mbit": 5}}}})
    links = link_model(straggler, 3)
    assert links.workers["worker-0"].up_bps == 100e6
    assert links.workers["worker-2"].up_bps == 5e6 and links.workers["worker-2"].down_bps == 5e6
    assert links.workers["worker-2"].rtt_s == pytest.approx(0.05 + 0.01)
    segments = [{"duration_s": 3}, {"duration_s": 1, "link": {"rate_mbit": 2}}]
    cycle = parse_profile({"name": "c", "link": {"delay_ms": 80, "rate_mbit": 4},
                           "schedule": {"kind": "cycle", "segments": segments}})
    assert link_model(cycle, 1).ps_egress_bps == pytest.approx(3.5e6)


def test_compute_figures_with_stand_in_bound(tmp_path: Path) -> None:
    run = write_sync_run(tmp_path)
    fig = compute_figures(run, Target(floor_plus=0.5, window=2), workers=2, mode="sync", shaped_profile=None,
                          loss_floor=2.02)
    assert fig.target_loss == pytest.approx(2.52)
    assert fig.steps_to_target == 5
    assert fig.bytes_sent == 20000 and fig.bytes_received == 40000
    assert fig.bound_profile.startswith("lan (stand-in") and fig.ps_egress == "shared"
    assert fig.round_measured_s == pytest.approx(1.0)
    assert fig.round_bound_s is not None and fig.measured_over_bound == pytest.approx(1.0 / fig.round_bound_s)
    assert fig.note == ""
    shaped = compute_figures(run, Target(loss=0.5), 2, "sync", "cellular", None, ps_egress_shared=False)
    assert shaped.bound_profile == "cellular" and shaped.time_to_target_s is None
    assert shaped.ps_egress == "per-worker"
    assert shaped.note == "target not reached"
    unknown = compute_figures(run, Target(floor_plus=0.1), 2, "sync", None, None)
    assert unknown.target_loss is None and "entropy floor" in unknown.note


def test_bad_metrics_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match="not found"):
        read_metrics(tmp_path / "none.csv")
    (tmp_path / "m.csv").write_text("wall_time,worker\n1,w\n")
    with pytest.raises(MetricsError, match="missing columns"):
        read_metrics(tmp_path / "m.csv")
    (tmp_path / "b.csv").write_text(",".join(COLUMNS) + "\n" + "1,w,1,1,abc,1,1,1,1,1,1,APPLIED\n")
    with pytest.raises(MetricsError, match="line 2: loss"):
        read_metrics(tmp_path / "b.csv")
