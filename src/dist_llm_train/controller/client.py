"""One typed client for the controller's HTTP API: `ControllerClient` (blocking) and `AsyncControllerClient`.

Both speak every route with the models of `controller.models`: request bodies go out as those models and
replies come back as them, never as dicts. Each route is described once (a `_Call`: method, path, body,
traffic class, how to read the reply) and each reply is read once (`_read_reply`); the two classes differ
only in how they send and wait.

What can go wrong, and what the caller sees:

- The controller did not answer (refused, unreachable, timed out): `ControllerUnavailable`, after the
  retries a `Retry` allows (none by default).
- The controller answered with an error: the `ControllerError` of that status (`controller.errors`, the
  classes the service itself raises), with `status_code` and `message`, the server's `detail`. 404 is
  `NotFound` (`UnknownWorker` on a worker's own routes), 409 `Conflict`, 422 `BadInput`.
- A request model that breaks the API's rules fails before anything is sent, with pydantic's
  `ValidationError`: the same models validate on both ends.

Traffic classes: every call is task, heartbeat or telemetry traffic (netem/profile/classes.py). The client keeps one
httpx client per class, opened on first use, so `class_urls` can send a class elsewhere (the shaper's per-class
relays) and `transport_for` can give each class a transport of its own (the worker marks each class's sockets
with its DSCP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from dist_llm_train.controller.errors import BadInput, Conflict, ControllerError, NotFound, Unauthorized, UnknownWorker
from dist_llm_train.controller.models import (
    AssignmentsOut,
    HealthOut,
    HeartbeatIn,
    HeartbeatOut,
    JobIn,
    JobListOut,
    JobOut,
    JobTelemetryOut,
    OkOut,
    ReadyOut,
    RegisterIn,
    RegisterOut,
    StatusOut,
    StatusWorkersMode,
    TaskDoneIn,
    TaskFailIn,
    TelemetryIn,
    WorkerActivity,
)

log = logging.getLogger(__name__)

ControllerTrafficClass = Literal["task", "heartbeat", "telemetry"]
"""The traffic classes (netem.profile.classes.TrafficClass) a call to the controller can belong to."""

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
HttpClient = TypeVar("HttpClient", httpx.Client, httpx.AsyncClient)


class ControllerUnavailable(Exception):
    """The controller did not answer (refused, unreachable, timed out), within the retry budget if retrying."""


@dataclass(frozen=True)
class Retry:
    """Retry calls the controller did not answer, with capped exponential backoff, so that a controller
    restart looks like a pause to the caller. A call it answered, even with an error, is never retried.

    A POST whose reply was lost may reach the controller twice; registration, heartbeats and task
    completion are idempotent, and so is `fail_task` given the assignment's `attempt` (a report counted once).
    """

    give_up_after_s: float = 120.0  # time spent waiting between attempts, not counting the attempts
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    abandon: Callable[[], bool] | None = None
    """Asked after each failure; True gives up at once (a caller shutting down must not wait out the budget)."""


class _Backoff:
    """The waits between the attempts of one call; raises `ControllerUnavailable` when it is time to stop."""

    def __init__(self, retry: Retry | None, url: str) -> None:
        self._retry = retry
        self._url = url
        self._delay = retry.first_backoff_s if retry is not None else 0.0
        self._waited = 0.0

    def next_wait(self, err: httpx.TransportError) -> float:
        retry = self._retry
        if retry is None:
            raise ControllerUnavailable(f"controller at {self._url} unreachable: {err}") from err
        if retry.abandon is not None and retry.abandon():
            raise ControllerUnavailable(f"stopping; controller unreachable: {err}") from err
        if self._waited >= retry.give_up_after_s:
            raise ControllerUnavailable(f"controller unreachable for {self._waited:.0f}s: {err}") from err
        log.info("controller unreachable (%s); retrying in %.1fs", type(err).__name__, self._delay)
        wait = self._delay
        self._waited += wait
        self._delay = min(self._delay * 2, retry.max_backoff_s)
        return wait


# -- the API, route by route --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request to one route, and how to read its reply."""

    method: Literal["GET", "POST"]
    path: str
    read: Callable[[httpx.Response], T]
    body: BaseModel | None = None
    params: Mapping[str, int | str] | None = None
    traffic_class: ControllerTrafficClass = "task"
    names_worker: bool = False  # the path names the calling worker: a 404 means the controller does not know it
    joins: bool = False  # registration: sent with the join credential, not the worker's own

    def json_body(self) -> Any:
        # Only the fields the caller set: the controller fills in its own defaults, as for any other client.
        return None if self.body is None else self.body.model_dump(mode="json", exclude_unset=True)


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _no_content(_: httpx.Response) -> None:
    return None


def _text(response: httpx.Response) -> str:
    return response.text


def _segment(value: str) -> str:
    """An id as one path segment, whatever characters it holds."""
    return quote(value, safe="")


def _worker_call(method: Literal["GET", "POST"], worker_id: str, action: str, read: Callable[[httpx.Response], T],
                 body: BaseModel | None = None, traffic_class: ControllerTrafficClass = "task") -> _Call[T]:
    path = f"/v1/workers/{_segment(worker_id)}/{action}"
    return _Call(method, path, read, body=body, traffic_class=traffic_class, names_worker=True)


def _register(worker: RegisterIn) -> _Call[RegisterOut]:
    return _Call("POST", "/v1/workers/register", _model(RegisterOut), body=worker, joins=True)


def _heartbeat(worker_id: str, state: WorkerActivity | None) -> _Call[HeartbeatOut]:
    return _worker_call("POST", worker_id, "heartbeat", _model(HeartbeatOut), HeartbeatIn(state=state), "heartbeat")


def _assignments(worker_id: str) -> _Call[AssignmentsOut]:
    return _worker_call("GET", worker_id, "assignments", _model(AssignmentsOut))


def _telemetry(worker_id: str, record: TelemetryIn) -> _Call[None]:
    return _worker_call("POST", worker_id, "telemetry", _no_content, record, "telemetry")


def _complete_task(task_id: str, worker_id: str) -> _Call[OkOut]:
    return _Call("POST", f"/v1/tasks/{_segment(task_id)}/complete", _model(OkOut), body=TaskDoneIn(worker_id=worker_id))


def _fail_task(task_id: str, worker_id: str, reason: str, attempt: int | None) -> _Call[OkOut]:
    body = TaskFailIn(worker_id=worker_id, reason=reason, attempt=attempt)
    return _Call("POST", f"/v1/tasks/{_segment(task_id)}/fail", _model(OkOut), body=body)


def _submit_job(job: JobIn) -> _Call[JobOut]:
    return _Call("POST", "/v1/jobs", _model(JobOut), body=job)


def _list_jobs() -> _Call[JobListOut]:
    return _Call("GET", "/v1/jobs", _model(JobListOut))


def _get_job(job_id: str) -> _Call[JobOut]:
    return _Call("GET", f"/v1/jobs/{_segment(job_id)}", _model(JobOut))


def _cancel_job(job_id: str) -> _Call[JobOut]:
    return _Call("POST", f"/v1/jobs/{_segment(job_id)}/cancel", _model(JobOut))


def _job_telemetry(job_id: str, after_id: int, limit: int | None) -> _Call[JobTelemetryOut]:
    params = {"after_id": after_id} | ({} if limit is None else {"limit": limit})
    return _Call("GET", f"/v1/jobs/{_segment(job_id)}/telemetry", _model(JobTelemetryOut), params=params)


def _status(workers: StatusWorkersMode, offset: int, limit: int | None) -> _Call[StatusOut]:
    params: dict[str, int | str] = {"workers": workers} if workers != "full" else {}
    params |= ({"offset": offset} if offset else {}) | ({} if limit is None else {"limit": limit})
    return _Call("GET", "/status", _model(StatusOut), params=params or None)


def _healthz() -> _Call[HealthOut]:
    return _Call("GET", "/healthz", _model(HealthOut))


def _readyz() -> _Call[ReadyOut]:
    return _Call("GET", "/readyz", _model(ReadyOut))


def _metrics() -> _Call[str]:
    return _Call("GET", "/metrics", _text)


# -- replies ------------------------------------------------------------------------------------------------
_ERROR_BY_STATUS: dict[int, type[ControllerError]] = {
    401: Unauthorized, 404: NotFound, 409: Conflict, 422: BadInput
}


def _detail(response: httpx.Response) -> str:
    """The controller's `{"detail": message}`; the raw text when the reply is not one (a proxy's error page)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return detail if isinstance(detail, str) else (response.text or response.reason_phrase)


def _read_reply(call: _Call[T], response: httpx.Response) -> T:
    if not response.is_error:
        return call.read(response)
    message, status = _detail(response), response.status_code
    if status == 404 and call.names_worker:
        raise UnknownWorker(message)
    error = _ERROR_BY_STATUS.get(status)
    raise error(message) if error is not None else ControllerError(message, status_code=status)


class _BaseControllerClient(Generic[HttpClient], ABC):
    """What both clients share: where each traffic class goes, the tokens, and the per-class httpx clients.

    `token` is sent with every call; it is also the join credential registration is sent with. After
    registering, a worker switches to the credential the controller issued it with `use_token`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        timeout_s: float,
        retry: Retry | None,
        class_urls: Mapping[ControllerTrafficClass, str] | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._join_headers = dict(self._headers)
        self._timeout_s = timeout_s
        self._retry = retry
        self._class_urls = {cls: url.rstrip("/") for cls, url in (class_urls or {}).items()}
        self._clients: dict[ControllerTrafficClass, HttpClient] = {}

    def _url_for(self, traffic_class: ControllerTrafficClass) -> str:
        return self._class_urls.get(traffic_class, self.base_url)

    def use_token(self, token: str) -> None:
        """Send `token` with every call from now on (registration keeps the join credential given at start)."""
        self._headers["Authorization"] = f"Bearer {token}"
        for http in self._clients.values():
            http.headers["Authorization"] = f"Bearer {token}"

    def _headers_for(self, call: _Call[Any]) -> dict[str, str] | None:
        return self._join_headers if call.joins else None

    @abstractmethod
    def _open(self, traffic_class: ControllerTrafficClass) -> HttpClient:
        """A new httpx client for `traffic_class` (sync or async: the subclass decides)."""

    def _http(self, traffic_class: ControllerTrafficClass) -> HttpClient:
        """The httpx client (one connection pool) that carries `traffic_class`."""
        http = self._clients.get(traffic_class)
        if http is None:
            http = self._clients[traffic_class] = self._open(traffic_class)
        return http


class ControllerClient(_BaseControllerClient[httpx.Client]):
    """The controller's API, blocking. Use it as a context manager, or call `close()`.

    `token`: the controller's shared bearer token, if it has one. `retry`: retry calls the controller did not
    answer (default: fail at once). `class_urls`: another base URL for heartbeat or telemetry traffic.
    `transport_for`: the httpx transport for each traffic class (default: httpx's own).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        retry: Retry | None = None,
        class_urls: Mapping[ControllerTrafficClass, str] | None = None,
        transport_for: Callable[[ControllerTrafficClass], httpx.BaseTransport] | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout_s=timeout_s, retry=retry, class_urls=class_urls)
        self._transport_for = transport_for

    def _open(self, traffic_class: ControllerTrafficClass) -> httpx.Client:
        transport = self._transport_for(traffic_class) if self._transport_for is not None else None
        return httpx.Client(
            base_url=self._url_for(traffic_class),
            headers=dict(self._headers),
            timeout=self._timeout_s,
            transport=transport,
        )

    def _send(self, call: _Call[T]) -> T:
        backoff = _Backoff(self._retry, self._url_for(call.traffic_class))
        while True:
            try:
                response = self._http(call.traffic_class).request(
                    call.method, call.path, json=call.json_body(), params=call.params, headers=self._headers_for(call)
                )
            except httpx.TransportError as err:
                time.sleep(backoff.next_wait(err))
                continue
            return _read_reply(call, response)

    def close(self) -> None:
        for http in self._clients.values():
            http.close()
        self._clients.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------------------
    def register(self, worker: RegisterIn) -> RegisterOut:
        """Idempotent by name: the same name gets the same worker id back, and is alive again."""
        return self._send(_register(worker))

    def heartbeat(self, worker_id: str, state: WorkerActivity | None = None) -> HeartbeatOut:
        """Heartbeat traffic. `UnknownWorker`: register again."""
        return self._send(_heartbeat(worker_id, state))

    def assignments(self, worker_id: str) -> AssignmentsOut:
        """Every task the worker holds, with its jobs' configs (the controller runs a scheduling pass first)."""
        return self._send(_assignments(worker_id))

    def telemetry(self, worker_id: str, record: TelemetryIn) -> None:
        """Telemetry traffic. A 404 is `UnknownWorker` whether the worker or the record's job is unknown."""
        self._send(_telemetry(worker_id, record))

    # -- tasks --------------------------------------------------------------------------------------------
    def complete_task(self, task_id: str, *, worker_id: str) -> OkOut:
        """Idempotent for the worker that holds the task; `Conflict` for any other."""
        return self._send(_complete_task(task_id, worker_id))

    def fail_task(self, task_id: str, *, worker_id: str, reason: str, attempt: int | None = None) -> OkOut:
        """Give the task back (pending again, attempt counted once: pass the assignment's `attempt`)."""
        return self._send(_fail_task(task_id, worker_id, reason, attempt))

    # -- jobs ---------------------------------------------------------------------------------------------
    def submit_job(self, job: JobIn) -> JobOut:
        """`BadInput` names the config field the controller refused (e.g. `config.training.steps`)."""
        return self._send(_submit_job(job))

    def list_jobs(self) -> JobListOut:
        return self._send(_list_jobs())

    def get_job(self, job_id: str) -> JobOut:
        return self._send(_get_job(job_id))

    def cancel_job(self, job_id: str) -> JobOut:
        """Idempotent; `Conflict` if the job already completed or failed."""
        return self._send(_cancel_job(job_id))

    def job_telemetry(self, job_id: str, *, after_id: int = 0, limit: int | None = None) -> JobTelemetryOut:
        """Rows in arrival order; page on with `after_id=page.next_after_id` (`limit` None: the server's)."""
        return self._send(_job_telemetry(job_id, after_id, limit))

    # -- the controller itself --------------------------------------------------------------------------------
    def status(self, *, workers: StatusWorkersMode = "full", offset: int = 0, limit: int | None = None) -> StatusOut:
        """`workers="summary"`: counts only (`worker_summary`); `offset`/`limit`: one page of workers by name,
        the next from `worker_page.next_offset`."""
        return self._send(_status(workers, offset, limit))

    def healthz(self) -> HealthOut:
        return self._send(_healthz())

    def readyz(self) -> ReadyOut:
        """`ControllerError` with status 503 while the state store is not usable."""
        return self._send(_readyz())

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        return self._send(_metrics())


class AsyncControllerClient(_BaseControllerClient[httpx.AsyncClient]):
    """The controller's API for asyncio: the same methods as `ControllerClient`, awaited. Use it as an async
    context manager, or call `aclose()`. `transport_for` makes async transports."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        retry: Retry | None = None,
        class_urls: Mapping[ControllerTrafficClass, str] | None = None,
        transport_for: Callable[[ControllerTrafficClass], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        super().__init__(base_url, token=token, timeout_s=timeout_s, retry=retry, class_urls=class_urls)
        self._transport_for = transport_for

    def _open(self, traffic_class: ControllerTrafficClass) -> httpx.AsyncClient:
        transport = self._transport_for(traffic_class) if self._transport_for is not None else None
        return httpx.AsyncClient(
            base_url=self._url_for(traffic_class),
            headers=dict(self._headers),
            timeout=self._timeout_s,
            transport=transport,
        )

    async def _send(self, call: _Call[T]) -> T:
        backoff = _Backoff(self._retry, self._url_for(call.traffic_class))
        while True:
            try:
                response = await self._http(call.traffic_class).request(
                    call.method, call.path, json=call.json_body(), params=call.params, headers=self._headers_for(call)
                )
            except httpx.TransportError as err:
                await asyncio.sleep(backoff.next_wait(err))
                continue
            return _read_reply(call, response)

    async def aclose(self) -> None:
        for http in self._clients.values():
            await http.aclose()
        self._clients.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- workers ------------------------------------------------------------------------------------------
    async def register(self, worker: RegisterIn) -> RegisterOut:
        return await self._send(_register(worker))

    async def heartbeat(self, worker_id: str, state: WorkerActivity | None = None) -> HeartbeatOut:
        return await self._send(_heartbeat(worker_id, state))

    async def assignments(self, worker_id: str) -> AssignmentsOut:
        return await self._send(_assignments(worker_id))

    async def telemetry(self, worker_id: str, record: TelemetryIn) -> None:
        await self._send(_telemetry(worker_id, record))

    # -- tasks --------------------------------------------------------------------------------------------
    async def complete_task(self, task_id: str, *, worker_id: str) -> OkOut:
        return await self._send(_complete_task(task_id, worker_id))

    async def fail_task(self, task_id: str, *, worker_id: str, reason: str, attempt: int | None = None) -> OkOut:
        return await self._send(_fail_task(task_id, worker_id, reason, attempt))

    # -- jobs ---------------------------------------------------------------------------------------------
    async def submit_job(self, job: JobIn) -> JobOut:
        return await self._send(_submit_job(job))

    async def list_jobs(self) -> JobListOut:
        return await self._send(_list_jobs())

    async def get_job(self, job_id: str) -> JobOut:
        return await self._send(_get_job(job_id))

    async def cancel_job(self, job_id: str) -> JobOut:
        return await self._send(_cancel_job(job_id))

    async def job_telemetry(self, job_id: str, *, after_id: int = 0, limit: int | None = None) -> JobTelemetryOut:
        return await self._send(_job_telemetry(job_id, after_id, limit))

    # -- the controller itself --------------------------------------------------------------------------------
    async def status(
        self, *, workers: StatusWorkersMode = "full", offset: int = 0, limit: int | None = None
    ) -> StatusOut:
        return await self._send(_status(workers, offset, limit))

    async def healthz(self) -> HealthOut:
        return await self._send(_healthz())

    async def readyz(self) -> ReadyOut:
        return await self._send(_readyz())

    async def metrics(self) -> str:
        return await self._send(_metrics())
