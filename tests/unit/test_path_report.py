"""Kernel-shaped paths in telemetry: the exporter's configured vs measured records and the worker that sends them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.controller.models import TelemetryIn
from dist_llm_train.netem.measure.path_report import (
    WINDOW_TRAINS,
    ConfiguredPath,
    ProbeWindow,
    configured_path,
    path_report,
    read_reports,
    write_reports,
)
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.worker.links import ReportedLinks

WORKERS = ["worker-1", "worker-2", "worker-3"]


def test_cellular_path_is_both_egress_legs() -> None:
    path = configured_path(load_profile("cellular"), "worker-1", "paramserver", WORKERS)
    # Round-trip profile figures: each end shapes half the delay and the one-way loss whose two legs compound to
    # the profile's 2 %.
    assert path.rtt_ms == pytest.approx(80.0)
    assert path.loss_ratio == pytest.approx(0.02, abs=1e-6)
    assert path.up_rate_mbit == 10 and path.down_rate_mbit == 10


def test_a_class_override_changes_the_configured_path() -> None:
    heartbeat = configured_path(load_profile("cellular"), "worker-1", "controller", WORKERS, "heartbeat")
    assert heartbeat.rtt_ms == pytest.approx(40.0) and heartbeat.loss_ratio == pytest.approx(0.005, abs=1e-6)


def test_the_stragglers_ingress_override_is_part_of_its_path() -> None:
    profile = load_profile("straggler")
    slow = configured_path(profile, "worker-3", "paramserver", WORKERS)
    fast = configured_path(profile, "worker-1", "paramserver", WORKERS)
    assert slow.rtt_ms == pytest.approx(100 / 2 + 20 / 2) and fast.rtt_ms == pytest.approx(20.0)
    # What reaches the straggler passes its 5 Mbit/s ingress, though the PS sends at 100.
    assert (slow.up_rate_mbit, slow.down_rate_mbit, slow.bottleneck_rate_mbit) == (5, 5, 5)
    assert (fast.up_rate_mbit, fast.down_rate_mbit) == (100, 100)


def test_probe_window_counts_loss_over_the_last_trains() -> None:
    window = ProbeWindow()
    assert window.loss_ratio is None and window.rtt_ms is None
    window.add(50, [80.0] * 49)
    window.add(50, [90.0] * 48 + [200.0, 200.0])
    assert window.loss_ratio == pytest.approx(1 / 100)
    assert window.rtt_ms == 90.0 and window.rtt_samples == 50
    for _ in range(WINDOW_TRAINS):
        window.add(50, [85.0] * 50)
    assert window.loss_ratio == 0.0  # the lossy train has left the window


def test_a_train_that_lost_everything_keeps_the_last_rtt() -> None:
    window = ProbeWindow()
    window.add(10, [81.0] * 10)
    window.add(10, [])
    assert window.rtt_ms == 81.0 and window.loss_ratio == pytest.approx(0.5)


def test_probe_window_refuses_impossible_trains_and_changes_nothing() -> None:
    window = ProbeWindow()
    for sent, echoes in ((0, []), (2, [1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="probe train"):
            window.add(sent, echoes)
    assert window.loss_ratio is None and not window.trains


def _report(measured: list[float] | None) -> dict[str, Any]:
    window = ProbeWindow()
    if measured is not None:
        window.add(len(measured) + 1, measured)
    cfg = ConfiguredPath(rtt_ms=80.0, loss_ratio=0.0199, up_rate_mbit=10.0, down_rate_mbit=10.0)
    return path_report("worker-1->paramserver", "ps_sync", "kernel_fallback", cfg, window)


def test_path_report_is_a_telemetry_link_record() -> None:
    before = _report(None)
    assert before["measured_rtt_ms"] is None and before["within_tolerance"] is None
    assert before["measured_loss"] is None and before["configured_rtt_ms"] == 80.0
    near, far = _report([84.0] * 49), _report([1.0] * 49)  # a shaped path; an unshaped one
    assert near["within_tolerance"] is True and far["within_tolerance"] is False
    assert near["measured_loss"] == pytest.approx(0.02) and near["loss_kind"] == "measured"
    rec = TelemetryIn.model_validate(_telemetry(links=[before, near]))
    assert rec.links is not None and rec.links[1].backend == "kernel_fallback"


def test_report_file_round_trip_and_bad_content(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    assert read_reports(path) == []
    write_reports(path, [_report([84.0])])
    assert read_reports(path)[0]["measured_rtt_ms"] == 84.0
    assert [p.name for p in tmp_path.iterdir()] == ["links.json"]  # no temp file left behind
    path.write_text('{"link": "not a list"}')
    with pytest.raises(ValueError, match="JSON list"):
        read_reports(path)


def _telemetry(**extra: Any) -> dict[str, Any]:
    return {"job_id": "j", "step": 1, "ps_version": 1, "loss": 2.0, "step_time_s": 0.5, "samples_per_s": 10.0,
            "tokens_per_s": 100.0, "bytes_sent": 1, "bytes_received": 1, "wall_time": 1.0, **extra}


def test_reported_links_attach_the_file_and_measure_the_push_rate(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    links = ReportedLinks(str(path))
    assert "links" not in links.annotate(_telemetry())  # no report yet: nothing to claim
    write_reports(path, [_report([80.0] * 49)])
    # 1 MB pushed in 0.88 s with an 80 ms RTT: 0.8 s of transfer, 10 Mbit/s.
    out = links.annotate(_telemetry(push_time_s=0.88, push_bytes=1_000_000))
    (link,) = out["links"]
    assert link["measured_rate_mbit"] == pytest.approx(10.0) and link["measured_rtt_ms"] == 80.0
    TelemetryIn.model_validate(out)
    # A new report is read again; the rate estimate carries on (median of the pushes so far).
    write_reports(path, [_report([95.0] * 49)])
    os.utime(path, ns=(1, 1))  # a distinct stamp even on a coarse-clocked filesystem
    out = links.annotate(_telemetry(push_time_s=0.5, push_bytes=1_000_000))
    assert out["links"][0]["measured_rtt_ms"] == 95.0


def test_reported_links_of_ps_shards_pass_through_with_the_push_rate_on_the_first(tmp_path: Path) -> None:
    """The exporter's records for a sharded PS, one per shard in shard order: all sent, and the push goodput
    (one push to every shard at once) on the first path only."""
    path = tmp_path / "links.json"
    reports = [_report([80.0] * 49) | {"link": f"worker-1->{peer}"} for peer in ("paramserver", "shard-1", "shard-2")]
    write_reports(path, reports)
    out = ReportedLinks(str(path)).annotate(_telemetry(push_time_s=0.88, push_bytes=1_000_000))
    assert [lk["link"] for lk in out["links"]] == ["worker-1->paramserver", "worker-1->shard-1", "worker-1->shard-2"]
    assert [lk["measured_rate_mbit"] for lk in out["links"]] == [pytest.approx(10.0), None, None]
    TelemetryIn.model_validate(out)


def test_a_bad_report_costs_the_links_not_the_telemetry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "links.json"
    bad = _report([80.0]) | {"traffic_class": "gossip"}
    path.write_text(json.dumps([bad]))
    record = ReportedLinks(str(path)).annotate(_telemetry())
    assert "links" not in record and "ignoring the link report" in caplog.text
    TelemetryIn.model_validate(record)
