"""The controller at fleet scale: heartbeats in memory, the adaptive interval, /status summary and pages.

Over an in-process ASGI transport with a fake clock (no sockets, no sleeps), except the CLI test, which serves
the app on loopback like test_controller_client does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from dist_llm_train.cli.main import app as cli_app
from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller import AsyncControllerClient
from dist_llm_train.controller.app import create_app
from dist_llm_train.controller.models import RegisterIn
from tests.integration.test_controller_client import serving

PS = ("grpc", "127.0.0.1:59999")


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Notifier:
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return members

    def close(self) -> None:
        pass


@pytest.fixture
async def ctl() -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, Clock]]:
    clock = Clock()
    # A budget of 4 heartbeats/s at a 1 s base interval: 5 workers are told 2 s, 9 are told 3 s.
    app = create_app(ControllerConfig(heartbeat_max_rate=4.0), *PS, Notifier(), clock=clock, run_background=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl")
    yield app, client, clock
    await client.aclose()
    app.state.runtime.close()


async def register(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await client.post("/v1/workers/register", json={"name": name})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def beat(client: httpx.AsyncClient, worker_id: str, state: str = "idle") -> dict[str, Any]:
    r = await client.post(f"/v1/workers/{worker_id}/heartbeat", json={"state": state})
    assert r.status_code == 200, r.text
    return dict(r.json())


def stored_heartbeat(app: FastAPI, worker_id: str) -> float:
    w = app.state.runtime.store.get_worker(worker_id)
    assert w is not None
    return float(w.last_heartbeat)


async def test_heartbeats_stay_in_memory_until_the_detector_flushes_them(ctl: Any) -> None:
    app, client, clock = ctl
    wid = (await register(client, "w0"))["worker_id"]
    registered_at = clock.t
    clock.t += 0.7
    await beat(client, wid, "training")
    assert stored_heartbeat(app, wid) == registered_at  # no SQLite write on the hot path
    status = (await client.get("/status")).json()
    assert status["workers"][0]["last_heartbeat_age_s"] == 0.0  # /status flushes first: it shows the newest beat
    assert status["generated_at"] == clock.t  # ages are as of this moment, on the controller's clock
    assert stored_heartbeat(app, wid) == clock.t
    clock.t += 0.5
    await beat(client, wid)
    app.state.runtime.detector.tick()
    assert stored_heartbeat(app, wid) == clock.t
    assert app.state.runtime.service.heartbeats == 2


async def test_an_unknown_worker_still_gets_404_and_a_dead_one_comes_back(ctl: Any) -> None:
    app, client, clock = ctl
    r = await client.post("/v1/workers/ghost/heartbeat", json={})
    assert r.status_code == 404 and "register first" in r.json()["detail"]
    wid = (await register(client, "w0"))["worker_id"]
    clock.t += 3.5
    assert app.state.runtime.detector.tick().dead == [wid]
    await beat(client, wid)  # the slow path: through the store, alive again
    status = (await client.get("/status")).json()
    assert status["workers"][0]["state"] == "alive"
    assert status["worker_summary"]["by_state"] == {"alive": 1}


async def test_a_larger_fleet_is_told_a_longer_interval_and_timed_out_by_it(ctl: Any) -> None:
    app, client, clock = ctl
    replies = [await register(client, f"w{i}") for i in range(5)]
    assert [r["heartbeat_interval_s"] for r in replies] == [1.0, 1.0, 1.0, 1.0, 2.0]
    ids = [r["worker_id"] for r in replies]
    assert (await beat(client, ids[0]))["heartbeat_interval_s"] == 2.0  # the first ones learn it at their beat
    assert (await client.get("/status?workers=summary")).json()["heartbeat"] == {
        "interval_s": 2.0, "miss_limit": 3, "timeout_s": 6.0,
    }
    for wid in ids:
        await beat(client, wid)
    clock.t += 5.0  # past 3 × 1 s, within 3 × 2 s: nobody is dead
    assert app.state.runtime.detector.tick().dead == []
    clock.t += 1.5
    assert sorted(app.state.runtime.detector.tick().dead) == sorted(ids)


async def test_a_worker_told_a_long_interval_is_not_killed_when_the_fleet_shrinks(ctl: Any) -> None:
    app, client, clock = ctl
    ids = [(await register(client, f"w{i}"))["worker_id"] for i in range(9)]
    for wid in ids:
        assert (await beat(client, wid))["heartbeat_interval_s"] == 3.0
    clock.t += 5.0
    for wid in ids[1:]:
        await beat(client, wid)
    clock.t += 5.0  # ids[0] silent 10 s > 9 s: dead; the others, silent 5 s, are within their 9 s
    assert app.state.runtime.detector.tick().dead == [ids[0]]
    # Eight left: the current interval is 2 s (timeout 6 s), but the others were told 3 s at their last beat.
    assert (await client.get("/status?workers=summary")).json()["heartbeat"]["interval_s"] == 2.0
    clock.t += 3.5  # 8.5 s since their last beat: past 6 s, within their 9 s
    assert app.state.runtime.detector.tick().dead == []


async def test_status_summary_and_pages(ctl: Any) -> None:
    app, client, clock = ctl
    ids = {f"w{i}": (await register(client, f"w{i}"))["worker_id"] for i in range(5)}
    await beat(client, ids["w1"], "training")
    clock.t += 2.0
    full = (await client.get("/status")).json()
    assert [w["name"] for w in full["workers"]] == [f"w{i}" for i in range(5)]
    assert full["worker_page"] == {"offset": 0, "limit": None, "total": 5, "next_offset": None}
    summary = (await client.get("/status", params={"workers": "summary"})).json()
    assert summary["workers"] == [] and summary["links"] == []
    assert summary["worker_summary"] == {
        "total": 5, "by_state": {"alive": 5}, "by_activity": {"idle": 4, "training": 1}, "max_heartbeat_age_s": 2.0,
    }
    assert summary["worker_page"]["next_offset"] is None
    assert summary["jobs"] == full["jobs"] and summary["counters"] == full["counters"]
    names: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = (await client.get("/status", params={"limit": 2, "offset": offset})).json()
        names += [w["name"] for w in page["workers"]]
        offset = page["worker_page"]["next_offset"]
    assert names == [f"w{i}" for i in range(5)]
    last = (await client.get("/status", params={"limit": 2, "offset": 4})).json()["worker_page"]
    assert last == {"offset": 4, "limit": 2, "total": 5, "next_offset": None}


@pytest.mark.parametrize(
    "query", [{"workers": "some"}, {"limit": 0}, {"limit": "x"}, {"offset": -1}, {"limit": 100_001}]
)
async def test_bad_status_queries_are_422(ctl: Any, query: dict[str, Any]) -> None:
    r = await ctl[1].get("/status", params=query)
    assert r.status_code == 422, r.text
    assert list(query)[0] in r.json()["detail"]


async def test_the_typed_client_asks_for_summaries_and_pages(ctl: Any) -> None:
    app, _, _ = ctl
    transport = httpx.ASGITransport(app=app)
    async with AsyncControllerClient("http://ctl", transport_for=lambda _: transport) as client:
        for i in range(3):
            await client.register(RegisterIn(name=f"w{i}"))
        summary = await client.status(workers="summary")
        assert summary.workers == [] and summary.worker_summary is not None and summary.worker_summary.total == 3
        page = await client.status(offset=1, limit=1)
        assert [w.name for w in page.workers] == ["w1"]
        assert page.worker_page is not None and page.worker_page.next_offset == 2


def test_cli_status_summary_and_page() -> None:
    app = create_app(ControllerConfig(), *PS, Notifier(), clock=Clock(), run_background=False)
    try:
        with serving(app) as url:
            runner = CliRunner()
            for i in range(3):
                r = httpx.post(f"{url}/v1/workers/register", json={"name": f"w{i}"})
                assert r.status_code == 200
            res = runner.invoke(cli_app, ["status", "--controller", url, "--summary"])
            assert res.exit_code == 0, res.output
            assert "workers: 3 (3 alive)" in res.output and "w0" not in res.output
            res = runner.invoke(cli_app, ["status", "--controller", url, "--limit", "2"])
            assert res.exit_code == 0, res.output
            assert "w0" in res.output and "w1" in res.output and "w2" not in res.output
            assert "--offset 2" in res.output
    finally:
        app.state.runtime.close()
