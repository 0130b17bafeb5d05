"""The /v1 REST API: thin handlers that validate, call the service and shape the reply.

Handlers are plain `def`s: FastAPI runs them on its thread pool, so SQLite writes (and
the occasional fsync) never stall the event loop that serves heartbeats.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from dist_llm_train.controller.auth import ControllerAuth, require_name, require_worker
from dist_llm_train.controller.models import (
    ERROR_RESPONSES,
    AssignedJobOut,
    AssignmentsOut,
    HeartbeatIn,
    HeartbeatOut,
    JobIn,
    JobListOut,
    JobOut,
    JobTelemetryOut,
    OkOut,
    PSEndpointOut,
    RegisterIn,
    RegisterOut,
    TaskDoneIn,
    TaskFailIn,
    TaskOut,
    TelemetryIn,
)
from dist_llm_train.controller.service import ControllerService

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


def _svc(request: Request) -> ControllerService:
    svc: ControllerService = request.app.state.runtime.service
    return svc


def _auth(request: Request) -> ControllerAuth:
    auth: ControllerAuth = request.app.state.runtime.auth
    return auth


@router.post("/workers/register", response_model=RegisterOut, tags=["workers"])
def register_worker(body: RegisterIn, request: Request) -> RegisterOut:
    """Idempotent by name: the same name gets the same id back and is alive again. With a cluster secret the
    reply carries the worker's own credential, valid for this worker_id only."""
    require_name(request, body.name)
    svc = _svc(request)
    w = svc.register(body)
    return RegisterOut(
        worker_id=w.worker_id,
        heartbeat_interval_s=svc.heartbeat_interval_s,
        heartbeat_miss_limit=svc.cfg.heartbeat_miss_limit,
        token=_auth(request).issue_worker_token(w.worker_id),
    )


@router.post("/workers/{worker_id}/heartbeat", response_model=HeartbeatOut, tags=["workers"])
async def heartbeat(
    worker_id: str, request: Request, body: Annotated[HeartbeatIn | None, Body()] = None
) -> HeartbeatOut:
    """The reply carries the interval to heartbeat at from now on.

    The one async handler: a worker known alive is recorded in memory on the event loop (no thread hop, no
    SQLite); any other goes through the store on the thread pool."""
    svc, state = _svc(request), body.state if body else None
    interval = svc.fast_heartbeat(worker_id, state)
    if interval is None:
        interval = await run_in_threadpool(svc.heartbeat, worker_id, state)
    return HeartbeatOut(ok=True, commands=[], heartbeat_interval_s=interval)


@router.post("/workers/{worker_id}/telemetry", status_code=204, tags=["workers"])
def telemetry(worker_id: str, body: TelemetryIn, request: Request) -> Response:
    _svc(request).record_telemetry(worker_id, body)
    return Response(status_code=204)


@router.get("/workers/{worker_id}/assignments", response_model=AssignmentsOut, tags=["workers"])
def assignments(worker_id: str, request: Request) -> AssignmentsOut:
    """Every task the worker holds, with each job's config and PS endpoint (runs a scheduling pass); with a
    cluster secret, each job's endpoint carries the worker's PS credential for that job."""
    svc, auth = _svc(request), _auth(request)
    held, jobs = svc.assignments(worker_id)

    def ps(job_id: str) -> PSEndpointOut:
        return PSEndpointOut(
            transport=svc.paramserver.transport,
            address=svc.paramserver.address,
            token=auth.issue_ps_token(worker_id, job_id),
            curve_server_key=auth.curve_server_key,
        )

    # The job's members travel with the assignment so the worker that creates the job on the PS can name them:
    # the very first sync round then waits for everyone, not only for whoever pushed first.
    members = svc.desired_members()
    return AssignmentsOut(
        tasks=[
            TaskOut(
                task_id=t.task_id, job_id=t.job_id, shard_id=t.shard_id, num_shards=j.num_tasks, attempt=t.attempts + 1
            )
            for t, j in held
        ],
        jobs={
            jid: AssignedJobOut(
                **j.config, name=j.name, job_id=jid, paramserver=ps(jid), members=members.get(jid, [])
            )
            for jid, j in jobs.items()
        },
    )


@router.post("/tasks/{task_id}/complete", response_model=OkOut, tags=["tasks"])
def complete_task(task_id: str, body: TaskDoneIn, request: Request) -> OkOut:
    require_worker(request, body.worker_id)
    task = _svc(request).complete_task(task_id, body.worker_id)
    return OkOut(ok=True, task_id=task.task_id, state=task.state)


@router.post("/tasks/{task_id}/fail", response_model=OkOut, tags=["tasks"])
def fail_task(task_id: str, body: TaskFailIn, request: Request) -> OkOut:
    """The task goes back to pending with its attempt counted, once per report (see `attempt`)."""
    require_worker(request, body.worker_id)
    task, replayed = _svc(request).fail_task(task_id, body.worker_id, body.reason, body.attempt)
    return OkOut(ok=True, task_id=task.task_id, state=task.state, replayed=replayed)


@router.post("/jobs", status_code=201, response_model=JobOut, tags=["jobs"])
def submit_job(body: JobIn, request: Request) -> JobOut:
    """One task per data shard; the config is validated like a run config (model, training, network)."""
    return JobOut.model_validate(_svc(request).submit_job(body))


@router.get("/jobs", response_model=JobListOut, tags=["jobs"])
def list_jobs(request: Request) -> JobListOut:
    return JobListOut.model_validate({"jobs": _svc(request).list_jobs()})


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
def get_job(job_id: str, request: Request) -> JobOut:
    return JobOut.model_validate(_svc(request).describe_job(job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
def cancel_job(job_id: str, request: Request) -> JobOut:
    """Idempotent; the job's open tasks are revoked."""
    return JobOut.model_validate(_svc(request).cancel_job(job_id))


@router.get("/jobs/{job_id}/telemetry", response_model=JobTelemetryOut, tags=["jobs"])
def job_telemetry(
    job_id: str,
    request: Request,
    after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> JobTelemetryOut:
    """Telemetry rows in arrival order; page with `after_id` = the last row's id."""
    rows = _svc(request).job_telemetry(job_id, after_id, limit)
    return JobTelemetryOut.model_validate(
        {"job_id": job_id, "rows": rows, "next_after_id": rows[-1]["id"] if rows else after_id}
    )
