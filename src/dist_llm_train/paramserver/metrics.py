"""Prometheus metrics of the parameter server (`dlt_ps_*`).

Each server instance owns its own `CollectorRegistry`, so several servers can live in one
process (tests, benchmarks) without colliding in the global registry.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dist_llm_train.core.types import PushOutcome
from dist_llm_train.paramserver.job import StoreObserver

# Push latency spans sub-millisecond tiny updates up to multi-second 100 MB uploads on bad links.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROUND_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PSMetrics(StoreObserver):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.version_g = Gauge(
            "dlt_ps_version", "Current parameter version of each job.", ["job"], registry=r
        )
        self.members_g = Gauge(
            "dlt_ps_members", "Workers in each job's round membership.", ["job"], registry=r
        )
        self.pushes = Counter(
            "dlt_ps_pushes", "Pushes accepted for processing, by outcome.", ["outcome"], registry=r
        )
        self.rejected = Counter(
            "dlt_ps_rejected", "Requests refused with an error, by error code.", ["reason"], registry=r
        )
        self.bytes_received = Counter(
            "dlt_ps_bytes_received", "Payload bytes received (pushes, InitJob).", registry=r
        )
        self.bytes_sent = Counter("dlt_ps_bytes_sent", "Payload bytes sent (parameter pulls).", registry=r)
        self.round_seconds = Histogram(
            "dlt_ps_round_seconds",
            "Sync round duration, first update to close.",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.push_latency = Histogram(
            "dlt_ps_push_latency_seconds",
            "Time from a push's header arriving to its reply.",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_pushes = Counter(
            "dlt_ps_worker_pushes",
            "Pushes by worker and outcome (acceptance rate = applied+buffered over all).",
            ["job", "worker", "outcome"],
            registry=r,
        )
        self.staleness_bound = Gauge(
            "dlt_ps_staleness_bound",
            "Staleness bound each worker's next push is held to (adaptive: from its measured speed).",
            ["job", "worker"],
            registry=r,
        )
        self.update_bytes_c = Counter(
            "dlt_ps_update_bytes",
            "Payload bytes of received updates by kind (gradient, pseudo_gradient) and codec.",
            ["kind", "codec"],
            registry=r,
        )
        for outcome in PushOutcome:
            self.pushes.labels(outcome.value)

    # StoreObserver
    def push_outcome(self, job_id: str, outcome: PushOutcome) -> None:
        self.pushes.labels(outcome.value).inc()

    def round_closed(self, job_id: str, seconds: float) -> None:
        self.round_seconds.observe(seconds)

    def version(self, job_id: str, version: int) -> None:
        self.version_g.labels(job_id).set(version)

    def members(self, job_id: str, count: int) -> None:
        self.members_g.labels(job_id).set(count)

    def worker_push(self, job_id: str, worker_id: str, outcome: PushOutcome, staleness_bound: int) -> None:
        self.worker_pushes.labels(job_id, worker_id, outcome.value).inc()
        self.staleness_bound.labels(job_id, worker_id).set(staleness_bound)

    def update_bytes(self, job_id: str, kind: str, codec: str, nbytes: int) -> None:
        self.update_bytes_c.labels(kind, codec).inc(nbytes)

    # transport-level
    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()


class MetricsHTTPServer:
    """`/metrics` over HTTP on a daemon thread (prometheus-client's own WSGI server)."""

    def __init__(self, metrics: PSMetrics, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._httpd.server_port)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
