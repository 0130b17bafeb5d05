"""Request and response bodies of the REST API (pydantic: validation and the OpenAPI schema).

Every request model forbids unknown keys and non-finite floats, takes JSON types strictly (`false` is
not a number), and bounds every number and string: bad input is refused with a 4xx that names the
field, never stored, and can never overflow SQLite's 64-bit integers. Free text (labels, job names,
failure reasons, anything inside a job's config) is NFC-normalised and may not hold lone UTF-16
surrogates (`"\ud800"` is valid JSON but not encodable as UTF-8: stored, it broke every later
response that showed it) or control characters.

Response models (`...Out`) are what the routes declare and what `controller.client` returns. They ignore
keys they do not know, so an older client keeps working against a newer controller. Where another module
owns a shape that changes on its own schedule (a job's config sections, a training strategy's view), the
field is a `dict[str, Any]` and that module documents it.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_INT = 2**62  # far below SQLite's INTEGER limit, far above any real step or byte count
Name = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$")


def text_problem(value: str, *, multiline: bool = False) -> str | None:
    """Why `value` may not be stored as text (None: it may): a lone surrogate or a control character.

    Tab and newline are allowed in multi-line text (a failure reason), nowhere else."""
    for ch in value:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            return f"holds a lone UTF-16 surrogate U+{code:04X} (not encodable as UTF-8)"
        if unicodedata.category(ch) == "Cc" and not (multiline and ch in "\t\n"):
            return f"holds the control character U+{code:04X}"
    return None


def _clean(value: str, multiline: bool = False) -> str:
    problem = text_problem(value, multiline=multiline)
    if problem is not None:
        raise ValueError(f"text {problem}")
    return unicodedata.normalize("NFC", value)


def clean_tree(value: Any, path: str = "") -> Any:
    """Every string (key or value) inside a JSON-like tree checked and NFC-normalised; ValueError naming the path."""
    if isinstance(value, str):
        try:
            return _clean(value)
        except ValueError as err:
            raise ValueError(f"{path or '<root>'}: {err}") from None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = clean_tree(k, f"{path}.<key>" if path else "<key>")
            out[key] = clean_tree(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(value, list):
        return [clean_tree(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


SafeText = Annotated[str, AfterValidator(_clean)]
"""One-line text safe to store and show: no lone surrogates, no control characters, NFC."""
SafeMultilineText = Annotated[str, AfterValidator(lambda v: _clean(v, multiline=True))]
"""As `SafeText`, tabs and newlines allowed."""


LabelKey = Annotated[SafeText, Field(min_length=1, max_length=64)]
LabelValue = Annotated[SafeText, Field(max_length=256)]


class _Body(BaseModel):
    # strict: JSON types as declared (a bool is not a number, a number not a string); ints still pass as floats.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ErrorOut(BaseModel):
    """Every 4xx (and the 503 of /readyz): one human-readable message."""

    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": why}
    for code, why in (
        (400, "Malformed JSON body"),
        (401, "Missing or invalid bearer token (when auth is configured)"),
        (403, "The credential is valid but not for this route or this worker"),
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
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)


class RegisterOut(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    heartbeat_miss_limit: int
    token: str | None = Field(
        None, description="This worker's own credential (when the controller has a cluster secret): send it as the "
        "bearer token from now on; it is valid for this worker_id only",
    )


WorkerActivity = Literal["idle", "training"]


class HeartbeatIn(_Body):
    state: WorkerActivity | None = None


class HeartbeatOut(BaseModel):
    ok: bool
    commands: list[str]
    heartbeat_interval_s: float | None = Field(
        None,
        description="The interval to heartbeat at from now on (it grows with the fleet: see "
        "controller.heartbeat_max_rate); absent from controllers that predate it.",
    )


class LinkReportIn(_Body):
    """One shaped link as the worker sees it: configured vs measured; None = not measured (yet)."""

    link: SafeText = Field(min_length=1, max_length=160)
    traffic_class: Literal["heartbeat", "task", "telemetry", "ps_sync"]
    backend: SafeText = Field(min_length=1, max_length=32)
    configured_rtt_ms: float = Field(ge=0, le=1e6)
    measured_rtt_ms: float | None = Field(None, ge=0, le=1e7)
    rtt_samples: int = Field(0, ge=0, le=MAX_INT)
    rtt_tolerance_ms: float | None = Field(None, ge=0, le=1e7, description="How far the RTT may be off.")
    within_tolerance: bool | None = Field(
        None, description="Measured RTT within rtt_tolerance_ms of the configured one; None before a measurement."
    )
    configured_rate_mbit: float | None = Field(None, ge=0, le=1e6)
    measured_rate_mbit: float | None = Field(None, ge=0, le=1e7)
    configured_loss: float = Field(ge=0, le=1)
    measured_loss: float | None = Field(None, ge=0, le=1)
    loss_kind: Literal["modelled", "measured"]


class TelemetryIn(_Body):
    job_id: SafeText = Field(min_length=1, max_length=128)
    step: int = Field(ge=0, le=MAX_INT, description="The worker's own step count; at most 100x the job's budget")
    ps_version: int = Field(ge=0, le=MAX_INT, description="The PS version trained on; at most the job's last")
    loss: float = Field(ge=-1e30, le=1e30)
    step_time_s: float = Field(ge=0, le=1e9)
    samples_per_s: float = Field(ge=0, le=1e15)
    tokens_per_s: float = Field(ge=0, le=1e15)
    bytes_sent: int = Field(ge=0, le=MAX_INT)
    bytes_received: int = Field(ge=0, le=MAX_INT)
    wall_time: float = Field(ge=0, le=1e11)
    # Optional extras the worker also reports; kept for the run report.
    compute_time_s: float | None = Field(None, ge=0, le=1e9)
    push_outcome: SafeText | None = Field(None, max_length=32)
    push_time_s: float | None = Field(None, ge=0, le=1e9)
    push_bytes: int | None = Field(None, ge=0, le=MAX_INT)
    # 64: one ps_sync path per parameter-server shard (PS_SHARDS is at most 64 in Compose and Swarm).
    links: list[LinkReportIn] | None = Field(None, max_length=64, description="Shaped links (netem), if any.")


class TaskDoneIn(_Body):
    worker_id: SafeText = Field(min_length=1, max_length=128)


class TaskFailIn(_Body):
    worker_id: SafeText = Field(min_length=1, max_length=128)
    reason: SafeMultilineText = Field(min_length=1, max_length=2000)
    attempt: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="The `attempt` of the assignment that failed (from GET assignments). A report is counted once: "
        "the same (task, worker, attempt) again, or without `attempt` the same reason from a worker that no longer "
        "holds the task, is answered with `replayed: true` and changes nothing.",
    )


class JobIn(_Body):
    name: SafeText = Field(min_length=1, max_length=200)
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

    @field_validator("config", mode="after")
    @classmethod
    def _config_text_is_clean(cls, value: dict[str, Any]) -> dict[str, Any]:
        cleaned: dict[str, Any] = clean_tree(value)
        return cleaned


class TaskOut(BaseModel):
    task_id: str
    job_id: str
    shard_id: int
    num_shards: int
    attempt: int = Field(1, description="Which attempt at the task this assignment is; send it with a failure report.")


class PSEndpointOut(BaseModel):
    transport: str
    address: str
    token: str | None = Field(
        None, description="The worker's credential for this job on the PS (when the cluster has a secret)"
    )
    curve_server_key: str | None = Field(None, description="The PS's Z85 CURVE public key (zmq with a secret)")


class AssignedJobOut(BaseModel):
    """A job as a worker receives it with its tasks: the config to train with, where the PS is, who else trains."""

    model: dict[str, Any] = Field(description="The job's model section (shape: dist_llm_train.config).")
    training: dict[str, Any] = Field(description="The job's training section (shape: dist_llm_train.config).")
    network: dict[str, Any] = Field(description="The job's network section (shape: dist_llm_train.config).")
    name: str
    job_id: str
    paramserver: PSEndpointOut
    members: list[str] = Field(description="Worker ids the PS should expect in the job's first round.")


class AssignmentsOut(BaseModel):
    tasks: list[TaskOut]
    jobs: dict[str, AssignedJobOut]


class OkOut(BaseModel):
    ok: bool
    task_id: str
    state: str
    replayed: bool = Field(False, description="True: this report was already counted; nothing changed.")


class HealthOut(BaseModel):
    ok: bool


class ReadyOut(BaseModel):
    ready: bool


# -- jobs --------------------------------------------------------------------------------------------------
class JobTaskOut(BaseModel):
    """One task (data shard) of a job and who holds it."""

    task_id: str
    shard_id: int
    state: str
    worker_id: str | None
    worker_name: str | None
    attempts: int
    last_error: str | None


class JobProgressOut(BaseModel):
    tasks_total: int
    tasks_pending: int
    tasks_assigned: int
    tasks_completed: int
    step: int = Field(description="The highest PS version any worker reported.")
    total_steps: int
    fraction: float
    loss: float | None = Field(description="Loss of the newest telemetry row; None before the first.")


class JobOut(BaseModel):
    """A job as POST /v1/jobs, GET /v1/jobs/{id} and cancel return it (built by controller.jobs.job_view)."""

    job_id: str
    name: str
    state: str
    priority: int
    num_tasks: int
    required_flops: float
    required_memory_gb: float
    created_at: float
    updated_at: float
    error: str | None
    config: dict[str, Any] = Field(
        description="The normalised model, training and network sections (shape: dist_llm_train.config)."
    )
    tasks: list[JobTaskOut]
    progress: JobProgressOut


class JobListOut(BaseModel):
    jobs: list[JobOut]


class TelemetryRowOut(BaseModel):
    """One stored telemetry row: a field per column of the `telemetry` table (controller/schema.py), plus the
    worker's name. A migration that adds a column adds a field here too."""

    id: int
    job_id: str
    worker_id: str
    step: int
    ps_version: int
    loss: float | None
    step_time_s: float | None
    compute_time_s: float | None
    samples_per_s: float | None
    tokens_per_s: float | None
    bytes_sent: int | None
    bytes_received: int | None
    wall_time: float | None
    push_outcome: str | None
    received_at: float
    worker_name: str | None = Field(description="None if the worker row is gone.")


class JobTelemetryOut(BaseModel):
    job_id: str
    rows: list[TelemetryRowOut]
    next_after_id: int = Field(description="Pass as `after_id` to get the next page.")


# -- /status -----------------------------------------------------------------------------------------------
class HeartbeatPolicyOut(BaseModel):
    interval_s: float
    miss_limit: int
    timeout_s: float = Field(description="Silence after which a worker is declared dead.")


class JobStatusOut(BaseModel):
    job_id: str
    name: str
    state: str
    priority: int
    step: int
    total_steps: int
    loss: float | None
    tokens_per_s: float = Field(description="Sum over the workers that hold the job's tasks now.")
    samples_per_s: float
    bytes_sent: float
    bytes_received: float
    max_worker_step: float = Field(description="The most steps any worker reported (bounds DP releases).")
    # mode .. aggregation: the strategy in one word each, for tables and dashboards; `strategy` has the full view.
    mode: str
    max_staleness: int | None
    codec: str
    aggregation: str
    strategy: dict[str, Any] = Field(
        description="The training strategy's own view: strategy, codec, rule, attack, ε spent "
        "(shape: the training-strategy code)."
    )
    aggregation_health: dict[str, Any] | None = Field(
        None,
        description="Rounds the PS closed with fewer updates than members, and those the rule's precondition "
        "failed for (aggregated by the fallback rule instead), with the last such version "
        "(`core.aggregation.aggregation_health`); null until the PS has reported.",
    )
    tasks: dict[str, int] = Field(description="Task count per state.")
    members: list[str] = Field(description="Worker ids the PS acknowledged as the job's members.")
    membership_synced: bool
    error: str | None


class DeclaredCapabilitiesOut(BaseModel):
    """What the worker declared when it registered."""

    memory_gb: float
    flops: float
    bandwidth_mbps: float
    compute_slowdown: float


class WorkerStatusOut(BaseModel):
    """One worker. `acceptance_rate`, `pushes` and `mean_staleness` are present only once the PS has reported on
    the worker (`staleness_source == "paramserver"`); until then the configured bound stands in."""

    worker_id: str
    name: str
    state: str
    activity: str
    last_heartbeat_age_s: float
    tasks: list[str]
    throughput_samples_per_s: float | None = Field(description="EWMA of reported samples/s; None before any.")
    staleness_bound: int | None
    acceptance_rate: float | None = None
    pushes: int | None = None
    mean_staleness: float | None = None
    staleness_source: Literal["paramserver", "config"] | None
    declared: DeclaredCapabilitiesOut
    labels: dict[str, str]


class CountersOut(BaseModel):
    reassignments: int
    worker_deaths: int
    heartbeats: int
    ps_notify_failures: int


class LinkStatusOut(LinkReportIn):
    """A shaped link as its worker last reported it, named by the worker. It extends the report model so a field
    added to the report shows up here too."""

    model_config = ConfigDict(extra="ignore")  # a response: a client must not refuse a field added later

    worker: str = Field(description="The reporting worker's name.")


class WorkerSummaryOut(BaseModel):
    """The whole fleet in a few numbers; with `?workers=summary` the only view of the workers."""

    total: int
    by_state: dict[str, int] = Field(description="Workers per state (alive, dead).")
    by_activity: dict[str, int] = Field(description="Alive workers per reported activity.")
    max_heartbeat_age_s: float | None = Field(description="The longest silence among alive workers; None if none.")


class WorkerPageOut(BaseModel):
    """Which workers `workers` lists: sorted by name, from `offset`, at most `limit` (None: all)."""

    offset: int
    limit: int | None
    total: int
    next_offset: int | None = Field(description="Pass as `offset` for the next page; None on the last one.")


StatusWorkersMode = Literal["full", "summary"]


class StatusOut(BaseModel):
    """GET /status: jobs, workers, scheduler, PS endpoint, counters and shaped links, as the controller sees them."""

    scheduler: str
    paramserver: PSEndpointOut
    heartbeat: HeartbeatPolicyOut
    jobs: list[JobStatusOut]
    workers: list[WorkerStatusOut]
    counters: CountersOut
    ps_notify_last_error: str | None
    links: list[LinkStatusOut] = Field(description="The links of the workers listed in `workers`.")
    worker_summary: WorkerSummaryOut | None = Field(
        None, description="Always sent by this controller; absent from controllers that predate it."
    )
    worker_page: WorkerPageOut | None = Field(
        None, description="Always sent by this controller; absent from controllers that predate it."
    )
    links_out_of_tolerance: list[str] = Field(
        default_factory=list,
        description="`worker/traffic_class` of every shaped link (of every worker, whatever the page) whose "
        "measured RTT is outside its tolerance: the host could not keep that link's timing. Listed once when "
        "several of a worker's links of one class are (its paths to several PS shards); `links` says which.",
    )
    generated_at: float | None = Field(
        None,
        description="When the controller built this document (Unix seconds, its clock); heartbeat ages are as of "
        "then. Always sent by this controller; absent from controllers that predate it.",
    )
