"""Shaping under load: the shaper's priority, the relay's own lateness, and links that report drifting timing.

A busy CPU stretches a userspace link's delay; these tests pin what is guaranteed (a relay never releases
early; a drifted link says so in its report, in /status and in the run summary) rather than absolute timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.embedded.report import RunSummary, markdown_summary
from dist_llm_train.netem.measure.link_monitor import LinkMonitor, rtt_tolerance_ms
from dist_llm_train.netem.profile.schema import Link
from dist_llm_train.netem.userspace import relay as rl
from dist_llm_train.netem.userspace import shaper
from tests.unit.test_netem_userspace import _echo_server, _info

pytestmark = pytest.mark.timeout(60)


def test_link_reports_say_whether_their_rtt_is_within_tolerance() -> None:
    mon = LinkMonitor(_info("cellular"), "w0")
    assert rtt_tolerance_ms(80.0) == 55.0 and rtt_tolerance_ms(40.0) == 35.0
    for x in (0.080, 0.100, 0.090):
        mon.add_rtt("ps_sync", x)
    for x in (0.136, 0.140, 0.150):  # a busy host: 140 ms on a 40 ms link
        mon.add_rtt("heartbeat", x)
    mon.add_rtt("task", 0.001)  # unshaped loopback: far below
    reports = {r["traffic_class"]: r for r in mon.reports()}
    assert reports["ps_sync"]["within_tolerance"] is True and reports["ps_sync"]["rtt_tolerance_ms"] == 55.0
    assert reports["heartbeat"]["within_tolerance"] is False
    assert reports["task"]["within_tolerance"] is False
    assert reports["telemetry"]["within_tolerance"] is None  # not measured yet


def _telemetry(job_id: str, links: list[dict[str, Any]]) -> dict[str, Any]:
    return {"job_id": job_id, "step": 1, "ps_version": 1, "loss": 1.0, "step_time_s": 0.1, "samples_per_s": 1.0,
            "tokens_per_s": 1.0, "bytes_sent": 1, "bytes_received": 1, "wall_time": time.time(), "links": links}


def test_status_lists_links_out_of_tolerance_in_every_mode() -> None:
    mon = LinkMonitor(_info("cellular"), "w1")
    for x in (0.2, 0.21, 0.22):
        mon.add_rtt("ps_sync", x)
    mon.add_rtt("heartbeat", 0.041)
    asyncio.run(_status_lists(mon.reports()))


class _Notifier:
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return members

    def close(self) -> None:
        pass


async def _status_lists(links: list[dict[str, Any]]) -> None:
    app = create_app(ControllerConfig(), "grpc", "127.0.0.1:9", _Notifier(), run_background=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
            ids = [(await client.post("/v1/workers/register", json={"name": n})).json()["worker_id"]
                   for n in ("w0", "w1")]
            job = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 1})).json()
            r = await client.post(f"/v1/workers/{ids[1]}/telemetry", json=_telemetry(job["job_id"], links))
            assert r.status_code == 204, r.text
            full = (await client.get("/status")).json()
            assert full["links_out_of_tolerance"] == ["w1/ps_sync"]
            ps = next(x for x in full["links"] if x["traffic_class"] == "ps_sync")
            assert ps["within_tolerance"] is False and ps["measured_rtt_ms"] == 210.0
            # Not on this page, not in summary mode: still listed.
            page = (await client.get("/status", params={"limit": 1})).json()
            assert page["links"] == [] and page["links_out_of_tolerance"] == ["w1/ps_sync"]
            summary = (await client.get("/status", params={"workers": "summary"})).json()
            assert summary["links_out_of_tolerance"] == ["w1/ps_sync"]
    finally:
        app.state.runtime.close()


def _shard_links(n: int) -> list[dict[str, Any]]:
    """What a worker's link exporter reports with `n` PS shards: one ps_sync path per shard, all drifted."""
    return [{"link": f"w1->{'paramserver' if i == 0 else f'shard-{i}'}", "traffic_class": "ps_sync",
             "backend": "tc_netem", "configured_rtt_ms": 20.0, "measured_rtt_ms": 90.0, "rtt_samples": 50,
             "rtt_tolerance_ms": 25.0, "within_tolerance": False, "configured_rate_mbit": 100.0,
             "measured_rate_mbit": None, "configured_loss": 0.002, "measured_loss": 0.0, "loss_kind": "measured"}
            for i in range(n)]


def test_status_shows_a_link_per_ps_shard_and_names_a_drifted_worker_once() -> None:
    """Sharded PS: a worker's telemetry carries a path per shard, up to 64 (PS_SHARDS' bound); /status lists
    each, and `links_out_of_tolerance` names the worker's class once however many of its paths drifted."""

    async def main() -> None:
        app = create_app(ControllerConfig(), "grpc", "127.0.0.1:9", _Notifier(), run_background=False)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
                wid = (await client.post("/v1/workers/register", json={"name": "w1"})).json()["worker_id"]
                job = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 1})).json()
                url = f"/v1/workers/{wid}/telemetry"
                r = await client.post(url, json=_telemetry(job["job_id"], _shard_links(65)))
                assert r.status_code == 422, r.text
                r = await client.post(url, json=_telemetry(job["job_id"], _shard_links(64)))
                assert r.status_code == 204, r.text
                status = (await client.get("/status")).json()
                assert [lk["link"] for lk in status["links"]] == [lk["link"] for lk in _shard_links(64)]
                assert {lk["worker"] for lk in status["links"]} == {"w1"}
                assert status["links_out_of_tolerance"] == ["w1/ps_sync"]
        finally:
            app.state.runtime.close()

    asyncio.run(main())


def test_run_summary_names_the_links_out_of_tolerance() -> None:
    s = RunSummary(run_id="r", run_dir="/tmp/r", initial_loss=2.0, final_loss=1.0, loss_floor=None, steps=1,
                   workers=1, bytes_sent=0, bytes_received=0, wall_seconds=1.0, mode="sync", transport="grpc",
                   model="m", job_state="completed", profile="cellular", shaping="userspace",
                   links_out_of_tolerance=["worker-0/ps_sync"])
    assert "| links out of tolerance (host too busy to keep their timing) | worker-0/ps_sync |" in markdown_summary(s)
    assert s.to_json()["links_out_of_tolerance"] == ["worker-0/ps_sync"]


def test_the_shaper_raises_its_priority_where_allowed_and_never_fails() -> None:
    # In a child process: this one's priority must not change under the rest of the suite.
    code = "import json; from dist_llm_train.netem.userspace import shaper; print(json.dumps(shaper.raise_priority()))"
    start = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    record = json.loads(out.stdout)
    assert record["wanted"] == shaper.SHAPER_NICE
    assert record["raised"] is (record["nice"] < start) and record["nice"] <= start


def test_a_refused_priority_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(shaper.os, "setpriority", refuse)
    monkeypatch.setattr(shaper.os, "getpriority", lambda *_: 0)
    assert shaper.raise_priority() == {"nice": 0, "raised": False, "wanted": shaper.SHAPER_NICE}


def test_a_relay_never_releases_early_and_counts_its_late_releases() -> None:
    """A blocked event loop (what a busy CPU does to the relay) shows up in its stats, not as a silent error."""

    async def main() -> None:
        server, port = await _echo_server()
        relay = rl.make_relay("t", ("127.0.0.1", port), Link(delay_ms=10), Link(delay_ms=10))
        r, w = await asyncio.open_connection("127.0.0.1", await relay.start())
        w.write(b"x")
        await r.readexactly(1)  # past the emulated handshake
        t0 = time.perf_counter()
        w.write(b"y" * 10)
        await asyncio.sleep(0.002)  # the relay reads it ...
        time.sleep(0.05)  # ... then the loop is blocked well past the 10 ms due time
        await r.readexactly(10)
        rtt = time.perf_counter() - t0
        w.close()
        await relay.close()
        server.close()
        assert rtt >= 0.020 - 0.002 * 2  # both directions' delay, less the timer's early aim at most
        assert relay.stats["up"].late_releases >= 1 and relay.stats["up"].max_late_ms >= 20
        assert relay.describe()["stats"]["up"]["late_releases"] == relay.stats["up"].late_releases

    asyncio.run(main())
