"""The Docker link exporter (scripts/docker/link_exporter.py) as the entrypoint runs it, on loopback: it writes the
path's telemetry `links` record and serves the dlt_link_* gauges. Loopback is unshaped, so the record must say the
configured cellular RTT is *not* what was measured — the check that a container without shaping cannot pass."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dist_llm_train.controller.models import LinkReportIn
from dist_llm_train.netem.measure.path_report import read_reports

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = ROOT / "scripts" / "docker" / "link_exporter.py"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def responder() -> Iterator[int]:
    port = _free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, "-m", "dist_llm_train.netem", "probe", "--listen", f"127.0.0.1:{port}",
                             "--seconds", "0"], cwd=ROOT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_exporter_writes_the_links_record_and_the_gauges(responder: int, tmp_path: Path) -> None:
    report, metrics_port = tmp_path / "links.json", _free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, str(EXPORTER), "--target", f"127.0.0.1:{responder}", "--peer-node", "paramserver",
         "--node", "worker-1", "--profile", "cellular", "--workers", "worker-1,worker-2", "--dev", "dlt-nodev0",
         "--port", str(metrics_port), "--report-file", str(report), "--interval", "0.3", "--count", "20"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        records = []
        while time.monotonic() < deadline and proc.poll() is None:
            records = read_reports(report) if report.exists() else []
            if records and records[0]["rtt_samples"] >= 10:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        (record,) = records
        link = LinkReportIn.model_validate(record)
        assert link.link == "worker-1->paramserver" and link.traffic_class == "ps_sync"
        assert link.backend == "none"  # nothing shaped this device
        assert link.configured_rtt_ms == pytest.approx(80.0) and link.configured_rate_mbit == 10
        assert link.measured_rtt_ms is not None and link.measured_rtt_ms < 30
        assert link.within_tolerance is False  # 80 ms configured, loopback measured: the record says so
        assert link.measured_loss == 0.0 and link.loss_kind == "measured"
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'dlt_link_configured_rtt_seconds{backend="none",dst="paramserver",src="worker-1"} 0.08' in text
        assert "dlt_link_measured_loss_ratio" in text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
