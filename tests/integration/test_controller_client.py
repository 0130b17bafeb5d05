"""ControllerClient and AsyncControllerClient against a real controller app: every route, typed replies, errors.

The sync client (and the worker's ControllerAPI) talk to the app served by uvicorn on loopback; the async
client also runs over an in-process ASGI transport, which lets a test see which traffic class, host and
headers each request used.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller import (
    AsyncControllerClient,
    BadInput,
    Conflict,
    ControllerClient,
    ControllerError,
    ControllerUnavailable,
    NotFound,
    Retry,
    Unauthorized,
    UnknownWorker,
)
from dist_llm_train.controller.app import create_app
from dist_llm_train.controller.client import ControllerTrafficClass
from dist_llm_train.controller.jobs import JOB_CONFIG_SECTIONS
from dist_llm_train.controller.models import (
    AssignedJobOut,
    JobIn,
    JobOut,
    OkOut,
    PSEndpointOut,
    RegisterIn,
    StatusOut,
    TelemetryIn,
    TelemetryRowOut,
)
from dist_llm_train.controller.server import bind_listening_socket
from dist_llm_train.worker.controller_api import ControllerAPI, ControllerGone

TOKEN = "s3cret"
PS = ("grpc", "127.0.0.1:59999")


@dataclass
class PSWorkerStats:
    """What /status reads of the PS's per-worker record."""

    worker_id: str
    staleness_bound: int
    acceptance_rate: float
    pushes: int
    mean_staleness: float


class FakePS:
    """Accepts every membership; `stats` is what it reports per worker once asked."""

    def __init__(self) -> None:
        self.stats: list[PSWorkerStats] = []
        self.counters: dict[str, int] = {}
        self.members: dict[str, list[str]] = {}

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        self.members[job_id] = list(members)
        return members

    def worker_stats(self, job_id: str) -> list[PSWorkerStats]:
        return self.stats

    def job_stats(self, job_id: str) -> SimpleNamespace:
        return SimpleNamespace(members=self.members.get(job_id, []), workers=self.stats, counters=self.counters)

    def close(self) -> None:
        pass


def make_app(token: str | None = TOKEN) -> FastAPI:
    # A stopped clock: heartbeat ages are 0 and stay 0, so two reads of /status are equal.
    return create_app(ControllerConfig(auth_token=token), *PS, FakePS(), clock=lambda: 1_700_000_000.0,
                      run_background=False)


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = bind_listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the controller did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def unused_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def telemetry(job_id: str, **kw: Any) -> TelemetryIn:
    fields: dict[str, Any] = {
        "job_id": job_id,
        "step": 1,
        "ps_version": 3,
        "loss": 2.5,
        "step_time_s": 0.1,
        "samples_per_s": 160.0,
        "tokens_per_s": 5120.0,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "wall_time": 1_700_000_000.0,
    }
    return TelemetryIn.model_validate(fields | kw)


@pytest.fixture
def app() -> Iterator[FastAPI]:
    app = make_app()
    yield app
    app.state.runtime.close()


@pytest.fixture
def url(app: FastAPI) -> Iterator[str]:
    with serving(app) as base_url:
        yield base_url


@pytest.fixture
def client(url: str) -> Iterator[ControllerClient]:
    with ControllerClient(url, token=TOKEN) as c:
        yield c


# -- the sync client: every route, over a real socket ----------------------------------------------------------
def test_sync_client_walks_a_job_through_every_route(client: ControllerClient) -> None:
    assert client.healthz().ok and client.readyz().ready
    reg = client.register(RegisterIn(name="w0", memory_gb=8))
    assert client.register(RegisterIn(name="w0", memory_gb=8)) == reg  # idempotent by name
    wid = reg.worker_id
    assert reg.heartbeat_interval_s == 1.0 and reg.heartbeat_miss_limit == 3
    hb = client.heartbeat(wid, "training")
    assert hb.ok and hb.commands == []

    job = client.submit_job(JobIn(name="tiny", config={"training": {"steps": 20}}, num_tasks=1))
    assert isinstance(job, JobOut) and job.state == "running" and job.num_tasks == 1
    assert job.tasks[0].worker_id == wid and job.tasks[0].worker_name == "w0"
    assert job.progress.total_steps == 20 and job.progress.loss is None

    got = client.assignments(wid)
    task_id = got.tasks[0].task_id
    assert got.tasks[0].job_id == job.job_id and got.tasks[0].num_shards == 1
    spec = got.jobs[job.job_id]
    assert spec.paramserver == PSEndpointOut(transport="grpc", address="127.0.0.1:59999")
    assert spec.training["steps"] == 20 and spec.name == "tiny" and spec.members == [wid]

    client.telemetry(wid, telemetry(job.job_id))  # 204: nothing to return
    status = client.status()
    assert isinstance(status, StatusOut) and status.scheduler == "priority"
    assert (status.jobs[0].step, status.jobs[0].loss, status.jobs[0].tokens_per_s) == (3, 2.5, 5120.0)
    worker = status.workers[0]
    assert (worker.name, worker.activity, worker.tasks) == ("w0", "training", [task_id])
    assert worker.declared.memory_gb == 8 and worker.throughput_samples_per_s == 160.0
    assert status.counters.heartbeats == 1

    page = client.job_telemetry(job.job_id)
    assert [(r.worker_name, r.ps_version, r.loss) for r in page.rows] == [("w0", 3, 2.5)]
    assert client.job_telemetry(job.job_id, after_id=page.next_after_id, limit=10).rows == []
    assert [j.job_id for j in client.list_jobs().jobs] == [job.job_id]

    done = client.complete_task(task_id, worker_id=wid)
    assert done == OkOut(ok=True, task_id=task_id, state="completed")
    assert client.get_job(job.job_id).state == "completed"
    with pytest.raises(Conflict, match="already completed"):
        client.cancel_job(job.job_id)
    assert "dlt_controller_heartbeats_total 1.0" in client.metrics()


def test_sync_client_errors_carry_the_status_and_the_servers_message(client: ControllerClient) -> None:
    wid = client.register(RegisterIn(name="w0", flops=100)).worker_id
    job = client.submit_job(JobIn(name="j", num_tasks=1))

    for call in (
        lambda: client.heartbeat("ghost", "idle"),
        lambda: client.assignments("ghost"),
        lambda: client.telemetry("ghost", telemetry(job.job_id)),
    ):
        with pytest.raises(UnknownWorker) as unknown:
            call()
        assert unknown.value.status_code == 404 and "unknown worker 'ghost'" in unknown.value.message

    with pytest.raises(NotFound) as missing:  # a task route: not the worker's own, so not UnknownWorker
        client.complete_task("ghost.0", worker_id=wid)
    assert type(missing.value) is NotFound and "unknown task" in missing.value.message

    with pytest.raises(BadInput) as bad:  # valid as a request, refused by the controller's config check
        client.submit_job(JobIn(name="j", config={"training": {"steps": 0}}))
    assert bad.value.status_code == 422 and bad.value.message.startswith("config.training.steps")
    with pytest.raises(ControllerError, match="config.controller: not allowed"):
        client.submit_job(JobIn(name="j", config={"controller": {}}))

    with pytest.raises(Conflict) as clash:
        client.register(RegisterIn(name="w0", flops=999))
    assert clash.value.status_code == 409 and "flops 100.0 -> 999.0" in clash.value.message


def test_the_token_is_sent_and_a_missing_one_is_a_401(url: str) -> None:
    with ControllerClient(url) as anonymous:
        assert anonymous.healthz().ok  # health stays open
        with pytest.raises(ControllerError) as refused:
            anonymous.status()
    assert type(refused.value) is Unauthorized  # what a worker answers by registering again
    assert (refused.value.status_code, refused.value.message) == (401, "missing or invalid bearer token")
    with ControllerClient(url, token="wrong") as wrong, pytest.raises(ControllerError, match="bearer token"):
        wrong.register(RegisterIn(name="w0"))
    with ControllerClient(url, token=TOKEN) as authorised:
        assert authorised.status().workers == []


def test_an_unreachable_controller_is_controller_unavailable() -> None:
    dead = unused_url()
    with ControllerClient(dead) as client, pytest.raises(ControllerUnavailable, match="unreachable"):
        client.status()  # no retry by default: at once
    t0 = time.monotonic()
    retry = Retry(give_up_after_s=0.2, first_backoff_s=0.05, max_backoff_s=0.1)
    with ControllerClient(dead, retry=retry) as client, pytest.raises(ControllerUnavailable, match="for 0s"):
        client.status()
    assert time.monotonic() - t0 >= 0.2  # 0.05 + 0.1 + 0.1 of backoff before giving up
    stopping = Retry(abandon=lambda: True)
    with ControllerClient(dead, retry=stopping) as client, pytest.raises(ControllerUnavailable, match="stopping"):
        client.status()


# -- the async client ---------------------------------------------------------------------------------------
class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes requests to the app and notes which traffic class's client sent each, to which host, with
    which Authorization header."""

    def __init__(self, traffic_class: ControllerTrafficClass, app: FastAPI, seen: list[tuple[str, ...]]) -> None:
        self.traffic_class = traffic_class
        self.inner = httpx.ASGITransport(app=app)
        self.seen = seen

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        self.seen.append((self.traffic_class, request.url.host, request.url.path, auth))
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def asgi_app() -> AsyncIterator[FastAPI]:
    app = make_app()
    yield app
    app.state.runtime.close()


async def test_async_client_sends_each_traffic_class_through_its_own_client(asgi_app: FastAPI) -> None:
    seen: list[tuple[str, ...]] = []
    opened: list[str] = []

    def transport_for(traffic_class: ControllerTrafficClass) -> httpx.AsyncBaseTransport:
        opened.append(traffic_class)
        return RecordingTransport(traffic_class, asgi_app, seen)

    relays: dict[ControllerTrafficClass, str] = {"heartbeat": "http://hb-relay", "telemetry": "http://tm-relay/"}
    async with AsyncControllerClient(
        "http://ctl/", token=TOKEN, class_urls=relays, transport_for=transport_for
    ) as client:
        wid = (await client.register(RegisterIn(name="w0"))).worker_id
        for _ in range(2):
            await client.heartbeat(wid, "idle")
        job = await client.submit_job(JobIn(name="j", num_tasks=1))
        await client.telemetry(wid, telemetry(job.job_id))
        task = (await client.assignments(wid)).tasks[0]
        assert (await client.fail_task(task.task_id, worker_id=wid, reason="oom")).task_id == task.task_id
        failed = (await client.get_job(job.job_id)).tasks[0]
        assert (failed.attempts, failed.last_error) == (1, "oom")
        assert (await client.status()).jobs[0].step == 3

    assert opened == ["task", "heartbeat", "telemetry"]  # one client per class, opened on first use
    assert {(cls, host) for cls, host, *_ in seen} == {
        ("task", "ctl"),
        ("heartbeat", "hb-relay"),
        ("telemetry", "tm-relay"),
    }
    assert [path for cls, _, path, _ in seen if cls == "heartbeat"] == [f"/v1/workers/{wid}/heartbeat"] * 2
    assert [path for cls, _, path, _ in seen if cls == "telemetry"] == [f"/v1/workers/{wid}/telemetry"]
    assert {auth for *_, auth in seen} == {f"Bearer {TOKEN}"}


async def test_async_client_errors(asgi_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=asgi_app)
    async with AsyncControllerClient("http://ctl", token=TOKEN, transport_for=lambda _: transport) as client:
        with pytest.raises(UnknownWorker, match="unknown worker 'ghost'"):
            await client.heartbeat("ghost", "idle")
        with pytest.raises(BadInput) as bad:
            await client.submit_job(JobIn(name="j", config={"training": {"lr": 1}}))
        assert bad.value.status_code == 422 and "config.training.lr: Extra inputs" in bad.value.message
        with pytest.raises(NotFound, match="unknown job 'job-ghost'"):
            await client.job_telemetry("job-ghost")
        asgi_app.state.runtime.store.close()
        with pytest.raises(ControllerError) as not_ready:
            await client.readyz()
        assert (not_ready.value.status_code, not_ready.value.message) == (503, "state store is not open")
    async with AsyncControllerClient("http://ctl", transport_for=lambda _: transport) as anonymous:
        with pytest.raises(ControllerError, match="bearer token"):
            await anonymous.list_jobs()

    dead = unused_url()
    async with AsyncControllerClient(dead) as client:
        with pytest.raises(ControllerUnavailable, match="unreachable"):
            await client.healthz()
    retry = Retry(give_up_after_s=0.1, first_backoff_s=0.05)
    async with AsyncControllerClient(dead, retry=retry) as client:
        with pytest.raises(ControllerUnavailable, match="unreachable for"):
            await client.healthz()


# -- the worker's client --------------------------------------------------------------------------------------
async def test_worker_client_keeps_the_agents_error_semantics(url: str) -> None:
    stop = threading.Event()
    api = ControllerAPI(url, token=TOKEN, stop=stop, heartbeat_url=unused_url(), give_up_after_s=30)
    try:
        wid = (await api.register(RegisterIn(name="w0"))).worker_id  # task class: base_url
        with pytest.raises(UnknownWorker):
            await api.assignments("ghost")
        assert await api.ping("task") is None  # its first sample would include the TCP handshake
        rtt = await api.ping("task")
        assert rtt is not None and 0 < rtt < 5
        stop.set()  # a stopping worker does not wait out the 30 s budget for its heartbeat relay
        t0 = time.monotonic()
        with pytest.raises(ControllerGone, match="stopping"):
            await api.heartbeat(wid, "idle")
        assert time.monotonic() - t0 < 5
        assert ControllerGone is ControllerUnavailable
    finally:
        await api.aclose()


# -- the response models: the same keys as before, and every key the controller builds -------------------------
async def test_status_json_keeps_its_keys_and_parses_back(asgi_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=asgi_app)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://ctl", headers=headers) as http, \
            AsyncControllerClient("http://ctl", token=TOKEN, transport_for=lambda _: transport) as client:
        wid = (await client.register(RegisterIn(name="w0"))).worker_id
        job = await client.submit_job(JobIn(name="j", num_tasks=1))
        await client.telemetry(wid, telemetry(job.job_id))

        raw = (await http.get("/status")).json()
        assert list(raw) == [
            "scheduler", "paramserver", "heartbeat", "jobs", "workers", "counters", "ps_notify_last_error", "links",
            "worker_summary", "worker_page", "links_out_of_tolerance", "generated_at",  # added later, at the end
        ]
        assert list(raw["jobs"][0]) == [
            "job_id", "name", "state", "priority", "step", "total_steps", "loss", "tokens_per_s", "samples_per_s",
            "bytes_sent", "bytes_received", "max_worker_step", "mode", "max_staleness", "codec", "aggregation",
            "strategy", "aggregation_health", "tasks", "members", "membership_synced", "error",
        ]
        assert raw["jobs"][0]["aggregation_health"] is None  # the PS has not reported yet
        # Before the PS reports on a worker, only the configured bound: no acceptance figures, not even null.
        assert list(raw["workers"][0]) == [
            "worker_id", "name", "state", "activity", "last_heartbeat_age_s", "tasks", "throughput_samples_per_s",
            "staleness_bound", "staleness_source", "declared", "labels",
        ]
        assert raw["workers"][0]["staleness_source"] == "config"
        assert (await client.status()).model_dump(mode="json", exclude_unset=True) == raw

        runtime = asgi_app.state.runtime
        runtime.membership.notifier.stats = [PSWorkerStats(wid, 4, 0.75, 8, 1.5)]
        # Two rounds closed short after straggler timeouts; the second fell below the rule's precondition.
        runtime.membership.notifier.counters = {
            "aggregation_rounds_short": 2, "aggregation_last_short_version": 9, "aggregation_last_short_updates": 3,
            "aggregation_fallback_median": 1, "aggregation_last_fallback_version": 9,
            "aggregation_last_fallback_updates": 3,
        }
        runtime.detector.tick()  # the PS acknowledges the membership and reports on the worker
        raw = (await http.get("/status")).json()
        assert raw["jobs"][0]["aggregation_health"] == {
            "short_rounds": 2, "last_short_version": 9, "last_short_updates": 3, "fallback_rounds": 1,
            "fallback_rule": "median", "last_fallback_version": 9, "last_fallback_updates": 3, "degraded": True,
        }
        assert {k: raw["workers"][0][k] for k in ("staleness_bound", "acceptance_rate", "pushes",
                                                  "mean_staleness", "staleness_source")} == {
            "staleness_bound": 4, "acceptance_rate": 0.75, "pushes": 8, "mean_staleness": 1.5,
            "staleness_source": "paramserver",
        }
        parsed = await client.status()
        assert parsed.workers[0].acceptance_rate == 0.75
        assert parsed.model_dump(mode="json", exclude_unset=True) == raw


async def test_response_models_hold_every_key_the_controller_builds(asgi_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=asgi_app)
    async with AsyncControllerClient("http://ctl", token=TOKEN, transport_for=lambda _: transport) as client:
        wid = (await client.register(RegisterIn(name="w0"))).worker_id
        job = await client.submit_job(JobIn(name="j", num_tasks=1))
        await client.telemetry(wid, telemetry(job.job_id))
    service = asgi_app.state.runtime.service
    view = service.describe_job(job.job_id)
    assert JobOut.model_validate(view).model_dump() == view
    row = service.job_telemetry(job.job_id, 0, 1)[0]
    assert list(TelemetryRowOut.model_fields) == list(row)
    assert set(JOB_CONFIG_SECTIONS) <= set(AssignedJobOut.model_fields)


def test_openapi_names_a_response_model_for_every_route(app: FastAPI) -> None:
    schema = app.openapi()
    expected = {
        ("post", "/v1/workers/register"): "RegisterOut",
        ("post", "/v1/workers/{worker_id}/heartbeat"): "HeartbeatOut",
        ("get", "/v1/workers/{worker_id}/assignments"): "AssignmentsOut",
        ("post", "/v1/tasks/{task_id}/complete"): "OkOut",
        ("post", "/v1/tasks/{task_id}/fail"): "OkOut",
        ("post", "/v1/jobs"): "JobOut",
        ("get", "/v1/jobs"): "JobListOut",
        ("get", "/v1/jobs/{job_id}"): "JobOut",
        ("post", "/v1/jobs/{job_id}/cancel"): "JobOut",
        ("get", "/v1/jobs/{job_id}/telemetry"): "JobTelemetryOut",
        ("get", "/status"): "StatusOut",
        ("get", "/healthz"): "HealthOut",
        ("get", "/readyz"): "ReadyOut",
    }
    for (method, path), model in expected.items():
        ok = next(v for k, v in schema["paths"][path][method]["responses"].items() if k.startswith("2"))
        assert ok["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}, path
    assert "acceptance_rate" in schema["components"]["schemas"]["WorkerStatusOut"]["properties"]


def test_the_client_imports_without_the_server_side() -> None:
    code = (
        "import json, sys\n"
        "import dist_llm_train.controller, dist_llm_train.controller.client\n"
        "heavy = ('torch', 'fastapi', 'starlette', 'uvicorn')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
