"""ZMQ (ROUTER) + msgpack transport of the parameter server: same store, same semantics as gRPC.

Wire format, one request per multipart message (the client is a DEALER):
    [b"", msgpack({"op": ..., "id": n, ...arguments}), *data]
or, when the server has a cluster secret,
    [b"", token, msgpack({...}), *data]
where `token` is the caller's bearer credential, verified before the msgpack frame is parsed
(refused with {"id": nil, "error": "UNAUTHENTICATED"}); the socket then also runs CURVE, with a
server key pair derived from the secret (`transport.security`), so traffic is encrypted and
clients know they talk to the real PS. Once the map is parsed, the role must be allowed the op and
a worker credential must name the request's job and worker (`ServerSecurity.authorize`).
and the reply
    [b"", msgpack({"id": n, ...result}), *data]
or  [b"", msgpack({"id": n, "error": code, "message": m})]
`data` is at most one frame: the float32 parameters (init_job request, pull reply) or the
encoded update (push request). ZMQ moves large frames natively, so nothing is chunked, and
frames are received and sent without copies (`copy=False`, numpy buffers).

Ops: init_job {spec, layout, num_params, members}; pull {job_id, worker_id, min_version,
wait_timeout_s, have_epoch, have_version, have_digest}; push {header}; set_members {job_id, members}; stats {job_id}.
A pull reply answered with downlink deltas (`core.downlink`) adds {delta: true, base_version,
deltas: [{version, codec, codec_meta, payload_bytes}]} and its one frame is the deltas' payloads.
The socket is a plain (blocking-API) ZMQ socket driven by the event loop: its FD wakes
`_drain`, which receives with NOBLOCK until the queue is empty. A push whose work is small
enough to run on the loop (`state.INLINE_MAX_BYTES`) is answered right there, without a task
or a future; every other request runs as its own task, so a pull waiting for a version, or a
big push in a worker thread, never blocks the others. Against `zmq.asyncio` (futures, enum
flags, a task per request) this halves the loop's own Python time per request (~35 us less in
a micro-benchmark), and the ingest benchmark's server main thread went from ~1.3 to ~1.0 ms
of CPU per 4 MB push.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack
import numpy as np
import zmq

from dist_llm_train.core.credentials import Claims
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushResult
from dist_llm_train.netem.profile.classes import tos_byte
from dist_llm_train.paramserver.job import INLINE_MAX_BYTES, ParameterStore, run_store_call
from dist_llm_train.paramserver.metrics import PSMetrics
from dist_llm_train.paramserver.numerics import keep_freed_vectors
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.security import ServerSecurity

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 512  # requests being handled at once; beyond this the server stops reading (backpressure)
DRAIN_BATCH = 64  # requests taken per wake-up before other callbacks get the loop again
# Plain ints: pyzmq's enum flags cost ~1 us per operation in Python 3.11.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
Reply = tuple[dict[str, Any], list[Any]]


def _arg(req: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    value = req.get(key, default)
    if value is ...:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"request is missing {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, int):
        wire.check_int_range(value, repr(key))  # as gRPC's int64 field would hold it
    return value


def _str_list(req: dict[str, Any], key: str) -> list[str]:
    items = _arg(req, key, list, [])
    if not all(isinstance(m, str) for m in items):
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{key!r} must be a list of strings")
    return list(items)


@dataclass
class _Request:
    """One received request, parsed as far as the wire format goes (the store checks the rest)."""

    identity: bytes
    started: float
    frames: list[zmq.Frame]  # keeps the zero-copy data frames alive while `data` views them
    req_id: Any = None
    op: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    data: list[memoryview] = field(default_factory=list)
    header: PushHeader | None = None  # push only
    error: PSError | None = None  # set when the request is malformed or its credential refused
    claims: Claims | None = None  # the caller, when the server checks credentials

    @classmethod
    def parse(cls, frames: list[zmq.Frame], security: ServerSecurity) -> _Request:
        req = cls(frames[0].bytes, time.perf_counter(), frames)
        body = 3 if security.enabled else 2  # index of the msgpack frame
        try:
            if len(frames) < 3 or len(frames[1].bytes) != 0:
                shape = "token, " if security.enabled else ""
                raise PSError(ErrorCode.INVALID_ARGUMENT, f"expected [empty delimiter, {shape}msgpack request, *data]")
            if len(frames) < body + 1:
                raise PSError(ErrorCode.UNAUTHENTICATED, "no credential (expected [empty delimiter, token, msgpack "
                              "request, *data])")
            if security.enabled:  # before a byte of the request is parsed
                req.claims = security.authenticate(frames[2].bytes)
            try:
                args = msgpack.unpackb(frames[body].buffer, raw=False)
            except (ValueError, msgpack.UnpackException) as err:
                raise PSError(ErrorCode.INVALID_ARGUMENT, f"request is not valid msgpack: {err}") from None
            if not isinstance(args, dict):
                raise PSError(ErrorCode.INVALID_ARGUMENT, "request must be a msgpack map")
            req.args, req.req_id, req.op = args, args.get("id"), str(args.get("op"))
            req.data = [f.buffer for f in frames[body + 1 :]]
            if req.op == "push":
                req.header = wire.header_from_dict(args.get("header"))
            req.authorize(security)
        except PSError as err:
            req.error = err
        return req


    def authorize(self, security: ServerSecurity) -> None:
        """The credential may make this op, in this job, as this worker; nothing of the store is read yet."""
        if not security.enabled:
            return
        if self.op not in _OP_IDS:
            return  # an unknown op is refused by the dispatcher with the list of ops, touching nothing
        job_id, worker_id = _OP_IDS[self.op](self)
        security.authorize(self.claims, self.op, job_id, worker_id)


def _push_ids(req: _Request) -> tuple[str | None, str | None]:
    assert req.header is not None
    return req.header.job_id, req.header.worker_id


def _str_or_none(req: _Request, key: str) -> str | None:
    value = req.args.get(key)
    return value if isinstance(value, str) else None


def _spec_job_id(req: _Request) -> str | None:
    spec = req.args.get("spec")
    job_id = spec.get("job_id") if isinstance(spec, dict) else None
    return job_id if isinstance(job_id, str) else None


# Which job (and worker) each op acts on, read from the parsed map for the credential check.
_OP_IDS: dict[str, Callable[[_Request], tuple[str | None, str | None]]] = {
    "init_job": lambda r: (_spec_job_id(r), None),
    "pull": lambda r: (_str_or_none(r, "job_id"), _str_or_none(r, "worker_id") or ""),
    "push": _push_ids,
    "set_members": lambda r: (_str_or_none(r, "job_id"), None),
    "stats": lambda r: (_str_or_none(r, "job_id") or None, None),
}


def _push_reply(result: PushResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "version": result.version,
        "staleness": result.staleness,
        "message": result.message,
    }


class ZmqServer:
    def __init__(
        self,
        store: ParameterStore,
        metrics: PSMetrics,
        host: str,
        port: int,
        max_message_bytes: int,
        security: ServerSecurity | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.security = security or ServerSecurity(None)
        self._endpoint_host, self._port = host, port
        keep_freed_vectors()  # the server process churns through vector-sized buffers
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.TOS, tos_byte("ps_sync"))  # replies are ps_sync traffic too
        # Hard cap against memory abuse: a frame beyond twice the payload limit drops the peer;
        # anything between the limit and the cap gets a RESOURCE_EXHAUSTED reply.
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + (1 << 16))
        if self.security.curve is not None:  # before bind: every connection then runs the CURVE handshake
            self._sock.curve_publickey, self._sock.curve_secretkey = self.security.curve
            self._sock.curve_server = True
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._push_latency = metrics.push_latency.labels("zmq")
        self.port = 0

    async def start(self) -> int:
        if self._port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{self._endpoint_host}")
        else:
            self._sock.bind(f"tcp://{self._endpoint_host}:{self._port}")
            self.port = self._port
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, self._sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)
        return self.port

    def _drain(self) -> None:
        """Take every queued request. The ZMQ FD only says that the socket's state changed, and
        any send may consume that signal, so the queue is emptied by asking EVENTS each time; a
        full batch or the in-flight cap hands the rest to a later call (`_wake`)."""
        sock = self._sock
        for _ in range(DRAIN_BATCH):
            if self._fd < 0 or len(self._tasks) >= MAX_IN_FLIGHT:
                return
            try:
                if not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                    return
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            request = _Request.parse(frames, self.security)
            if self._inline(request):
                try:
                    self._reply(request, *self._answer_push(request))
                except Exception:  # keep draining: one bad request must not stall the queue
                    log.exception("zmq push handler crashed")
            else:
                task = asyncio.create_task(self._handle(request))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(self._drain)

    def _inline(self, request: _Request) -> bool:
        """A push the store will run on the loop anyway: nothing in it waits, so no task is needed."""
        if request.header is None or request.error is not None or len(request.data) != 1:
            return False
        return self.store.push_cost_bytes(request.header, len(request.data[0])) <= INLINE_MAX_BYTES

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake()  # below the in-flight cap again, and its reply may have taken the FD's signal
        if not task.cancelled() and task.exception() is not None:
            log.error("zmq request handler crashed", exc_info=task.exception())

    def _answer_push(self, request: _Request) -> Reply:
        try:
            return self._push(request), []
        except Exception as err:
            return self._error(request, err), []

    async def _handle(self, request: _Request) -> None:
        try:
            if request.error is not None:
                raise request.error
            reply, out = await self._dispatch(request)
        except Exception as err:
            reply, out = self._error(request, err), []
        self._reply(request, reply, out)

    def _error(self, request: _Request, err: Exception) -> dict[str, Any]:
        if isinstance(err, PSError):
            self.metrics.reject(err.code.value)
            return {"error": err.code.value, "message": err.message}
        # A bug must not kill the server loop; report it to the caller.
        log.error("zmq %s request failed", request.op, exc_info=err)
        return {"error": "INTERNAL", "message": f"{type(err).__name__}: {err}"}

    def _reply(self, request: _Request, reply: dict[str, Any], out: list[Any]) -> None:
        reply["id"] = request.req_id
        parts = [request.identity, b"", msgpack.packb(reply), *out]
        copy = not out  # zero-copy only pays for the parameter frame; small frames are cheaper copied
        try:  # a ROUTER never blocks: a reply to a peer that is gone or full is dropped
            for part in parts[:-1]:
                self._sock.send(part, _NOBLOCK | _SNDMORE, copy=copy)
            self._sock.send(parts[-1], _NOBLOCK, copy=copy)
        except zmq.ZMQError as err:
            log.warning("zmq reply to %s dropped: %s", request.op, err)
        if request.op == "push":
            self._push_latency.observe(time.perf_counter() - request.started)

    def _push(self, request: _Request) -> dict[str, Any]:
        """The inline push: the same steps as `_dispatch`'s, without awaiting."""
        header, payload = self._push_args(request)
        return _push_reply(self.store.push(header, payload))

    def _push_args(self, request: _Request) -> tuple[PushHeader, memoryview]:
        """No `precheck_push`: the payload came in the same message as the header, and
        `store.push` runs every check the precheck would."""
        if request.error is not None:
            raise request.error
        header = request.header
        assert header is not None  # `_Request.parse` sets it for every push it accepts
        payload = self._one_frame(request.data, "push")
        self.metrics.bytes_received.inc(len(payload))
        return header, payload

    def _one_frame(self, data: list[memoryview], what: str) -> memoryview:
        if len(data) != 1:
            raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what} needs exactly one data frame, got {len(data)}")
        return data[0]

    async def _dispatch(self, request: _Request) -> Reply:
        store, op, req, data = self.store, request.op, request.args, request.data
        if op == "pull":
            pulled = await store.pull_async(
                _arg(req, "job_id", str),
                _arg(req, "worker_id", str, ""),
                _arg(req, "min_version", int, 0),
                _arg(req, "wait_timeout_s", float, 0.0),
                _arg(req, "have_epoch", int, 0),
                _arg(req, "have_version", int, 0),
                _arg(req, "have_digest", bytes, b""),
            )
            reply = {
                "version": pulled.version,
                "num_params": int(pulled.params.shape[0]),
                "layout": wire.layout_to_list(pulled.layout),
                "job_complete": pulled.job_complete,
                "epoch": pulled.epoch,
            }
            if pulled.delta is None:
                self.metrics.bytes_sent.inc(pulled.params.nbytes)
                return reply, [pulled.params]
            # One frame, as for full parameters: the deltas' payloads back to back (the usual single delta of a
            # round-based job goes out as it is, without a copy).
            views = wire.delta_payloads(pulled.delta)
            frame = views[0] if len(views) == 1 else memoryview(b"".join(views))
            self.metrics.bytes_sent.inc(len(frame))
            reply |= {"delta": True, "base_version": pulled.delta.base_version}
            reply["deltas"] = wire.delta_headers(pulled.delta)
            return reply, [frame]
        if op == "push":
            header, payload = self._push_args(request)
            result = await run_store_call(store.push_cost_bytes(header, len(payload)), store.push, header, payload)
            return _push_reply(result), []
        if op == "init_job":
            spec = wire.spec_from_dict(req.get("spec"))
            raw = self._one_frame(data, "init_job")
            if len(raw) > store.max_payload_bytes:
                raise PSError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"initial parameters are {len(raw)} bytes; the limit is {store.max_payload_bytes}",
                )
            if len(raw) != 4 * _arg(req, "num_params", int) or len(raw) % 4:
                raise PSError(ErrorCode.INVALID_ARGUMENT, f"{len(raw)} bytes do not hold num_params float32 values")
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
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"unknown op {op!r} (init_job, pull, push, set_members, stats)")

    async def stop(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sock.close(linger=0)
        self._ctx.term()
