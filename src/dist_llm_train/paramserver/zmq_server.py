"""ZMQ (ROUTER) + msgpack transport of the parameter server: same store, same semantics as gRPC.

Wire format, one request per multipart message (the client is a DEALER):
    [b"", msgpack({"op": ..., "id": n, ...arguments}), *data]
and the reply
    [b"", msgpack({"id": n, ...result}), *data]
or  [b"", msgpack({"id": n, "error": code, "message": m})]
`data` is at most one frame: the float32 parameters (init_job request, pull reply) or the
encoded update (push request). ZMQ moves large frames natively, so nothing is chunked, and
frames are received and sent without copies (`copy=False`, numpy buffers).

Ops: init_job {spec, layout, num_params, members}; pull {job_id, worker_id, min_version,
wait_timeout_s}; push {header}; set_members {job_id, members}; stats {job_id}.
Each request runs as its own task, so a pull waiting for a version never blocks others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from dist_llm_train.paramserver import wire
from dist_llm_train.paramserver.metrics import PSMetrics
from dist_llm_train.paramserver.state import ParameterStore, run_store_call
from dist_llm_train.paramserver.types import ErrorCode, PSError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 512  # requests being handled at once; beyond this the server stops reading (backpressure)
Reply = tuple[dict[str, Any], list[Any]]


def _arg(req: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    value = req.get(key, default)
    if value is ...:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"request is missing {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PSError(
            ErrorCode.INVALID_ARGUMENT, f"{key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _str_list(req: dict[str, Any], key: str) -> list[str]:
    items = _arg(req, key, list, [])
    if not all(isinstance(m, str) for m in items):
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{key!r} must be a list of strings")
    return list(items)


class ZmqServer:
    def __init__(
        self, store: ParameterStore, metrics: PSMetrics, host: str, port: int, max_message_bytes: int
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._endpoint_host, self._port = host, port
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # Hard cap against memory abuse: a frame beyond twice the payload limit drops the peer;
        # anything between the limit and the cap gets a RESOURCE_EXHAUSTED reply.
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + (1 << 16))
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._loop_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        if self._port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{self._endpoint_host}")
        else:
            self._sock.bind(f"tcp://{self._endpoint_host}:{self._port}")
            self.port = self._port
        self._loop_task = asyncio.create_task(self._serve(), name="zmq-ps-recv")
        return self.port

    async def _serve(self) -> None:
        while True:
            await self._slots.acquire()
            frames = await self._sock.recv_multipart(copy=False)
            task = asyncio.create_task(self._handle(frames))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("zmq request handler crashed", exc_info=task.exception())

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        req_id: Any = None
        started = time.perf_counter()
        op = ""
        try:
            if len(frames) < 3 or len(frames[1].bytes) != 0:
                raise PSError(
                    ErrorCode.INVALID_ARGUMENT, "expected [empty delimiter, msgpack request, *data]"
                )
            try:
                req = msgpack.unpackb(frames[2].buffer, raw=False)
            except (ValueError, msgpack.UnpackException) as err:
                raise PSError(ErrorCode.INVALID_ARGUMENT, f"request is not valid msgpack: {err}") from None
            if not isinstance(req, dict):
                raise PSError(ErrorCode.INVALID_ARGUMENT, "request must be a msgpack map")
            req_id = req.get("id")
            op = str(req.get("op"))
            data = [f.buffer for f in frames[3:]]
            reply, out = await self._dispatch(op, req, data)
        except PSError as err:
            self.metrics.reject(err.code.value)
            reply, out = {"error": err.code.value, "message": err.message}, []
        except Exception as err:  # a bug must not kill the server loop; report it to the caller
            log.exception("zmq %s request failed", op)
            reply, out = {"error": "INTERNAL", "message": f"{type(err).__name__}: {err}"}, []
        reply["id"] = req_id
        # Zero-copy only pays for the parameter frame; small frames are cheaper copied.
        await self._sock.send_multipart([identity, b"", msgpack.packb(reply), *out], copy=not out)
        if op == "push":
            self.metrics.push_latency.labels("zmq").observe(time.perf_counter() - started)

    def _one_frame(self, data: list[memoryview], what: str) -> memoryview:
        if len(data) != 1:
            raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what} needs exactly one data frame, got {len(data)}")
        return data[0]

    async def _dispatch(self, op: str, req: dict[str, Any], data: list[memoryview]) -> Reply:
        store = self.store
        if op == "pull":
            pulled = await store.pull_async(
                _arg(req, "job_id", str),
                _arg(req, "worker_id", str, ""),
                _arg(req, "min_version", int, 0),
                _arg(req, "wait_timeout_s", float, 0.0),
            )
            self.metrics.bytes_sent.inc(pulled.params.nbytes)
            return (
                {
                    "version": pulled.version,
                    "num_params": int(pulled.params.shape[0]),
                    "layout": wire.layout_to_list(pulled.layout),
                    "job_complete": pulled.job_complete,
                },
                [pulled.params],
            )
        if op == "push":
            header = wire.header_from_dict(req.get("header"))
            store.precheck_push(header)
            payload = self._one_frame(data, "push")
            self.metrics.bytes_received.inc(len(payload))
            result = await run_store_call(
                store.push_cost_bytes(header, len(payload)), store.push, header, payload
            )
            return {
                "outcome": result.outcome.value,
                "version": result.version,
                "staleness": result.staleness,
                "message": result.message,
            }, []
        if op == "init_job":
            spec = wire.spec_from_dict(req.get("spec"))
            raw = self._one_frame(data, "init_job")
            if len(raw) > store.max_payload_bytes:
                raise PSError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"initial parameters are {len(raw)} bytes; the limit is {store.max_payload_bytes}",
                )
            if len(raw) != 4 * _arg(req, "num_params", int) or len(raw) % 4:
                raise PSError(
                    ErrorCode.INVALID_ARGUMENT, f"{len(raw)} bytes do not hold num_params float32 values"
                )
            self.metrics.bytes_received.inc(len(raw))
            params = np.frombuffer(raw, dtype=wire.FLOAT32)
            init = await asyncio.to_thread(
                store.init_job,
                spec,
                wire.layout_from_list(req.get("layout")),
                params,
                _str_list(req, "members"),
            )
            return {"created": init.created, "version": init.version}, []
        if op == "set_members":
            version, members = await asyncio.to_thread(
                store.set_members, _arg(req, "job_id", str), _str_list(req, "members")
            )
            return {"version": version, "members": members}, []
        if op == "stats":
            job_id = req.get("job_id")
            if job_id is not None and not isinstance(job_id, str):
                raise PSError(ErrorCode.INVALID_ARGUMENT, "'job_id' must be a string or nil")
            return {"jobs": [wire.stats_to_dict(s) for s in store.stats(job_id or None)]}, []
        raise PSError(
            ErrorCode.INVALID_ARGUMENT, f"unknown op {op!r} (init_job, pull, push, set_members, stats)"
        )

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
