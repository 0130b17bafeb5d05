"""GET /status: one document with the truth about jobs, workers, scheduler and PS link (`models.StatusOut`).

A large fleet asks for `workers="summary"` (counts only: no per-worker rows or links) or a page of workers
(`offset`, `limit`, sorted by name); the fleet summary and the page's place are in every answer.

The per-worker rows and links are built as plain dicts and the document is rendered to JSON bytes by
pydantic-core's serializer (`render_status`): validating 1,000 `WorkerStatusOut` models and serialising them
through FastAPI's response model cost ~20 ms of CPU per full document at 1,000 workers, held under the GIL while
heartbeats wait. `StatusOut` stays the documented schema; `build_status` validates the same document against it
(tests check that every rendered document does)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pydantic_core import to_json

from dist_llm_train.controller.jobs import training_of
from dist_llm_train.controller.membership import MembershipSync
from dist_llm_train.controller.models import (
    CountersOut,
    HeartbeatPolicyOut,
    JobStatusOut,
    PSEndpointOut,
    StatusOut,
    StatusWorkersMode,
    WorkerPageOut,
    WorkerSummaryOut,
)
from dist_llm_train.controller.service import ControllerService
from dist_llm_train.core.aggregation import aggregation_health


def _job_rates(svc: ControllerService, job_id: str, holders: set[str]) -> dict[str, float]:
    """Sums of each worker's latest report; throughput only counts workers still on the job."""
    latest = svc.store.latest_telemetry(job_id)
    current = [r for r in latest if r["worker_id"] in holders]
    return {
        "tokens_per_s": float(sum(r["tokens_per_s"] or 0.0 for r in current)),
        "samples_per_s": float(sum(r["samples_per_s"] or 0.0 for r in current)),
        "bytes_sent": float(sum(r["bytes_sent"] or 0 for r in latest)),
        "bytes_received": float(sum(r["bytes_received"] or 0 for r in latest)),
        "max_worker_step": float(max((r["step"] or 0 for r in latest), default=0)),  # bounds DP releases
    }


def _ps_view(
    membership: MembershipSync, job_ids: set[str], worker_id: str, configured_bounds: dict[str, int]
) -> dict[str, Any]:
    """The worker's staleness bound and acceptance rate as the PS reports them (adaptive bounds differ per worker);
    the configured bound stands in until the PS has answered, and `staleness_source` says which it is.

    The keys differ between the two cases; `WorkerStatusOut` leaves the PS-only ones unset, not None."""
    for job_id in sorted(job_ids):
        ws = membership.worker_stats(job_id, worker_id)
        if ws is not None:
            return {
                "staleness_bound": ws.staleness_bound,
                "acceptance_rate": ws.acceptance_rate,
                "pushes": ws.pushes,
                "mean_staleness": ws.mean_staleness,
                "staleness_source": "paramserver",
            }
    configured = min((configured_bounds[j] for j in job_ids), default=None)
    return {"staleness_bound": configured, "staleness_source": "config" if configured is not None else None}


def _aggregation_health(membership: MembershipSync, job_id: str) -> dict[str, Any] | None:
    """Short rounds and rule fallbacks as the PS last reported them (None until it has answered)."""
    counters = membership.job_counters(job_id)
    return None if counters is None else aggregation_health(counters)


def _worker_rows(
    rows: list[tuple[Any, ...]],
    now: float,
    membership: MembershipSync,
    tasks_by_worker: dict[str, list[str]],
    jobs_by_worker: dict[str, set[str]],
    configured_bounds: dict[str, int],
) -> list[dict[str, Any]]:
    """`WorkerStatusOut` rows as dicts (its field order; the PS-only keys only once the PS has reported), from
    `Store.worker_status_rows`."""
    idle_view = _ps_view(membership, set(), "", configured_bounds)  # a worker without tasks: the same for all
    return [
        {
            "worker_id": worker_id,
            "name": name,
            "state": state,
            "activity": activity,
            "last_heartbeat_age_s": max(0.0, now - last_heartbeat),
            "tasks": tasks_by_worker.get(worker_id, []),
            "throughput_samples_per_s": throughput,
            **(
                _ps_view(membership, jobs_by_worker[worker_id], worker_id, configured_bounds)
                if worker_id in jobs_by_worker
                else idle_view
            ),
            "declared": {
                "memory_gb": memory_gb,
                "flops": flops,
                "bandwidth_mbps": bandwidth_mbps,
                "compute_slowdown": compute_slowdown,
            },
            "labels": labels,
        }
        for (worker_id, name, state, activity, last_heartbeat, throughput, memory_gb, flops, bandwidth_mbps,
             compute_slowdown, labels) in rows
    ]


def status_document(
    svc: ControllerService,
    membership: MembershipSync,
    workers_mode: StatusWorkersMode = "full",
    offset: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """The /status document as plain data, shaped like `StatusOut` dumped with `exclude_unset`."""
    svc.flush_heartbeats()  # the store then holds every heartbeat received so far
    now = svc.clock()
    store = svc.store
    with store.tx():
        by_state, by_activity, oldest = store.fleet_summary()
        workers = [] if workers_mode == "summary" else store.worker_status_rows(offset, limit)
        jobs = store.list_jobs()
        assigned = store.assigned_tasks()
        counters = store.counters()
        progress = {j.job_id: store.job_progress(j.job_id) for j in jobs}
        task_counts = {j.job_id: store.task_state_counts(j.job_id) for j in jobs}
        rates: dict[str, dict[str, float]] = {}
        holders_by_job: dict[str, set[str]] = defaultdict(set)
        for t in assigned:
            holders_by_job[t.job_id].add(t.worker_id or "")
        for j in jobs:
            rates[j.job_id] = _job_rates(svc, j.job_id, holders_by_job[j.job_id])
    trainings = {j.job_id: training_of(j) for j in jobs}
    # Once per job, not per worker: each reading builds the job's strategy object.
    configured_bounds = {job_id: t.initial_staleness_bound for job_id, t in trainings.items()}
    # Telemetry is checked against the job's last PS version now; rows stored before may hold anything.
    progress = {jid: (min(step, trainings[jid].versions), loss) for jid, (step, loss) in progress.items()}
    tasks_by_worker: dict[str, list[str]] = defaultdict(list)
    jobs_by_worker: dict[str, set[str]] = defaultdict(set)
    for t in assigned:
        tasks_by_worker[t.worker_id or ""].append(t.task_id)
        jobs_by_worker[t.worker_id or ""].add(t.job_id)
    acked = membership.acknowledged()
    pending = membership.pending()
    total = sum(by_state.values())
    listed = 0 if workers_mode == "summary" else len(workers)
    small = {  # a few small models, validated as usual
        "worker_summary": WorkerSummaryOut(
            total=total,
            by_state=by_state,
            by_activity=by_activity,
            max_heartbeat_age_s=None if oldest is None else max(0.0, now - oldest),
        ),
        "worker_page": WorkerPageOut(
            offset=offset,
            limit=0 if workers_mode == "summary" else limit,
            total=total,
            next_offset=offset + listed if listed and offset + listed < total else None,
        ),
        "paramserver": PSEndpointOut(transport=svc.paramserver.transport, address=svc.paramserver.address),
        "heartbeat": HeartbeatPolicyOut(
            interval_s=svc.heartbeat_interval_s,
            miss_limit=svc.cfg.heartbeat_miss_limit,
            timeout_s=svc.heartbeat_timeout_s,
        ),
        "counters": CountersOut(
            reassignments=counters.get("reassignments", 0),
            worker_deaths=counters.get("worker_deaths", 0),
            heartbeats=svc.heartbeats,
            ps_notify_failures=membership.failures,
        ),
    }
    jobs_out = [
        JobStatusOut(
            job_id=j.job_id,
            name=j.name,
            state=j.state,
            priority=j.priority,
            step=progress[j.job_id][0],
            total_steps=trainings[j.job_id].steps,
            loss=progress[j.job_id][1],
            **rates[j.job_id],
            mode=trainings[j.job_id].strategy.name,
            max_staleness=trainings[j.job_id].initial_staleness_bound,
            codec=trainings[j.job_id].codec.name,
            aggregation=trainings[j.job_id].aggregation.rule,
            # strategy, codec, rule, attack and the privacy spent so far
            strategy=trainings[j.job_id].describe(int(max(progress[j.job_id][0], rates[j.job_id]["max_worker_step"]))),
            aggregation_health=_aggregation_health(membership, j.job_id),
            tasks=task_counts[j.job_id],
            members=acked.get(j.job_id, []),
            membership_synced=j.job_id not in pending,
            error=j.error,
        ).model_dump(mode="json", exclude_unset=True)
        for j in jobs
    ]
    dumped = {key: model.model_dump(mode="json", exclude_unset=True) for key, model in small.items()}
    return {
        "scheduler": svc.scheduler.name,
        "paramserver": dumped["paramserver"],
        "heartbeat": dumped["heartbeat"],
        "jobs": jobs_out,
        "workers": _worker_rows(workers, now, membership, tasks_by_worker, jobs_by_worker, configured_bounds),
        "counters": dumped["counters"],
        "ps_notify_last_error": membership.last_error,
        # netem: per shaped link, backend and configured vs measured, from each worker's telemetry.
        "links": [{**link, "worker": w[1]} for w in workers for link in svc.links.get(w[0], [])],
        "worker_summary": dumped["worker_summary"],
        "worker_page": dumped["worker_page"],
        "links_out_of_tolerance": svc.links_out_of_tolerance(),
        "generated_at": now,
    }


def render_status(
    svc: ControllerService,
    membership: MembershipSync,
    workers_mode: StatusWorkersMode = "full",
    offset: int = 0,
    limit: int | None = None,
) -> bytes:
    """The /status document as JSON bytes (what the route sends)."""
    return to_json(status_document(svc, membership, workers_mode, offset, limit))


def build_status(
    svc: ControllerService,
    membership: MembershipSync,
    workers_mode: StatusWorkersMode = "full",
    offset: int = 0,
    limit: int | None = None,
) -> StatusOut:
    """The same document as a validated `StatusOut` (for in-process callers and tests; slower)."""
    return StatusOut.model_validate(status_document(svc, membership, workers_mode, offset, limit))
