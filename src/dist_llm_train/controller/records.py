"""Plain records the store returns: what a worker, job and task *are*, independent of SQL.

Text read back is made `readable`: a row written before the API refused lone UTF-16 surrogates (a worker
label of "\ud800" once made every GET /status answer 500, permanently) shows U+FFFD in their place.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

WORKER_STATES = ("alive", "dead")
JOB_STATES = ("pending", "running", "completed", "cancelled", "failed")
TASK_STATES = ("pending", "assigned", "completed", "cancelled", "failed")
TERMINAL_JOB_STATES = frozenset({"completed", "cancelled", "failed"})


def _readable_text(value: str) -> str:
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # only lone surrogates fail: replace each with U+FFFD
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return value


def readable(value: Any) -> Any:
    """`value` (text, or a JSON-like tree of it) with every lone surrogate replaced, so it can be sent as UTF-8."""
    if isinstance(value, str):
        return _readable_text(value)
    if isinstance(value, dict):
        return {readable(k): readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    return value


@functools.lru_cache(maxsize=4096)
def labels_of(raw: str) -> dict[str, str]:
    """A stored labels column, parsed and made readable once per distinct text (a fleet shares a few label sets,
    and `/status` reads every worker's): callers get a copy."""
    labels: dict[str, str] = readable(json.loads(raw))
    return labels


@dataclass
class Worker:
    worker_id: str
    name: str
    memory_gb: float
    flops: float
    bandwidth_mbps: float
    compute_slowdown: float
    labels: dict[str, str]
    state: str
    activity: str
    registered_at: float
    last_heartbeat: float
    throughput_ewma: float | None

    def capabilities(self) -> dict[str, Any]:
        """The declared figures a re-registration must repeat while this worker is alive."""
        return {
            "memory_gb": self.memory_gb,
            "flops": self.flops,
            "bandwidth_mbps": self.bandwidth_mbps,
            "compute_slowdown": self.compute_slowdown,
            "labels": self.labels,
        }

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> Worker:
        return cls(
            worker_id=readable(r["worker_id"]),
            name=readable(r["name"]),
            memory_gb=r["memory_gb"],
            flops=r["flops"],
            bandwidth_mbps=r["bandwidth_mbps"],
            compute_slowdown=r["compute_slowdown"],
            labels=dict(labels_of(r["labels"])),
            state=r["state"],
            activity=r["activity"],
            registered_at=r["registered_at"],
            last_heartbeat=r["last_heartbeat"],
            throughput_ewma=r["throughput_ewma"],
        )


@dataclass
class Job:
    job_id: str
    name: str
    config: dict[str, Any]
    num_tasks: int
    priority: int
    required_flops: float
    required_memory_gb: float
    state: str
    created_at: float
    updated_at: float
    seq: int = 0
    error: str | None = None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> Job:
        return cls(
            job_id=r["job_id"],
            name=readable(r["name"]),
            config=readable(json.loads(r["config"])),
            num_tasks=r["num_tasks"],
            priority=r["priority"],
            required_flops=r["required_flops"],
            required_memory_gb=r["required_memory_gb"],
            state=r["state"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            seq=r["seq"],
            error=readable(r["error"]),
        )


@dataclass
class Task:
    task_id: str
    job_id: str
    shard_id: int
    state: str
    worker_id: str | None
    attempts: int
    last_error: str | None
    updated_at: float

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> Task:
        return cls(
            task_id=r["task_id"],
            job_id=r["job_id"],
            shard_id=r["shard_id"],
            state=r["state"],
            worker_id=r["worker_id"],
            attempts=r["attempts"],
            last_error=readable(r["last_error"]),
            updated_at=r["updated_at"],
        )


TELEMETRY_FIELDS = (
    "step",
    "ps_version",
    "loss",
    "step_time_s",
    "compute_time_s",
    "samples_per_s",
    "tokens_per_s",
    "bytes_sent",
    "bytes_received",
    "wall_time",
    "push_outcome",
)
