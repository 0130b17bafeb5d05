"""Issue 14, item 3 on the controller: every failure the issue measured, with its exact input, as a regression.

Lone surrogates and control characters in labels and names, `/status` over a legacy row holding one, a 10 MB
chunked body, `Infinity` and `seed: -1` in a job config, telemetry with `ps_version = 2^62` (against the job's
last version, and against the PS's real version when the PS can say), `text_path:
/etc/passwd`, the same failure report replayed five times, and `required_memory_gb: false`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.core.types import ErrorCode, JobStats, PSError

TEN_MB = 10 << 20


class NullNotifier:
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return members

    def close(self) -> None:
        pass


def make_app(state_db: str = ":memory:", **kw: Any) -> FastAPI:
    return create_app(
        ControllerConfig(state_db=state_db), "grpc", "127.0.0.1:1", NullNotifier(), run_background=False, **kw
    )


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    application = make_app(max_task_attempts=5)
    yield application
    application.state.runtime.close()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as c:
        yield c


async def raw_post(client: httpx.AsyncClient, path: str, text: str) -> httpx.Response:
    """POST JSON text as written (httpx's json= cannot encode a lone surrogate; a raw client can send one)."""
    return await client.post(path, content=text.encode(), headers={"content-type": "application/json"})


async def register(client: httpx.AsyncClient, name: str) -> str:
    r = await client.post("/v1/workers/register", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["worker_id"])


# -- text ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/workers/register", '{"name": "a", "labels": {"zone": "\\ud800"}}', "labels.zone"),
        ("/v1/workers/register", '{"name": "a", "labels": {"\\ud800": "x"}}', "labels"),
        ("/v1/workers/register", '{"name": "a", "labels": {"zone": "eu\\u0000west"}}', "control character U+0000"),
        ("/v1/workers/register", '{"name": "a", "labels": {"zone": "\\u001b[31mred"}}', "control character U+001B"),
        ("/v1/jobs", '{"name": "job\\ud800"}', "body.name"),
        ("/v1/jobs", '{"name": "job\\u0085"}', "control character U+0085"),
        ("/v1/jobs", '{"name": "j", "config": {"network": {"netem_profile": {"x": "\\udfff"}}}}', "netem_profile.x"),
    ],
)
async def test_lone_surrogates_and_control_characters_are_refused_at_the_edge(
    client: httpx.AsyncClient, app: FastAPI, path: str, body: str, field: str
) -> None:
    r = await raw_post(client, path, body)
    assert r.status_code == 422 and field in r.json()["detail"], r.text
    store = app.state.runtime.store
    assert store.list_workers() == [] and store.list_jobs() == []
    assert (await client.get("/status")).status_code == 200


async def test_text_is_nfc_normalised(client: httpx.AsyncClient) -> None:
    r = await raw_post(client, "/v1/workers/register", '{"name": "a", "labels": {"city": "Zu\\u0308rich"}}')
    assert r.status_code == 200
    status = (await client.get("/status")).json()
    assert status["workers"][0]["labels"] == {"city": "Zürich"}


async def test_status_survives_a_legacy_row_with_a_lone_surrogate(tmp_path: Path) -> None:
    db = str(tmp_path / "state.sqlite")
    first = make_app(db)
    caps = {"memory_gb": 1.0, "flops": 1.0, "bandwidth_mbps": 1.0, "compute_slowdown": 1.0}
    # What the controller stored before the edge refused it: a label holding "\ud800".
    first.state.runtime.store.upsert_worker("w-legacy", "legacy", {**caps, "labels": {"zone": "\ud800"}}, 0.0)
    first.state.runtime.close()
    restarted = make_app(db)  # the row is in SQLite: it outlives the process
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=restarted), base_url="http://ctl") as c:
            r = await c.get("/status")
            assert r.status_code == 200, r.text
            assert r.json()["workers"][0]["labels"] == {"zone": "\ufffd"}
            assert (await c.get("/metrics")).status_code == 200
    finally:
        restarted.state.runtime.close()


# -- body size ---------------------------------------------------------------------------------------------
def chunked(total: int, piece: int = 64 << 10) -> Iterator[bytes]:
    yield b'{"name": "big", "labels": {"pad": "'
    for _ in range(total // piece):
        yield b"x" * piece
    yield b'"}}'


async def achunked(total: int) -> AsyncIterator[bytes]:
    for piece in chunked(total):
        yield piece


async def test_a_chunked_10mb_body_is_refused_with_413_and_nothing_is_stored(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    r = await client.post(
        "/v1/workers/register", content=achunked(TEN_MB), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json() == {"detail": "request body too large"}
    assert "content-length" not in r.request.headers  # it really was sent without a declared length
    assert app.state.runtime.store.list_workers() == []
    r = await client.post("/v1/workers/register", content=achunked(100), headers={"content-type": "application/json"})
    assert r.status_code == 200  # a small chunked body is fine


def test_a_chunked_10mb_body_over_a_real_socket_gets_413() -> None:
    app = make_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            r = c.post("/v1/workers/register", content=chunked(TEN_MB), headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert c.get("/status").json()["workers"] == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.runtime.close()


# -- numbers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ('{"training": {"markov_concentration": Infinity}}', "config.training.markov_concentration"),
        ('{"training": {"dirichlet_alpha": 1e400}}', "config.training.dirichlet_alpha"),
        ('{"training": {"gradient_clip_norm": NaN}}', "config.training.gradient_clip_norm"),
        ('{"training": {"seed": -1}}', "config.training.seed"),
        ('{"training": {"update_bound": {"factor": Infinity}}}', "config.training.update_bound.factor"),
        ('{"training": {"data": "text", "text_path": "/etc/passwd"}}', "outside the data directory"),
        ('{"training": {"data": "text", "text_path": "../../etc/passwd"}}', "outside the data directory"),
    ],
)
async def test_job_configs_refuse_non_finite_negative_seeds_and_paths_outside_the_data_dir(
    client: httpx.AsyncClient, app: FastAPI, config: str, needle: str
) -> None:
    r = await raw_post(client, "/v1/jobs", f'{{"name": "j", "config": {config}}}')
    assert r.status_code == 422 and needle in r.json()["detail"], r.text
    assert app.state.runtime.store.list_jobs() == []


async def test_a_text_path_inside_the_data_dir_is_accepted(
    client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("hello")
    def job(path: str) -> dict[str, Any]:
        return {"name": "j", "config": {"training": {"data": "text", "text_path": path}}}

    for path in ("corpus.txt", str(tmp_path / "corpus.txt")):
        r = await client.post("/v1/jobs", json=job(path))
        assert r.status_code == 201, r.text
    (tmp_path / "escape.txt").symlink_to("/etc/passwd")
    r = await client.post("/v1/jobs", json=job("escape.txt"))
    assert r.status_code == 422 and "outside the data directory" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "j", "required_memory_gb": False},
        {"name": "j", "required_flops": "1000"},
        {"name": "j", "priority": 1.5},
        {"name": "j", "num_tasks": True},
    ],
)
async def test_json_types_are_taken_strictly(client: httpx.AsyncClient, app: FastAPI, body: dict[str, Any]) -> None:
    r = await client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert app.state.runtime.store.list_jobs() == []


def telemetry(job_id: str, **kw: Any) -> dict[str, Any]:
    base = {
        "job_id": job_id,
        "step": 1,
        "ps_version": 1,
        "loss": 2.0,
        "step_time_s": 0.1,
        "samples_per_s": 10.0,
        "tokens_per_s": 100.0,
        "bytes_sent": 1,
        "bytes_received": 1,
        "wall_time": 1.0,
    }
    return {**base, **kw}


async def test_telemetry_cannot_set_the_job_step_past_its_last_version(client: httpx.AsyncClient) -> None:
    wid = await register(client, "a")
    job = (await client.post("/v1/jobs", json={"name": "j", "config": {"training": {"steps": 20}}})).json()
    jid = job["job_id"]
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=2**62))
    assert r.status_code == 422 and "body.ps_version" in r.json()["detail"]
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=21))
    assert r.status_code == 422  # one past the job's 20 versions
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, step=2**62))
    assert r.status_code == 422 and "body.step" in r.json()["detail"]
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=20))).status_code == 204
    assert (await client.get(f"/v1/jobs/{jid}")).json()["progress"]["step"] == 20
    status = (await client.get("/status")).json()
    assert status["jobs"][0]["step"] == 20 and status["jobs"][0]["max_worker_step"] == 1


# -- failure reports ---------------------------------------------------------------------------------------
async def test_the_same_failure_report_replayed_five_times_is_counted_once(client: httpx.AsyncClient) -> None:
    a = await register(client, "a")
    b = await register(client, "b")
    job = (await client.post("/v1/jobs", json={"name": "j", "num_tasks": 1})).json()
    tid = job["tasks"][0]["task_id"]
    holder = job["tasks"][0]["worker_id"]
    other = b if holder == a else a
    report = {"worker_id": holder, "reason": "CUDA out of memory"}
    replies = [await client.post(f"/v1/tasks/{tid}/fail", json=report) for _ in range(5)]
    assert [r.status_code for r in replies] == [200] * 5
    assert [r.json()["replayed"] for r in replies] == [False, True, True, True, True]
    view = (await client.get(f"/v1/jobs/{job['job_id']}")).json()
    assert view["state"] == "running" and view["tasks"][0]["attempts"] == 1
    # The worker that failed the shard does not get it back while another can take it.
    assert view["tasks"][0]["worker_id"] == other
    assigned = (await client.get(f"/v1/workers/{other}/assignments")).json()["tasks"]
    assert assigned[0]["attempt"] == 2


async def test_a_lone_workers_replayed_report_names_its_attempt_and_counts_once(client: httpx.AsyncClient) -> None:
    wid = await register(client, "a")
    job = (await client.post("/v1/jobs", json={"name": "j", "num_tasks": 1})).json()
    tid = job["tasks"][0]["task_id"]
    held = (await client.get(f"/v1/workers/{wid}/assignments")).json()["tasks"][0]
    assert held["attempt"] == 1
    report = {"worker_id": wid, "reason": "oom", "attempt": held["attempt"]}
    for _ in range(5):  # it is the only worker, so it holds the task again (attempt 2) while the replays arrive
        assert (await client.post(f"/v1/tasks/{tid}/fail", json=report)).status_code == 200
    view = (await client.get(f"/v1/jobs/{job['job_id']}")).json()
    assert view["state"] == "running" and view["tasks"][0]["attempts"] == 1
    assert view["tasks"][0]["worker_id"] == wid  # nobody else could take it
    r = await client.post(f"/v1/tasks/{tid}/fail", json={**report, "attempt": 3})
    assert r.status_code == 409 and "attempt 2" in r.json()["detail"]
    r = await client.post(f"/v1/tasks/{tid}/fail", json={**report, "attempt": 2})
    assert r.status_code == 200 and not r.json()["replayed"]
    assert (await client.get(f"/v1/jobs/{job['job_id']}")).json()["tasks"][0]["attempts"] == 2


def test_the_checks_hold_across_restarts(tmp_path: Path) -> None:
    """Failure records live in SQLite: a replay after a controller restart is still counted once."""
    db = str(tmp_path / "state.sqlite")

    async def first() -> tuple[str, dict[str, Any]]:
        app = make_app(db)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as c:
            await register(c, "a")
            await register(c, "b")
            job = (await c.post("/v1/jobs", json={"name": "j", "num_tasks": 1})).json()
            report = {"worker_id": job["tasks"][0]["worker_id"], "reason": "boom"}
            assert (await c.post(f"/v1/tasks/{job['tasks'][0]['task_id']}/fail", json=report)).status_code == 200
        app.state.runtime.close()
        return job["tasks"][0]["task_id"], report

    async def second(tid: str, report: dict[str, Any]) -> None:
        app = make_app(db)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as c:
            r = await c.post(f"/v1/tasks/{tid}/fail", json=report)
            assert r.status_code == 200 and r.json()["replayed"], r.text
            jobs = (await c.get("/v1/jobs")).json()["jobs"]
            assert jobs[0]["tasks"][0]["attempts"] == 1
        app.state.runtime.close()

    tid, report = asyncio.run(first())
    asyncio.run(second(tid, report))


# -- telemetry against the PS's real version ------------------------------------------------------------------
class VersionedPS(NullNotifier):
    """A PS that reports each job at `version` (`job_stats`, as the real notifier does), counting the asks."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.asks = 0
        self.down = False

    def job_stats(self, job_id: str) -> JobStats:
        self.asks += 1
        if self.down:
            raise PSError(ErrorCode.UNAVAILABLE, "connection refused")
        return JobStats(job_id, self.version, "sync", [], {}, 0.0, False, 10)


@pytest.fixture
async def versioned() -> AsyncIterator[tuple[httpx.AsyncClient, VersionedPS]]:
    ps = VersionedPS(version=3)
    application = create_app(ControllerConfig(), "grpc", "127.0.0.1:1", ps, run_background=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://ctl") as c:
        yield c, ps
    application.state.runtime.close()


async def test_telemetry_past_the_ps_real_version_is_refused(
    versioned: tuple[httpx.AsyncClient, VersionedPS],
) -> None:
    """The issue's input, 2^62, and a claim within the job's 20 versions but past the PS's 3: both refused, and
    the job's step stays what the PS has."""
    client, ps = versioned
    wid = await register(client, "a")
    jid = (await client.post("/v1/jobs", json={"name": "j", "config": {"training": {"steps": 20}}})).json()["job_id"]
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=2**62))
    assert r.status_code == 422 and "body.ps_version" in r.json()["detail"]
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=20))
    assert r.status_code == 422, r.text
    assert "past the parameter server's version 3" in r.json()["detail"]
    assert (await client.get(f"/v1/jobs/{jid}")).json()["progress"]["step"] == 0  # nothing stored
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=3))).status_code == 204
    asks = ps.asks
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=2))).status_code == 204
    assert ps.asks == asks  # within the version already seen: judged without asking the PS
    ps.version = 7  # the PS published since: an honest claim past the last answer is asked about, and accepted
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=7))).status_code == 204
    assert ps.asks == asks + 1
    status = (await client.get("/status")).json()
    assert status["jobs"][0]["step"] == 7


async def test_telemetry_is_judged_by_the_job_bound_while_the_ps_is_away(
    versioned: tuple[httpx.AsyncClient, VersionedPS],
) -> None:
    client, ps = versioned
    ps.down = True
    wid = await register(client, "a")
    jid = (await client.post("/v1/jobs", json={"name": "j", "config": {"training": {"steps": 20}}})).json()["job_id"]
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=5))).status_code == 204
    asks = ps.asks
    r = await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=2**62))
    assert r.status_code == 422  # the job's own bound still holds
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=6))).status_code == 204
    assert ps.asks == asks  # no new ask within the backoff after a failed one
