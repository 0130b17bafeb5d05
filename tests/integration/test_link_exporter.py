"""The Docker link exporter (scripts/docker/link_exporter.py) as the entrypoint runs it, on loopback: it writes the
path's telemetry `links` record and serves the dlt_link_* gauges. Loopback is unshaped, so the record must say the
configured cellular RTT is *not* what was measured — the check that a container without shaping cannot pass.
With sharded parameter servers it probes every shard's responder: one record and one series per path, and a
shard that does not answer costs only its own path's measurement; bad targets are refused before it starts."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dist_llm_train.controller.models import LinkReportIn
from dist_llm_train.netem.measure.path_report import configured_path, read_reports
from dist_llm_train.netem.profile.loading import load_profile

ROOT = Path(__file__).resolve().parents[2]
EXPORTER = ROOT / "scripts" / "docker" / "link_exporter.py"


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _responders(n: int) -> Iterator[list[int]]:
    """`n` real `netem probe --listen` responders on loopback, as the PS and its shards run them; their UDP ports."""
    ports, procs = [], []
    try:
        for _ in range(n):
            ports.append(_free_port(socket.SOCK_DGRAM))
            procs.append(subprocess.Popen([sys.executable, "-m", "dist_llm_train.netem", "probe", "--listen",
                                           f"127.0.0.1:{ports[-1]}", "--seconds", "0"], cwd=ROOT))
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


@pytest.fixture
def responder() -> Iterator[int]:
    with _responders(1) as (port,):
        yield port


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


def _exporter(*args: str) -> list[str]:
    return [sys.executable, str(EXPORTER), "--node", "worker-1", "--dev", "dlt-nodev0", *args]


def _probes(metrics_port: int, peer: str) -> float:
    """Probes the exporter has sent to `peer` (0 before its metrics port answers)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    key = f'dlt_link_probes_total{{dst="{peer}",src="worker-1"}} '
    return next((float(line[len(key):]) for line in text.splitlines() if line.startswith(key)), 0.0)


def _load_exporter() -> Any:
    """The exporter script as a module (registered first: its dataclasses look their module up)."""
    if "dlt_link_exporter" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dlt_link_exporter", EXPORTER)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["dlt_link_exporter"]


# Shard 1 sits behind its own, slower link: each path's configured figures must be its own peer's.
SHARDED_PROFILE = """\
name: shards
figures: round_trip
link: {delay_ms: 80, rate_mbit: 10}
nodes:
  shard-1:
    link: {delay_ms: 200, rate_mbit: 2}
"""


def test_exporter_probes_every_peer_and_a_dead_one_stops_none(tmp_path: Path) -> None:
    """Sharded PS: one record and one gauge series per path, in target order (repeated --target and a comma list
    mixed); a peer that answers nothing (a port nobody listens on) has a record without a measurement while the
    others are measured, and the exporter keeps running."""
    profile_file = tmp_path / "shards.yaml"
    profile_file.write_text(SHARDED_PROFILE)
    dead = _free_port(socket.SOCK_DGRAM)
    report, metrics_port = tmp_path / "links.json", _free_port(socket.SOCK_STREAM)
    with _responders(2) as (ps, shard1):
        proc = subprocess.Popen(
            _exporter("--target", f"paramserver=127.0.0.1:{ps}",
                      "--target", f"shard-1=127.0.0.1:{shard1},shard-2=127.0.0.1:{dead}",
                      "--profile", str(profile_file), "--workers", "worker-1,worker-2", "--port", str(metrics_port),
                      "--report-file", str(report), "--interval", "0.3", "--count", "20"),
            cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            # Until the second train to shard 1: by then the dead peer after it has failed once and the next
            # round went on past it.
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and proc.poll() is None and (_probes(metrics_port, "shard-1") < 40):
                time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            records = read_reports(report)
            links = [LinkReportIn.model_validate(r) for r in records]
            assert [lk.link for lk in links] == ["worker-1->paramserver", "worker-1->shard-1", "worker-1->shard-2"]
            profile = load_profile(profile_file)
            for lk, peer in zip(links, ("paramserver", "shard-1", "shard-2"), strict=True):
                want = configured_path(profile, "worker-1", peer, ["worker-1", "worker-2"])
                assert lk.configured_rtt_ms == pytest.approx(want.rtt_ms), lk
                assert lk.configured_rate_mbit == want.up_rate_mbit and lk.traffic_class == "ps_sync", lk
            assert [lk.configured_rtt_ms for lk in links] == pytest.approx([80.0, 140.0, 80.0])
            ps_link, shard_link, dead_link = links
            for lk in (ps_link, shard_link):
                assert lk.measured_rtt_ms is not None and lk.measured_rtt_ms < 30, lk
                assert lk.measured_loss == 0.0 and lk.within_tolerance is False, lk  # loopback, not 80/140 ms
            assert dead_link.measured_rtt_ms is None and dead_link.measured_loss is None, dead_link
            assert dead_link.rtt_samples == 0 and dead_link.within_tolerance is None, dead_link
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            for peer, rtt in (("paramserver", "0.08"), ("shard-1", "0.14"), ("shard-2", "0.08")):
                assert f'dlt_link_configured_rtt_seconds{{backend="none",dst="{peer}",src="worker-1"}} {rtt}' in text
            measured = [line.split("dst=")[1].split(",")[0] for line in text.splitlines()
                        if line.startswith("dlt_link_measured_rtt_seconds{")]
            assert sorted(measured) == ['"paramserver"', '"shard-1"'], text
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert f"probe to shard-2 (127.0.0.1:{dead}) failed" in stderr, stderr


def test_targets_parse_in_every_form() -> None:
    mod = _load_exporter()
    Peer = mod.Peer
    assert mod.parse_targets(["paramserver:9199"], "paramserver") == [Peer("paramserver", "paramserver", 9199)]
    assert mod.parse_targets(["paramserver=paramserver:9199, shard-1=dlt-paramserver-shard-1:9199,",
                              "shard-2=10.0.0.3:9"], None) == [
        Peer("paramserver", "paramserver", 9199), Peer("shard-1", "dlt-paramserver-shard-1", 9199),
        Peer("shard-2", "10.0.0.3", 9)]


@pytest.mark.parametrize(("targets", "peer_node", "message"), [
    (["127.0.0.1:9199"], None, "names no peer"),
    (["ps=127.0.0.1"], None, "HOST:PORT"),
    (["ps=:9199"], None, "HOST:PORT"),
    (["ps=h:0"], None, "port in 1..65535"),
    (["ps=h:65536"], None, "port in 1..65535"),
    (["ps=h:x"], None, "port in 1..65535"),
    (["=h:1"], None, "peer node name"),
    (["a b=h:1"], None, "peer node name"),
    (["ps=h:1", "ps=g:2"], None, "more than one target"),
    (["h:1", "paramserver=g:2"], "paramserver", "more than one target"),
    ([",", ""], None, "no target"),
    ([",".join(f"s{i}=h:{i + 1}" for i in range(65))], None, "at most 64"),
])
def test_bad_targets_are_refused(targets: list[str], peer_node: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load_exporter().parse_targets(targets, peer_node)


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "127.0.0.1:9199"], "names no peer"),
    (["--target", "ps=127.0.0.1:9199,ps=127.0.0.1:9198"], "more than one target"),
    (["--target", "worker-1=127.0.0.1:9199"], "named like this node"),
    (["--target", "ps=127.0.0.1:9199", "--count", "0"], "--count"),
])
def test_exporter_exits_with_a_clear_error_on_bad_arguments(args: list[str], message: str) -> None:
    proc = subprocess.run(_exporter(*args, "--profile", "cellular", "--port", "0"), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
