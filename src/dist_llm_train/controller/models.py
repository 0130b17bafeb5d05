"""Request and response bodies of the REST API (pydantic: validation and the OpenAPI schema).

Every request model forbids unknown keys and non-finite floats, and bounds every number
and string: bad input is refused with a 4xx that names the field, never stored, and can
never overflow SQLite's 64-bit integers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_INT = 2**62  # far below SQLite's INTEGER limit, far above any real step or byte count
Name = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ErrorOut(BaseModel):
    """Every 4xx (and the 503 of /readyz): one human-readable message."""

    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why}
    for code, why in (
        (400, "Malformed JSON body"),
        (401, "Missing or invalid bearer token (when auth is configured)"),
        (404, "Unknown worker, job or task"),
        (409, "Conflicts with the current state"),
        (413, "Request body too large"),
        (422, "A field is invalid; the message names its path"),
    )
}


class RegisterIn(_Body):
    name: str = Name
    memory_gb: float = Field(16.0, gt=0, le=1e6)
    flops: float = Field(100.0, gt=0, le=1e30)
    bandwidth_mbps: float = Field(1000.0, gt=0, le=1e9)
    compute_slowdown: float = Field(1.0, ge=1.0, le=1000.0)
    labels: dict[str, str] = Field(default_factory=dict, max_length=32)


class RegisterOut(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    heartbeat_miss_limit: int


class HeartbeatIn(_Body):
    state: Literal["idle", "training"] | None = None


class HeartbeatOut(BaseModel):
    ok: bool
    commands: list[str]


class LinkReportIn(_Body):
    """One shaped link as the worker sees it (issue 4): configured vs measured; None = not measured (yet)."""

    link: str = Field(min_length=1, max_length=160)
    traffic_class: Literal["heartbeat", "task", "telemetry", "ps_sync"]
    backend: str = Field(min_length=1, max_length=32)
    configured_rtt_ms: float = Field(ge=0, le=1e6)
    measured_rtt_ms: float | None = Field(None, ge=0, le=1e7)
    rtt_samples: int = Field(0, ge=0, le=MAX_INT)
    configured_rate_mbit: float | None = Field(None, ge=0, le=1e6)
    measured_rate_mbit: float | None = Field(None, ge=0, le=1e7)
    configured_loss: float = Field(ge=0, le=1)
    measured_loss: float | None = Field(None, ge=0, le=1)
    loss_kind: Literal["modelled", "measured"]


class TelemetryIn(_Body):
    job_id: str = Field(min_length=1, max_length=128)
    step: int = Field(ge=0, le=MAX_INT)
    ps_version: int = Field(ge=0, le=MAX_INT)
    loss: float = Field(ge=-1e30, le=1e30)
    step_time_s: float = Field(ge=0, le=1e9)
    samples_per_s: float = Field(ge=0, le=1e15)
    tokens_per_s: float = Field(ge=0, le=1e15)
    bytes_sent: int = Field(ge=0, le=MAX_INT)
    bytes_received: int = Field(ge=0, le=MAX_INT)
    wall_time: float = Field(ge=0, le=1e11)
    # Optional extras the worker also reports; kept for the run report.
    compute_time_s: float | None = Field(None, ge=0, le=1e9)
    push_outcome: str | None = Field(None, max_length=32)
    push_time_s: float | None = Field(None, ge=0, le=1e9)
    push_bytes: int | None = Field(None, ge=0, le=MAX_INT)
    links: list[LinkReportIn] | None = Field(None, max_length=16, description="Shaped links (netem), if any.")


class TaskDoneIn(_Body):
    worker_id: str = Field(min_length=1, max_length=128)


class TaskFailIn(_Body):
    worker_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=2000)


class JobIn(_Body):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="A subset of the run config: the model, training and network sections.",
    )
    num_tasks: int | None = Field(
        None, ge=1, le=1024, description="Data shards; default training.num_workers."
    )
    priority: int = Field(1, ge=-1000, le=1000)
    required_flops: float = Field(
        1000.0, ge=0, le=1e30, description="Per task, for capability-aware schedulers."
    )
    required_memory_gb: float = Field(
        0.0, ge=0, le=1e6, description="Per task; smaller workers never get it."
    )


class TaskOut(BaseModel):
    task_id: str
    job_id: str
    shard_id: int
    num_shards: int


class AssignmentsOut(BaseModel):
    tasks: list[TaskOut]
    jobs: dict[str, dict[str, Any]]


class OkOut(BaseModel):
    ok: bool
    task_id: str
    state: str
