"""The controller's FastAPI application.

`create_app` wires the store, scheduler, membership sync and failure detector together
and returns an app whose every error is `{"detail": "<message>"}`: 400 for malformed
JSON, 401 for a missing token, 403 for a credential not valid for the route or worker, 404 for
unknown ids, 409 for conflicts, 413 for oversize bodies, 422 for invalid fields (the message names
the field path). Authentication and route permissions are `controller.auth`'s, checked before the
body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dist_llm_train.config import ControllerConfig, ModelConfig, NetworkConfig, TrainingConfig
from dist_llm_train.controller.auth import AuthMiddleware, ControllerAuth
from dist_llm_train.controller.errors import ControllerError
from dist_llm_train.controller.failure import FailureDetector
from dist_llm_train.controller.heartbeats import watch_loop
from dist_llm_train.controller.membership import MembershipNotifier, MembershipSync, PSMembershipNotifier
from dist_llm_train.controller.metrics import RequestMetricsMiddleware, make_registry
from dist_llm_train.controller.models import (
    ERROR_RESPONSES,
    ErrorOut,
    HealthOut,
    ReadyOut,
    StatusOut,
    StatusWorkersMode,
)
from dist_llm_train.controller.routes import router
from dist_llm_train.controller.schedulers import get_scheduler
from dist_llm_train.controller.service import ControllerService, PSEndpoint
from dist_llm_train.controller.status import render_status
from dist_llm_train.controller.store import Store

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything one app instance owns; `app.state.runtime` in handlers and tests."""

    service: ControllerService
    membership: MembershipSync
    detector: FailureDetector
    registry: CollectorRegistry
    auth: ControllerAuth

    @property
    def store(self) -> Store:
        return self.service.store

    def close(self) -> None:
        self.detector.stop()
        self.membership.notifier.close()
        if self.store.is_open:
            self.service.flush_heartbeats()  # a restart then sees the newest beats
        self.store.close()


# Documents the bearer scheme in the OpenAPI schema; `AuthMiddleware` has checked the token before any route runs.
_bearer = HTTPBearer(
    auto_error=False,
    description="A credential of this cluster (docs/security.md): admin, join (register only), or a worker's own.",
)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return 400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())) or '<root>'}: {e.get('msg')}" for e in errors]
    return 422, "; ".join(parts) or "invalid request"


JOB_CONFIG_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "network": NetworkConfig,
}


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document with `JobIn.config` described as what the server checks it against: the model,
    training and network sections of the run config (`dist_llm_train.config`), no other key. The request model
    keeps the field a plain mapping so the config's own validator names a bad field `config.<section>.<key>`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        sections: list[tuple[type[BaseModel], Literal["validation"]]] = [
            (model, "validation") for model in JOB_CONFIG_SECTIONS.values()
        ]
        refs, top = models_json_schema(sections, ref_template="#/components/schemas/{model}")
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in top.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        config = schemas["JobIn"]["properties"]["config"]
        config.pop("additionalProperties", None)
        config.update(
            type="object",
            additionalProperties=False,
            properties={name: refs[(model, "validation")] for name, model in JOB_CONFIG_SECTIONS.items()},
        )
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ControllerError)
    async def _domain(_: Request, exc: ControllerError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)


def create_app(
    cfg: ControllerConfig,
    ps_transport: str,
    ps_address: str,
    notifier: MembershipNotifier | None = None,
    *,
    clock: Callable[[], float] = time.time,
    run_background: bool = True,
    max_task_attempts: int = 5,
    max_body_bytes: int = 1 << 20,
) -> FastAPI:
    """Build the app; the store opens now (a bad path fails here), the failure detector on startup.

    `clock` and `run_background=False` let tests drive failure detection with
    `app.state.runtime.detector.tick()` instead of sleeping. Call
    `app.state.runtime.close()` when done with the app.
    """
    auth = ControllerAuth(cfg, ps_transport, clock)
    store = Store(cfg.state_db)
    service = ControllerService(
        store,
        get_scheduler(cfg.scheduler),
        cfg,
        PSEndpoint(ps_transport, ps_address),
        clock,
        max_task_attempts,
    )
    membership = MembershipSync(
        notifier or PSMembershipNotifier(ps_transport, ps_address, token=auth.controller_token(),
                                         curve_server_key=auth.curve_server_key),
        service.desired_members,
    )
    detector = FailureDetector(service, membership)
    service.on_change = detector.wake
    service.ps_version_past = membership.version_past
    registry, latency = make_registry(service, membership)
    runtime = Runtime(service, membership, detector, registry, auth)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Only the background loop follows the lifespan; the store belongs to whoever called
        # create_app (serve() closes it), so an app can be started and stopped more than once.
        task = detector.start() if run_background else None
        watch = (
            asyncio.create_task(watch_loop(service.load, lambda: service.heartbeat_interval_s, service.clock))
            if run_background
            else None
        )
        try:
            yield
        finally:
            if watch is not None:
                watch.cancel()
            detector.stop()
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=10)

    app = FastAPI(
        title="dist-llm-train controller",
        version="1",
        summary="Workers, jobs, tasks, scheduling and failure detection for dist-llm-train.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    guard = [Depends(_bearer)] if auth.enabled else []
    app.include_router(router, dependencies=guard)
    _install_error_handlers(app)
    _install_openapi(app)
    # The last added runs first: metrics (timing, the 413) wrap auth, which wraps the app.
    app.add_middleware(AuthMiddleware, auth=auth)
    app.add_middleware(RequestMetricsMiddleware, latency=latency, max_body_bytes=max_body_bytes)

    # The route renders its own JSON (controller/status.py says why); `response_model` documents it. A worker's
    # PS-only fields are absent, not null, until the PS has reported on it (see WorkerStatusOut).
    @app.get(
        "/status",
        dependencies=guard,
        tags=["status"],
        response_model=StatusOut,
        response_model_exclude_unset=True,
        responses={401: ERROR_RESPONSES[401], 422: ERROR_RESPONSES[422]},  # a bad `workers`, `limit` or `offset`
    )
    def status(
        workers: Annotated[
            StatusWorkersMode, Query(description="`summary`: counts only, no per-worker rows or links.")
        ] = "full",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description="At most this many workers.")] = None,
        offset: Annotated[int, Query(ge=0, le=2**62, description="Skip this many workers (by name).")] = 0,
    ) -> Response:
        """Jobs, workers, scheduler, PS endpoint and counters, as the controller sees them now.

        For a large fleet ask `?workers=summary`, or page through the workers with `limit` and `offset`
        (`worker_page.next_offset`)."""
        return Response(render_status(service, membership, workers, offset, limit), media_type="application/json")

    @app.get("/healthz", tags=["status"])
    def healthz() -> HealthOut:
        return HealthOut(ok=True)

    @app.get("/readyz", tags=["status"], responses={503: {"model": ErrorOut, "description": "store not usable"}})
    def readyz() -> ReadyOut:
        if store.ping():
            return ReadyOut(ready=True)
        raise ControllerError("state store is not open", status_code=503)

    @app.get("/metrics", tags=["status"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
