"""The controller's auth matrix (docs/security.md): every route of the app, every kind of wrong credential.

The route list comes from the app itself, so a route added later without an entry here fails
`test_every_route_is_in_the_matrix`. For each route: no credential, a malformed one, one signed by
another cluster, a tampered one, an expired one, and credentials of roles or workers not allowed the
route — each refused (401 / 403) with the store's whole SQLite content and the in-memory counters
unchanged — then the right credential is accepted. A refused request's body is never received.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Route

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.core.credentials import TokenAuthority, generate_secret

SECRET = generate_secret()
AUTHORITY = TokenAuthority(SECRET)
OTHER_CLUSTER = TokenAuthority(generate_secret())
ADMIN = AUTHORITY.mint_for("admin", "operator")
PS = ("grpc", "127.0.0.1:59999")


class Notifier:
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return members

    def close(self) -> None:
        pass


@dataclass
class World:
    app: FastAPI
    client: httpx.AsyncClient
    workers: dict[str, str] = field(default_factory=dict)  # name -> worker_id
    tokens: dict[str, str] = field(default_factory=dict)  # name -> the worker's own credential
    job_id: str = ""
    tasks: dict[str, str] = field(default_factory=dict)  # name -> a task id the worker holds

    def state(self) -> tuple[list[str], int]:
        """Everything a refused request must leave alone: the whole database, and the heartbeat counter."""
        svc = self.app.state.runtime.service
        return list(svc.store._conn.iterdump()), svc.heartbeats


async def _call(world: World, method: str, path: str, token: str | None, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await world.client.request(method, path, json=body, headers=headers)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    app = create_app(
        ControllerConfig(cluster_secret=SECRET), *PS, Notifier(), run_background=False
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
        w = World(app, client)
        join = AUTHORITY.mint_for("join")
        for name in ("w1", "w2"):
            r = await _call(w, "POST", "/v1/workers/register", join, {"name": name})
            assert r.status_code == 200, r.text
            w.workers[name], w.tokens[name] = r.json()["worker_id"], r.json()["token"]
        r = await _call(w, "POST", "/v1/jobs", ADMIN, {"name": "j", "config": {"training": {"steps": 20}},
                                                       "num_tasks": 4})
        assert r.status_code == 201, r.text
        w.job_id = r.json()["job_id"]
        for name in ("w1", "w2"):
            r = await _call(w, "GET", f"/v1/workers/{w.workers[name]}/assignments", w.tokens[name])
            assert r.status_code == 200, r.text
            w.tasks[name] = r.json()["tasks"][0]["task_id"]
        yield w
    app.state.runtime.close()


def _telemetry(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "step": 1, "ps_version": 0, "loss": 2.5, "step_time_s": 0.1, "samples_per_s": 1.0,
            "tokens_per_s": 1.0, "bytes_sent": 1, "bytes_received": 1, "wall_time": 1.0}


@dataclass
class Case:
    """One route: how to call it (as worker w1 where a worker is involved), who may, and who else is refused."""

    method: str
    path: Callable[[World], str]
    body: Callable[[World], Any] = lambda w: None
    right: Callable[[World], str | None] = lambda w: ADMIN
    refused_roles: Callable[[World], dict[str, str]] = lambda w: {}


def _w1(w: World) -> str:
    return w.tokens["w1"]


def _not_admin(w: World) -> dict[str, str]:
    return {"w1's worker credential": w.tokens["w1"], "join": AUTHORITY.mint_for("join"),
            "controller": AUTHORITY.mint_for("controller", "controller")}


def _other_worker(w: World) -> dict[str, str]:
    return {"w2's credential": w.tokens["w2"], "join": AUTHORITY.mint_for("join"),
            "controller": AUTHORITY.mint_for("controller", "controller")}


CASES: dict[tuple[str, str], Case] = {
    ("POST", "/v1/workers/register"): Case(
        "POST", lambda w: "/v1/workers/register", lambda w: {"name": "w3"},
        right=lambda w: AUTHORITY.mint_for("join", "w3"),
        refused_roles=lambda w: {"worker": w.tokens["w1"], "join bound to another name": AUTHORITY.mint_for(
            "join", "w9"), "controller": AUTHORITY.mint_for("controller", "controller")},
    ),
    ("POST", "/v1/workers/{worker_id}/heartbeat"): Case(
        "POST", lambda w: f"/v1/workers/{w.workers['w1']}/heartbeat", lambda w: {"state": "idle"},
        right=_w1, refused_roles=_other_worker,
    ),
    ("POST", "/v1/workers/{worker_id}/telemetry"): Case(
        "POST", lambda w: f"/v1/workers/{w.workers['w1']}/telemetry", lambda w: _telemetry(w.job_id),
        right=_w1, refused_roles=_other_worker,
    ),
    ("GET", "/v1/workers/{worker_id}/assignments"): Case(
        "GET", lambda w: f"/v1/workers/{w.workers['w1']}/assignments", right=_w1, refused_roles=_other_worker,
    ),
    ("POST", "/v1/tasks/{task_id}/complete"): Case(
        "POST", lambda w: f"/v1/tasks/{w.tasks['w1']}/complete", lambda w: {"worker_id": w.workers["w1"]},
        right=_w1, refused_roles=_other_worker,
    ),
    ("POST", "/v1/tasks/{task_id}/fail"): Case(
        "POST", lambda w: f"/v1/tasks/{w.tasks['w1']}/fail", lambda w: {"worker_id": w.workers["w1"], "reason": "x"},
        right=_w1, refused_roles=_other_worker,
    ),
    ("POST", "/v1/jobs"): Case(
        "POST", lambda w: "/v1/jobs", lambda w: {"name": "k", "config": {"training": {"steps": 20}}},
        refused_roles=_not_admin,
    ),
    ("GET", "/v1/jobs"): Case("GET", lambda w: "/v1/jobs", refused_roles=_not_admin),
    ("GET", "/v1/jobs/{job_id}"): Case("GET", lambda w: f"/v1/jobs/{w.job_id}", refused_roles=_not_admin),
    ("POST", "/v1/jobs/{job_id}/cancel"): Case(
        "POST", lambda w: f"/v1/jobs/{w.job_id}/cancel", refused_roles=_not_admin
    ),
    ("GET", "/v1/jobs/{job_id}/telemetry"): Case(
        "GET", lambda w: f"/v1/jobs/{w.job_id}/telemetry", refused_roles=_not_admin
    ),
    ("GET", "/status"): Case("GET", lambda w: "/status", refused_roles=_not_admin),
    ("GET", "/metrics"): Case("GET", lambda w: "/metrics", refused_roles=_not_admin),
    ("GET", "/openapi.json"): Case("GET", lambda w: "/openapi.json", refused_roles=_not_admin),
    ("GET", "/docs"): Case("GET", lambda w: "/docs", refused_roles=_not_admin),
    ("GET", "/docs/oauth2-redirect"): Case("GET", lambda w: "/docs/oauth2-redirect", refused_roles=_not_admin),
    ("GET", "/redoc"): Case("GET", lambda w: "/redoc", refused_roles=_not_admin),
    ("GET", "/healthz"): Case("GET", lambda w: "/healthz", right=lambda w: None),
    ("GET", "/readyz"): Case("GET", lambda w: "/readyz", right=lambda w: None),
}


def _tampered(token: str) -> str:
    prefix, _, signature = token.split(".")
    claims = base64.urlsafe_b64encode(b'{"role":"admin","sub":"me"}').rstrip(b"=").decode()
    return f"{prefix}.{claims}.{signature}"


def _app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every (method, path) the app serves: the API's from its OpenAPI schema, plus the docs' own routes."""
    routes = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    for route in app.routes:
        if isinstance(route, Route) and not isinstance(route, APIRoute):
            routes |= {(method, route.path) for method in (route.methods or set()) - {"HEAD"}}
    return routes


async def test_every_route_is_in_the_matrix(world: World) -> None:
    assert _app_routes(world.app) == set(CASES)


@pytest.mark.parametrize("route", list(CASES), ids=[f"{m} {p}" for m, p in CASES])
async def test_route_refuses_wrong_credentials_without_changing_state(
    world: World, route: tuple[str, str]
) -> None:
    case = CASES[route]
    path, body, right = case.path(world), case.body(world), case.right(world)
    if right is not None:  # an authenticated route: every wrong credential is refused
        wrong: dict[str, tuple[str | None, int]] = {
            "none": (None, 401),
            "garbage": ("not-a-token", 401),
            "other cluster": (OTHER_CLUSTER.mint_for("admin", "x"), 401),
            "tampered": (_tampered(right), 401),
            "expired": (AUTHORITY.mint_for("admin", "x", ttl_s=-1), 401),
            **{name: (token, 403) for name, token in case.refused_roles(world).items()},
        }
        for name, (token, status) in wrong.items():
            before = world.state()
            r = await _call(world, case.method, path, token, body)
            assert r.status_code == status, f"{route} with {name}: {r.status_code} {r.text}"
            assert "detail" in r.json()
            assert world.state() == before, f"{route} with {name} changed state"
    r = await _call(world, case.method, path, right, body)
    assert 200 <= r.status_code < 300, f"{route} with the right credential: {r.status_code} {r.text}"


async def test_a_worker_cannot_report_another_workers_task(world: World) -> None:
    """w2 names w1 in the body of a report on w1's task (the path does not name a worker): refused, no change."""
    before = world.state()
    for action, body in (("complete", {"worker_id": world.workers["w1"]}),
                         ("fail", {"worker_id": world.workers["w1"], "reason": "evict"})):
        r = await _call(world, "POST", f"/v1/tasks/{world.tasks['w1']}/{action}", world.tokens["w2"], body)
        assert r.status_code == 403, r.text
    assert world.state() == before


async def test_registration_issues_a_credential_per_worker_and_ps_credentials_per_job(world: World) -> None:
    claims = AUTHORITY.verify(world.tokens["w1"])
    assert (claims.role, claims.subject, claims.job) == ("worker", world.workers["w1"], "")
    assert claims.expires_at > 0
    r = await _call(world, "GET", f"/v1/workers/{world.workers['w1']}/assignments", world.tokens["w1"])
    ps = r.json()["jobs"][world.job_id]["paramserver"]
    job_claims = AUTHORITY.verify(ps["token"])
    assert (job_claims.role, job_claims.subject, job_claims.job) == ("worker", world.workers["w1"], world.job_id)


async def test_public_metrics_and_docs_are_opt_in() -> None:
    cfg = ControllerConfig(cluster_secret=SECRET, public_metrics=True, public_docs=True)
    app = create_app(cfg, *PS, Notifier(), run_background=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as anon:
            for path in ("/metrics", "/openapi.json", "/docs"):
                assert (await anon.get(path)).status_code == 200
            assert (await anon.get("/status")).status_code == 401
    finally:
        app.state.runtime.close()


async def test_refused_requests_never_receive_their_body(world: World) -> None:
    """Drive the ASGI app by hand: for a refused request, `receive` (the body) is never awaited."""
    for (method, _), case in CASES.items():
        if case.right(world) is None:
            continue
        received: list[bool] = []
        sent: list[dict[str, Any]] = []

        async def receive(received: list[bool] = received) -> dict[str, Any]:
            received.append(True)
            return {"type": "http.request", "body": b'{"name": "x"}', "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": case.path(world), "raw_path": case.path(world).encode(),
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                                   (b"content-length", b"13")],
                 "client": ("127.0.0.1", 1), "server": ("ctl", 80)}
        await world.app(scope, receive, send)
        assert sent[0]["status"] == 401, case.path(world)
        assert not received, f"{method} {case.path(world)}: body read before the 401"


async def test_an_expired_worker_credential_is_refused_and_joining_again_renews_it() -> None:
    """What the worker agent does on `Unauthorized`: register again with its join credential."""
    from dist_llm_train.controller.client import AsyncControllerClient
    from dist_llm_train.controller.errors import Unauthorized
    from dist_llm_train.controller.models import RegisterIn

    now = [1_700_000_000.0]
    app = create_app(ControllerConfig(cluster_secret=SECRET, worker_token_ttl_s=60), *PS, Notifier(),
                     clock=lambda: now[0], run_background=False)
    transport = httpx.ASGITransport(app=app)
    try:
        async with AsyncControllerClient("http://ctl", token=AUTHORITY.mint_for("join", "w1"),
                                         transport_for=lambda _: transport) as worker:
            reply = await worker.register(RegisterIn(name="w1"))
            assert reply.token is not None
            worker.use_token(reply.token)
            await worker.heartbeat(reply.worker_id)
            now[0] += 61
            with pytest.raises(Unauthorized, match="expired"):
                await worker.heartbeat(reply.worker_id)
            again = await worker.register(RegisterIn(name="w1"))  # sent with the join credential, not the expired
            assert again.worker_id == reply.worker_id and again.token != reply.token
            worker.use_token(again.token or "")
            await worker.heartbeat(again.worker_id)
    finally:
        app.state.runtime.close()
