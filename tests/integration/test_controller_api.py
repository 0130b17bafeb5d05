"""The controller's REST API end to end over an in-process ASGI transport (no sockets, no sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app

PS = ("grpc", "127.0.0.1:59999")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class RecordingNotifier:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        self.calls.append((job_id, list(members)))
        return members

    def close(self) -> None:
        pass


Factory = Callable[..., tuple[FastAPI, httpx.AsyncClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[Factory]:
    made: list[tuple[FastAPI, httpx.AsyncClient]] = []

    def make(token: str | None = None, **cfg: Any) -> tuple[FastAPI, httpx.AsyncClient]:
        app = create_app(
            ControllerConfig(auth_token=token, **cfg),
            *PS,
            RecordingNotifier(),
            clock=FakeClock(),
            run_background=False,
            max_task_attempts=3,
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ctl", headers=headers
        )
        made.append((app, client))
        return app, client

    yield make
    for app, client in made:
        await client.aclose()
        app.state.runtime.close()


@pytest.fixture
async def client(make_client: Factory) -> httpx.AsyncClient:
    return make_client()[1]


async def register(client: httpx.AsyncClient, name: str, **caps: Any) -> str:
    r = await client.post("/v1/workers/register", json={"name": name, **caps})
    assert r.status_code == 200, r.text
    return str(r.json()["worker_id"])


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "job")
    body.setdefault("config", {"training": {"steps": 20}})
    r = await client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def telemetry(job_id: str, **kw: Any) -> dict[str, Any]:
    rec = {
        "job_id": job_id,
        "step": 1,
        "ps_version": 1,
        "loss": 2.5,
        "step_time_s": 0.1,
        "samples_per_s": 160.0,
        "tokens_per_s": 5120.0,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "wall_time": 1_700_000_000.0,
    }
    return rec | kw


async def test_registration_is_idempotent_by_name(client: httpx.AsyncClient) -> None:
    r1 = await client.post(
        "/v1/workers/register", json={"name": "w0", "memory_gb": 8, "labels": {"zone": "a"}}
    )
    r2 = await client.post(
        "/v1/workers/register", json={"name": "w0", "memory_gb": 8, "labels": {"zone": "a"}}
    )
    assert r1.status_code == r2.status_code == 200
    assert r1.json() == r2.json()
    assert r1.json()["heartbeat_interval_s"] == 1.0 and r1.json()["heartbeat_miss_limit"] == 3
    workers = (await client.get("/status")).json()["workers"]
    assert [x["name"] for x in workers] == ["w0"]
    assert workers[0]["labels"] == {"zone": "a"} and workers[0]["declared"]["memory_gb"] == 8


async def test_conflicting_registration_is_409_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await register(client, "w0", flops=100)
    r = await client.post("/v1/workers/register", json={"name": "w0", "flops": 999})
    assert r.status_code == 409
    assert "flops 100.0 -> 999.0" in r.json()["detail"]
    status = (await client.get("/status")).json()
    assert status["workers"][0]["declared"]["flops"] == 100


async def test_heartbeat(client: httpx.AsyncClient) -> None:
    wid = await register(client, "w0")
    r = await client.post(f"/v1/workers/{wid}/heartbeat", json={"state": "training"})
    assert r.status_code == 200 and r.json() == {"ok": True, "commands": [], "heartbeat_interval_s": 1.0}
    assert (await client.post(f"/v1/workers/{wid}/heartbeat")).status_code == 200  # body is optional
    status = (await client.get("/status")).json()
    assert status["workers"][0]["activity"] == "training"
    assert status["counters"]["heartbeats"] == 2
    r = await client.post("/v1/workers/nobody/heartbeat", json={})
    assert r.status_code == 404 and "unknown worker 'nobody'" in r.json()["detail"]


async def test_job_submit_assign_train_complete(client: httpx.AsyncClient) -> None:
    a, b = await register(client, "a", flops=200), await register(client, "b")
    job = await submit(
        client, name="tiny", config={"model": {"name": "tiny-lstm"}, "training": {"num_workers": 2}}
    )
    assert job["num_tasks"] == 2 and job["state"] == "running"  # num_tasks defaults to training.num_workers
    assert sorted(t["worker_id"] for t in job["tasks"]) == sorted([a, b])
    jid = job["job_id"]

    got = (await client.get(f"/v1/workers/{a}/assignments")).json()
    assert len(got["tasks"]) == 1 and got["tasks"][0]["job_id"] == jid and got["tasks"][0]["num_shards"] == 2
    spec = got["jobs"][jid]
    assert spec["paramserver"] == {
        "transport": "grpc", "address": "127.0.0.1:59999", "token": None, "curve_server_key": None
    }  # no cluster secret here: no PS credential
    assert spec["model"]["name"] == "tiny-lstm" and spec["training"]["num_workers"] == 2

    for wid, version, loss in ((a, 3, 2.0), (b, 5, 1.5)):
        r = await client.post(
            f"/v1/workers/{wid}/telemetry", json=telemetry(jid, ps_version=version, loss=loss)
        )
        assert r.status_code == 204
    status = (await client.get("/status")).json()
    sj = status["jobs"][0]
    assert (
        sj["step"] == 5
        and sj["loss"] == 1.5
        and sj["tokens_per_s"] == 2 * 5120.0
        and sj["bytes_sent"] == 2000
    )
    assert {w["name"]: w["throughput_samples_per_s"] for w in status["workers"]} == {"a": 160.0, "b": 160.0}
    # the default job is sync: a round takes only updates on the current version, so every bound is 0
    assert all(w["staleness_bound"] == 0 for w in status["workers"])

    task_a = got["tasks"][0]["task_id"]
    r = await client.post(f"/v1/tasks/{task_a}/complete", json={"worker_id": b})
    assert r.status_code == 409 and "not by" in r.json()["detail"]
    assert (await client.post(f"/v1/tasks/{task_a}/complete", json={"worker_id": a})).status_code == 200
    assert (await client.post(f"/v1/tasks/{task_a}/complete", json={"worker_id": a})).status_code == 200
    assert (await client.get(f"/v1/jobs/{jid}")).json()["state"] == "running"
    task_b = next(t["task_id"] for t in job["tasks"] if t["worker_id"] == b)
    assert (await client.post(f"/v1/tasks/{task_b}/complete", json={"worker_id": b})).status_code == 200
    final = (await client.get(f"/v1/jobs/{jid}")).json()
    assert final["state"] == "completed" and final["progress"]["tasks_completed"] == 2
    assert final["progress"]["step"] == 5
    assert (await client.get(f"/v1/workers/{a}/assignments")).json()["tasks"] == []
    rows = (await client.get(f"/v1/jobs/{jid}/telemetry")).json()["rows"]
    assert [(r["worker_name"], r["ps_version"]) for r in rows] == [("a", 3), ("b", 5)]
    listing = (await client.get("/v1/jobs")).json()["jobs"]
    assert [j["job_id"] for j in listing] == [jid]


async def test_telemetry_ewma_and_paging(make_client: Factory) -> None:
    _, client = make_client(telemetry_alpha=0.5)
    wid = await register(client, "a")
    jid = (await submit(client, num_tasks=1))["job_id"]
    for rate in (100.0, 200.0, 0.0):  # zero (no measurement) does not drag the average down
        await client.post(f"/v1/workers/{wid}/telemetry", json=telemetry(jid, samples_per_s=rate))
    status = (await client.get("/status")).json()
    assert status["workers"][0]["throughput_samples_per_s"] == pytest.approx(150.0)
    page = (await client.get(f"/v1/jobs/{jid}/telemetry", params={"limit": 2})).json()
    assert len(page["rows"]) == 2
    rest = (await client.get(f"/v1/jobs/{jid}/telemetry", params={"after_id": page["next_after_id"]})).json()
    assert [r["samples_per_s"] for r in rest["rows"]] == [0.0]


async def test_fail_puts_task_back_and_too_many_failures_fail_the_job(client: httpx.AsyncClient) -> None:
    wid = await register(client, "a")
    job = await submit(client, num_tasks=1)
    tid = job["tasks"][0]["task_id"]
    r = await client.post(f"/v1/tasks/{tid}/fail", json={"worker_id": wid, "reason": "oom"})
    assert r.status_code == 200
    task = (await client.get(f"/v1/jobs/{job['job_id']}")).json()["tasks"][0]
    # Back to pending, attempt counted; the scheduling pass after the failure hands it out again.
    assert task["attempts"] == 1 and task["last_error"] == "oom" and task["state"] == "assigned"
    for _ in range(2):
        await client.post(f"/v1/tasks/{tid}/fail", json={"worker_id": wid, "reason": "oom again"})
    final = (await client.get(f"/v1/jobs/{job['job_id']}")).json()
    assert final["state"] == "failed" and "failed 3 times" in final["error"]
    assert final["tasks"][0]["state"] == "failed"
    r = await client.post(f"/v1/tasks/{tid}/fail", json={"worker_id": wid, "reason": "x"})
    assert r.status_code == 409


async def test_cancel_revokes_tasks_and_is_idempotent(make_client: Factory) -> None:
    app, client = make_client()
    wid = await register(client, "a")
    job = await submit(client, num_tasks=2)
    jid = job["job_id"]
    notifier = app.state.runtime.membership.notifier
    app.state.runtime.detector.tick()
    assert notifier.calls[-1] == (jid, [wid])
    for _ in range(2):
        r = await client.post(f"/v1/jobs/{jid}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert {t["state"] for t in r.json()["tasks"]} == {"cancelled"}
    assert (await client.get(f"/v1/workers/{wid}/assignments")).json() == {"tasks": [], "jobs": {}}
    app.state.runtime.detector.tick()
    assert notifier.calls[-1] == (jid, [])  # the PS hears that nobody is a member any more
    r = await client.post(f"/v1/tasks/{job['tasks'][0]['task_id']}/complete", json={"worker_id": wid})
    assert r.status_code == 409


async def test_cancel_of_completed_job_is_409(client: httpx.AsyncClient) -> None:
    wid = await register(client, "a")
    job = await submit(client, num_tasks=1)
    await client.post(f"/v1/tasks/{job['tasks'][0]['task_id']}/complete", json={"worker_id": wid})
    r = await client.post(f"/v1/jobs/{job['job_id']}/cancel")
    assert r.status_code == 409 and "already completed" in r.json()["detail"]


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/workers/register", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/workers/register", b"", 422, "body: Field required"),
    ("POST", "/v1/workers/register", [], 422, "body"),
    ("POST", "/v1/workers/register", {"name": 7}, 422, "body.name"),
    ("POST", "/v1/workers/register", {"name": "x", "memory_gb": "lots"}, 422, "body.memory_gb"),
    ("POST", "/v1/workers/register", {"name": "x", "memory_gb": -1}, 422, "body.memory_gb"),
    ("POST", "/v1/workers/register", b'{"name": "x", "flops": NaN}', 422, "finite"),
    ("POST", "/v1/workers/register", {"name": "x", "gpus": 8}, 422, "body.gpus: Extra inputs"),
    ("POST", "/v1/workers/register", {"name": "bad name!"}, 422, "body.name"),
    ("POST", "/v1/workers/register", {"name": "x", "compute_slowdown": 0.5}, 422, "compute_slowdown"),
    ("POST", "/v1/workers/ghost/heartbeat", {}, 404, "unknown worker"),
    ("POST", "/v1/workers/{wid}/heartbeat", {"state": "dancing"}, 422, "body.state"),
    ("POST", "/v1/workers/ghost/telemetry", "TELEMETRY", 404, "unknown worker"),
    ("POST", "/v1/workers/{wid}/telemetry", {"job_id": "job-x"}, 422, "body.step: Field required"),
    ("POST", "/v1/workers/{wid}/telemetry", "TELEMETRY_UNKNOWN_JOB", 404, "unknown job"),
    ("POST", "/v1/workers/{wid}/telemetry", "TELEMETRY_HUGE", 422, "body.bytes_sent"),
    ("GET", "/v1/workers/ghost/assignments", None, 404, "unknown worker"),
    ("POST", "/v1/tasks/ghost.0/complete", {"worker_id": "{wid}"}, 404, "unknown task"),
    ("POST", "/v1/tasks/{tid}/complete", {"worker_id": "ghost"}, 404, "unknown worker"),
    ("POST", "/v1/tasks/{tid}/fail", {"worker_id": "{wid}"}, 422, "body.reason: Field required"),
    ("POST", "/v1/jobs", {"name": "j", "config": {"controller": {}}}, 422, "config.controller: not allowed"),
    ("POST", "/v1/jobs", {"name": "j", "config": {"training": {"lr": 1}}}, 422, "config.training.lr: Extra"),
    ("POST", "/v1/jobs", {"name": "j", "config": {"training": {"steps": 0}}}, 422, "config.training.steps"),
    ("POST", "/v1/jobs", {"name": "j", "config": {"model": {"n_embd": 65, "n_head": 2}}}, 422, "divisible"),
    ("POST", "/v1/jobs", {"name": "j", "config": []}, 422, "body.config"),
    ("POST", "/v1/jobs", {"name": "j", "num_tasks": 0}, 422, "body.num_tasks"),
    ("POST", "/v1/jobs", {"name": "j", "priority": 10**30}, 422, "body.priority"),
    ("POST", "/v1/jobs", {"config": {}}, 422, "body.name: Field required"),
    ("GET", "/v1/jobs/job-ghost", None, 404, "unknown job"),
    ("POST", "/v1/jobs/job-ghost/cancel", None, 404, "unknown job"),
    ("GET", "/v1/jobs/job-ghost/telemetry", None, 404, "unknown job"),
    ("GET", "/v1/jobs/{jid}/telemetry?limit=0", None, 422, "query.limit"),
    ("GET", "/v1/nowhere", None, 404, "Not Found"),
]


@pytest.mark.parametrize(("method", "path", "body", "code", "needle"), BAD_REQUESTS)
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    client: httpx.AsyncClient, method: str, path: str, body: Any, code: int, needle: str
) -> None:
    wid = await register(client, "a")
    job = await submit(client, num_tasks=1)
    ids = {"{wid}": wid, "{jid}": job["job_id"], "{tid}": job["tasks"][0]["task_id"]}
    for k, v in ids.items():
        path = path.replace(k, v)
    if body == "TELEMETRY":
        body = telemetry(job["job_id"])
    elif body == "TELEMETRY_UNKNOWN_JOB":
        body = telemetry("job-ghost")
    elif body == "TELEMETRY_HUGE":
        body = telemetry(job["job_id"], bytes_sent=2**70)
    if isinstance(body, dict):
        body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    before = (
        (await client.get("/v1/jobs")).json(),
        [(w["name"], w["state"], w["tasks"]) for w in (await client.get("/status")).json()["workers"]],
    )
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    r = await client.request(method, path, **kwargs)
    assert r.status_code == code, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail
    after = (
        (await client.get("/v1/jobs")).json(),
        [(w["name"], w["state"], w["tasks"]) for w in (await client.get("/status")).json()["workers"]],
    )
    assert before == after


async def test_oversize_body_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/workers/register", content=b" " * (2 << 20), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json() == {"detail": "request body too large"}


async def test_auth_token_guards_everything_but_health(make_client: Factory) -> None:
    """The static operator token: /v1, /status, /metrics and the docs need it; /healthz and /readyz do not.
    (Per-worker credentials and the full route matrix: test_controller_auth.py.)"""
    _, authed = make_client(token="s3cret")
    transport = authed._transport
    async with httpx.AsyncClient(transport=transport, base_url="http://ctl") as anon:
        for path in ("/v1/jobs", "/status", "/metrics", "/openapi.json", "/docs"):
            r = await anon.get(path)
            assert r.status_code == 401 and r.json() == {"detail": "missing or invalid bearer token"}
            assert r.headers["www-authenticate"] == "Bearer"
        r = await anon.post(
            "/v1/workers/register", json={"name": "a"}, headers={"Authorization": "Bearer nope"}
        )
        assert r.status_code == 401
        for path in ("/healthz", "/readyz"):
            assert (await anon.get(path)).status_code == 200
    assert (await authed.get("/v1/jobs")).status_code == 200
    assert (await authed.get("/status")).status_code == 200
    await register(authed, "a")


async def test_metrics_content(client: httpx.AsyncClient) -> None:
    wid = await register(client, "a")
    await submit(client, num_tasks=3)
    await client.post(f"/v1/workers/{wid}/heartbeat", json={})
    await client.post("/v1/workers/ghost/heartbeat", json={})
    text = (await client.get("/metrics")).text
    for line in (
        'dlt_controller_workers{state="alive"} 1.0',
        'dlt_controller_workers{state="dead"} 0.0',
        'dlt_controller_jobs{state="running"} 1.0',
        'dlt_controller_tasks{state="assigned"} 3.0',
        "dlt_controller_heartbeats_total 1.0",
        "dlt_controller_reassignments_total 0.0",
        "dlt_controller_worker_deaths_total 0.0",
        "dlt_controller_ps_notify_failures_total 0.0",
        'dlt_controller_http_request_duration_seconds_count{method="POST",'
        'route="/v1/workers/{worker_id}/heartbeat",status="404"} 1.0',
    ):
        assert line in text, line


async def test_health_ready_and_openapi(make_client: Factory) -> None:
    app, client = make_client()
    assert (await client.get("/healthz")).json() == {"ok": True}
    assert (await client.get("/readyz")).status_code == 200
    schema = (await client.get("/openapi.json")).json()
    assert "/v1/workers/register" in schema["paths"] and "/v1/jobs/{job_id}/cancel" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200
    app.state.runtime.store.close()
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"detail": "state store is not open"}
    assert (await client.get("/healthz")).status_code == 200
