"""The worker's view of the controller's REST API (httpx, async).

Every call retries with capped exponential backoff while the controller is away, so a
controller restart looks like a pause to the worker, not a crash.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import httpx

from dist_llm_train.netem.classes import TrafficClass, tos_byte

log = logging.getLogger(__name__)


class ControllerGone(Exception):
    """The controller did not answer within the retry budget."""


class UnknownWorker(Exception):
    """The controller does not know this worker id (e.g. its state was reset): re-register."""


@dataclass
class Assignment:
    task_id: str
    job_id: str
    shard_id: int
    num_shards: int


@dataclass
class AssignmentSet:
    tasks: list[Assignment] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)


class ControllerAPI:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        max_backoff_s: float = 5.0,
        give_up_after_s: float = 120.0,
        stop: threading.Event | None = None,
        heartbeat_url: str | None = None,
        telemetry_url: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # --- netem: one client per traffic class (issue 4) ---------------------------------------------------
        # `base_url` carries the task class (register, assignments, complete, fail); heartbeats and telemetry
        # may go to other URLs (the shaper's per-class relays). Each client marks its sockets with the class's
        # DSCP so kernel shapers can tell the classes apart on the wire.
        def client(url: str, cls: TrafficClass) -> httpx.AsyncClient:
            opts = [(socket.IPPROTO_IP, socket.IP_TOS, tos_byte(cls))]
            return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=10.0,
                                     transport=httpx.AsyncHTTPTransport(socket_options=opts))

        self._http = client(base_url, "task")
        self._clients: dict[str, httpx.AsyncClient] = {
            "task": self._http,
            "heartbeat": client(heartbeat_url or base_url, "heartbeat"),
            "telemetry": client(telemetry_url or base_url, "telemetry"),
        }
        self._seen_streams: weakref.WeakSet[Any] = weakref.WeakSet()  # connections a probe has used
        # --- end netem ---------------------------------------------------------------------------------------
        self._max_backoff_s = max_backoff_s
        self._give_up_after_s = give_up_after_s
        # A stopping worker must not sit in a 2-minute retry loop waiting for a controller that is gone.
        self._stop = stop

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()

    async def ping(self, traffic_class: str) -> float | None:
        """Seconds for one GET /healthz over `traffic_class`'s client (the worker's link-RTT probe), or None
        when it had to open a connection: that sample would include the TCP handshake, not just the link."""
        t0 = time.perf_counter()
        resp = await self._clients[traffic_class].get("/healthz")
        elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        stream = resp.extensions.get("network_stream")
        try:
            fresh = stream not in self._seen_streams
            self._seen_streams.add(stream)
        except TypeError:  # not weak-referenceable: cannot tell, so do not trust the sample
            return None
        return None if fresh else elapsed

    async def _call(self, method: str, path: str, json: Any = None, cls: str = "task") -> httpx.Response:
        delay, waited = 0.1, 0.0
        while True:
            try:
                resp = await self._clients[cls].request(method, path, json=json)
            except httpx.TransportError as err:
                if self._stop is not None and self._stop.is_set():
                    raise ControllerGone(f"stopping; controller unreachable: {err}") from err
                if waited >= self._give_up_after_s:
                    raise ControllerGone(f"controller unreachable for {waited:.0f}s: {err}") from err
                log.info("controller unreachable (%s); retrying in %.1fs", type(err).__name__, delay)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, self._max_backoff_s)
                continue
            if resp.status_code == 404 and path.startswith("/v1/workers/"):
                raise UnknownWorker(resp.text)
            if resp.status_code >= 400:
                raise RuntimeError(f"{method} {path} -> {resp.status_code}: {resp.text}")
            return resp

    async def register(self, name: str, capabilities: dict[str, Any]) -> dict[str, Any]:
        resp = await self._call("POST", "/v1/workers/register", {"name": name, **capabilities})
        result: dict[str, Any] = resp.json()
        return result

    async def heartbeat(self, worker_id: str, state: str) -> dict[str, Any]:
        resp = await self._call("POST", f"/v1/workers/{worker_id}/heartbeat", {"state": state}, cls="heartbeat")
        result: dict[str, Any] = resp.json()
        return result

    async def assignments(self, worker_id: str) -> AssignmentSet:
        data = (await self._call("GET", f"/v1/workers/{worker_id}/assignments")).json()
        tasks = [
            Assignment(t["task_id"], t["job_id"], int(t["shard_id"]), int(t["num_shards"])) for t in data["tasks"]
        ]
        return AssignmentSet(tasks=tasks, jobs=data.get("jobs", {}))

    async def telemetry(self, worker_id: str, record: dict[str, Any]) -> None:
        await self._call("POST", f"/v1/workers/{worker_id}/telemetry", record, cls="telemetry")

    async def complete_task(self, worker_id: str, task_id: str) -> None:
        await self._call("POST", f"/v1/tasks/{task_id}/complete", {"worker_id": worker_id})

    async def fail_task(self, worker_id: str, task_id: str, reason: str) -> None:
        await self._call("POST", f"/v1/tasks/{task_id}/fail", {"worker_id": worker_id, "reason": reason})
