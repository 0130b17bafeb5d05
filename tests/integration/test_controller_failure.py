"""Failure detection, reassignment, PS membership updates and restart from the SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.controller.store import SCHEMA_VERSION, Store, StoreError
from dist_llm_train.core.types import ErrorCode, PSError


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RecordingNotifier:
    """Records membership pushes; `fail_with` makes the next calls raise (an unreachable PS)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_with: Exception | None = None

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append((job_id, list(members)))
        return members

    def close(self) -> None:
        pass


def build(db: str = ":memory:", **kw: Any) -> tuple[FastAPI, httpx.AsyncClient, FakeClock, RecordingNotifier]:
    clock, notifier = FakeClock(), RecordingNotifier()
    cfg = ControllerConfig(state_db=db, heartbeat_interval_s=1.0, heartbeat_miss_limit=3, **kw)
    app = create_app(cfg, "grpc", "127.0.0.1:59999", notifier, clock=clock, run_background=False)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl")
    return app, client, clock, notifier


async def register(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/v1/workers/register", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["worker_id"])


async def test_silent_worker_is_declared_dead_and_its_task_reassigned() -> None:
    app, client, clock, notifier = build()
    ids = [await register(client, n) for n in ("a", "b", "c")]
    job = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 3})).json()
    jid = job["job_id"]
    holder = {t["task_id"]: t["worker_id"] for t in job["tasks"]}
    assert sorted(holder.values()) == sorted(ids)  # one task each
    det = app.state.runtime.detector
    det.tick()
    assert notifier.calls == [(jid, sorted(ids))]

    clock.advance(2.0)
    for wid in ids[:2]:
        await client.post(f"/v1/workers/{wid}/heartbeat", json={})
    clock.advance(1.5)  # c has been silent 3.5 s > 3 × 1 s; a and b only 1.5 s
    report = det.tick()
    assert report.dead == [ids[2]]
    lost = next(t for t, w in holder.items() if w == ids[2])
    assert report.assigned and report.assigned[0][0] == lost and report.assigned[0][1] in ids[:2]
    assert notifier.calls[-1] == (jid, sorted(ids[:2]))

    status = (await client.get("/status")).json()
    states = {w["name"]: w["state"] for w in status["workers"]}
    assert states == {"a": "alive", "b": "alive", "c": "dead"}
    assert status["counters"]["reassignments"] == 1 and status["counters"]["worker_deaths"] == 1
    assert sorted(len(w["tasks"]) for w in status["workers"]) == [0, 1, 2]
    metrics = (await client.get("/metrics")).text
    assert "dlt_controller_worker_deaths_total 1.0" in metrics
    assert "dlt_controller_reassignments_total 1.0" in metrics
    assert 'dlt_controller_workers{state="dead"} 1.0' in metrics
    assert det.tick().dead == []  # a dead worker is not declared dead twice

    # c comes back: alive, with no tasks; the next job's task goes to it (it holds the fewest).
    assert await register(client, "c") == ids[2]
    assert (await client.get(f"/v1/workers/{ids[2]}/assignments")).json()["tasks"] == []
    job2 = (await client.post("/v1/jobs", json={"name": "j2", "config": {}, "num_tasks": 1})).json()
    assert job2["tasks"][0]["worker_id"] == ids[2]
    await client.aclose()
    app.state.runtime.close()


async def test_heartbeat_from_a_dead_worker_revives_it_without_tasks() -> None:
    app, client, clock, _ = build()
    wid = await register(client, "a")
    await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 1})
    clock.advance(10)
    assert app.state.runtime.detector.tick().dead == [wid]
    await client.post(f"/v1/workers/{wid}/heartbeat", json={"state": "idle"})
    status = (await client.get("/status")).json()
    assert status["workers"][0]["state"] == "alive"
    # Its old task was released; the pass that runs when it is back hands it to the only live worker.
    assert len((await client.get(f"/v1/workers/{wid}/assignments")).json()["tasks"]) == 1
    await client.aclose()
    app.state.runtime.close()


async def test_unreachable_paramserver_is_counted_and_retried() -> None:
    app, client, _, notifier = build()
    wid = await register(client, "a")
    jid = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 1})).json()["job_id"]
    det = app.state.runtime.detector
    notifier.fail_with = PSError(ErrorCode.UNAVAILABLE, "connection refused")
    assert det.tick().membership.failed == {jid: "UNAVAILABLE: connection refused"}
    notifier.fail_with = ConnectionResetError("peer reset")
    det.tick()
    status = (await client.get("/status")).json()
    assert status["counters"]["ps_notify_failures"] == 2 and "peer reset" in status["ps_notify_last_error"]
    assert status["jobs"][0]["membership_synced"] is False
    assert "dlt_controller_ps_notify_failures_total 2.0" in (await client.get("/metrics")).text
    # The PS does not know the job yet (no worker created it): wait quietly, not a failure.
    notifier.fail_with = PSError(ErrorCode.NOT_FOUND, "unknown job")
    assert det.tick().membership.waiting == [jid]
    notifier.fail_with = None
    assert det.tick().membership.sent == {jid: [wid]}
    assert det.tick().membership.sent == {}  # nothing changed, nothing sent
    status = (await client.get("/status")).json()
    assert status["counters"]["ps_notify_failures"] == 2 and status["jobs"][0]["membership_synced"] is True
    assert status["jobs"][0]["members"] == [wid]
    await client.aclose()
    app.state.runtime.close()


async def test_background_loop_detects_death_and_notifies_without_help() -> None:
    notifier = RecordingNotifier()
    cfg = ControllerConfig(heartbeat_interval_s=0.2, heartbeat_miss_limit=3)  # dead after 0.6 s of silence
    app = create_app(cfg, "grpc", "127.0.0.1:59999", notifier)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl")
    runtime = app.state.runtime
    loop_task = runtime.detector.start()
    try:
        a, b = await register(client, "a"), await register(client, "b")
        jid = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 2})).json()[
            "job_id"
        ]
        for _ in range(200):  # a keeps beating every 50 ms, b goes silent; bounded at ~10 s
            await client.post(f"/v1/workers/{a}/heartbeat", json={})
            if notifier.calls and notifier.calls[-1] == (jid, [a]):
                break
            await asyncio.sleep(0.05)
        assert (jid, sorted([a, b])) in notifier.calls
        assert notifier.calls[-1] == (jid, [a])
        status = (await client.get("/status")).json()
        assert {w["name"]: (w["state"], len(w["tasks"])) for w in status["workers"]} == {
            "a": ("alive", 2),
            "b": ("dead", 0),
        }
    finally:
        runtime.detector.stop()
        await asyncio.wait_for(loop_task, timeout=5)
        await client.aclose()
        runtime.close()


async def test_state_survives_restart_from_the_sqlite_file(tmp_path: Path) -> None:
    db = str(tmp_path / "controller.db")
    app, client, clock, _ = build(db)
    a, b = await register(client, "a"), await register(client, "b")
    job = (await client.post("/v1/jobs", json={"name": "j", "config": {"training": {"steps": 7}}})).json()
    jid = job["job_id"]
    first = job["tasks"][0]
    await client.post(f"/v1/tasks/{first['task_id']}/complete", json={"worker_id": first["worker_id"]})
    await client.post(
        f"/v1/workers/{a}/telemetry",
        json={
            "job_id": jid,
            "step": 3,
            "ps_version": 4,
            "loss": 1.25,
            "step_time_s": 0.1,
            "samples_per_s": 10,
            "tokens_per_s": 320,
            "bytes_sent": 1,
            "bytes_received": 2,
            "wall_time": clock.t,
        },
    )
    clock.advance(10)
    app.state.runtime.detector.tick()  # both silent: dead, the open task back to pending
    before = (await client.get(f"/v1/jobs/{jid}")).json()
    await client.aclose()
    app.state.runtime.close()

    app2, client2, _, _ = build(db)
    after = (await client2.get(f"/v1/jobs/{jid}")).json()
    assert after == before
    assert after["progress"]["step"] == 4 and after["config"]["training"]["steps"] == 7
    status = (await client2.get("/status")).json()
    assert status["counters"]["worker_deaths"] == 2 and status["counters"]["reassignments"] == 1
    assert await register(client2, "a") == a and await register(client2, "b") == b  # no duplicates
    status = (await client2.get("/status")).json()
    assert [w["name"] for w in status["workers"]] == ["a", "b"]
    assert all(w["state"] == "alive" for w in status["workers"])
    assert sum(len(w["tasks"]) for w in status["workers"]) == 1  # the unfinished shard, resumed
    assert status["workers"][0]["throughput_samples_per_s"] == 10
    await client2.aclose()
    app2.state.runtime.close()


async def test_restart_gives_alive_workers_a_grace_period(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    app, client, _, _ = build(db)
    await register(client, "a")
    await client.aclose()
    app.state.runtime.close()
    app2, client2, clock2, _ = build(db)
    clock2.advance(2.0)  # the worker's last beat was long before, but it has a full timeout from the restart
    assert app2.state.runtime.detector.tick().dead == []
    clock2.advance(2.0)
    assert len(app2.state.runtime.detector.tick().dead) == 1
    await client2.aclose()
    app2.state.runtime.close()


def test_store_migrates_uses_wal_and_refuses_newer_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    assert not store.ping()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this controller"):
        Store(path)
    with pytest.raises(StoreError, match="closed"):
        store.list_jobs()
