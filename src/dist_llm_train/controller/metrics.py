"""Prometheus metrics (`dlt_controller_*`) on a registry owned by one app instance.

State gauges and the persistent counters are read from the store at scrape time, so they
are never out of step with /status and survive a restart; request latency is a histogram
filled by a small ASGI middleware labelled by route template (not raw path, which would
let any client create unbounded label values).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dist_llm_train.controller.membership import MembershipSync
from dist_llm_train.controller.records import JOB_STATES, TASK_STATES, WORKER_STATES
from dist_llm_train.controller.service import ControllerService
from dist_llm_train.controller.store import StoreError


class ControllerCollector(Collector):
    def __init__(self, svc: ControllerService, membership: MembershipSync) -> None:
        self.svc = svc
        self.membership = membership

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "dlt_controller_heartbeats", "Heartbeats received from workers.", value=self.svc.heartbeats
        )
        yield CounterMetricFamily(
            "dlt_controller_ps_notify_failures",
            "Failed attempts to push job membership to the parameter server.",
            value=self.membership.failures,
        )
        try:
            with self.svc.store.tx():
                counts = {t: self.svc.store.count_by_state(t) for t in ("workers", "jobs", "tasks")}
                counters = self.svc.store.counters()
        except StoreError:
            return  # store closed: /readyz says so; the process metrics above still answer
        for table, states, doc in (
            ("workers", WORKER_STATES, "Workers known to the controller, by state."),
            ("jobs", JOB_STATES, "Jobs by state."),
            ("tasks", TASK_STATES, "Tasks (data shards) by state."),
        ):
            g = GaugeMetricFamily(f"dlt_controller_{table}", doc, labels=["state"])
            for s in states:
                g.add_metric([s], counts[table].get(s, 0))
            yield g
        yield CounterMetricFamily(
            "dlt_controller_reassignments",
            "Tasks taken back from dead workers to be scheduled again.",
            value=counters.get("reassignments", 0),
        )
        yield CounterMetricFamily(
            "dlt_controller_worker_deaths",
            "Workers declared dead after missing heartbeats.",
            value=counters.get("worker_deaths", 0),
        )


def make_registry(svc: ControllerService, membership: MembershipSync) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    registry.register(ControllerCollector(svc, membership))
    latency = Histogram(
        "dlt_controller_http_request_duration_seconds",
        "HTTP request latency by method, route template and status code.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )
    return registry, latency


class BodyTooLarge(Exception):
    """Raised from `receive` when a request's body passes the limit (the middleware answers 413)."""


class _LimitedBody:
    """Hands the app the body as it arrives and counts it; past the limit it raises instead of reading on.

    `Content-Length` is checked before anything is read, but a chunked body (`Transfer-Encoding: chunked`)
    has no length up front: only counting what is received bounds it."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.received = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        if self.exceeded:
            raise BodyTooLarge
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self._limit:
                self.exceeded = True
                raise BodyTooLarge
        return message


class RequestMetricsMiddleware:
    """Times every HTTP request and refuses bodies over `max_body_bytes` with 413: at once when the
    declared `Content-Length` says so, else (chunked bodies) as soon as the bytes received pass it; the
    route never runs, so nothing of such a request is stored."""

    def __init__(self, app: ASGIApp, latency: Histogram, max_body_bytes: int) -> None:
        self.app = app
        self.latency = latency
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            if self._too_large(scope):
                await _send_json(send_wrapper, 413, TOO_LARGE)
            else:
                await self._guarded(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.latency.labels(scope["method"], label, str(status["code"])).observe(
                time.perf_counter() - start
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on a counted body; once it passed the limit, whatever the app answers (FastAPI turns
        the failed read into a 400) is replaced by one 413."""
        body = _LimitedBody(receive, self.max_body_bytes)
        replied = False

        async def send_unless_too_large(message: Message) -> None:
            nonlocal replied
            if body.exceeded:
                if not replied:
                    replied = True
                    await _send_json(send, 413, TOO_LARGE)
                return
            replied = replied or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):  # a route that let it through: answered below
            await self.app(scope, body, send_unless_too_large)
        if body.exceeded and not replied:
            await _send_json(send, 413, TOO_LARGE)

    def _too_large(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    return int(value) > self.max_body_bytes
                except ValueError:
                    return True
        return False


TOO_LARGE = b'{"detail":"request body too large"}'


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
