"""Prometheus metrics of one worker (`dlt_worker_*`), fed from its telemetry records."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.steps = Counter("dlt_worker_steps_total", "Updates computed and pushed.", registry=r)
        self.loss = Gauge("dlt_worker_loss", "Training loss of the latest local batch (nats).", registry=r)
        self.version = Gauge("dlt_worker_ps_version", "Parameter version the worker last pulled.", registry=r)
        self.step_seconds = Histogram(
            "dlt_worker_step_seconds",
            "Wall time of one pull-compute-push step.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.compute_seconds = Histogram(
            "dlt_worker_compute_seconds",
            "Time spent computing one update.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.tokens_per_second = Gauge(
            "dlt_worker_tokens_per_second", "Tokens per second of the last step.", registry=r
        )
        self.bytes_sent = Gauge("dlt_worker_ps_bytes_sent", "Payload bytes pushed to the PS so far.", registry=r)
        self.bytes_received = Gauge(
            "dlt_worker_ps_bytes_received", "Payload bytes pulled from the PS so far.", registry=r
        )
        self.push_outcomes = Counter(
            "dlt_worker_push_outcomes_total", "PS answers to this worker's pushes.", ["outcome"], registry=r
        )

    def observe(self, record: dict[str, Any]) -> None:
        self.steps.inc()
        self.loss.set(float(record["loss"]))
        self.version.set(int(record["ps_version"]))
        self.step_seconds.observe(float(record["step_time_s"]))
        self.compute_seconds.observe(float(record.get("compute_time_s", 0.0)))
        self.tokens_per_second.set(float(record["tokens_per_s"]))
        self.bytes_sent.set(int(record["bytes_sent"]))
        self.bytes_received.set(int(record["bytes_received"]))
        self.push_outcomes.labels(outcome=str(record.get("push_outcome", "unknown"))).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
