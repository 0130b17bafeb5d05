"""Blocking ZMQ (DEALER) + msgpack client of the parameter server (wire format: zmq_server.py).

The socket uses ZMQ_IMMEDIATE so a request is never queued for a server that is not
connected: sending then times out and the call fails with UNAVAILABLE instead of being
delivered minutes later. After any timeout the socket is replaced, so a late reply to an
abandoned request can never be mistaken for the answer to the next one (ids guard that too).
With `PSCredentials`, each request carries the bearer token in its own frame and the socket runs
CURVE against the PS's public key (a fresh client key pair per socket: the token, not the key,
says who the client is).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import (
    ErrorCode,
    InitResult,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushOutcome,
    PushResult,
    TensorSpec,
)
from dist_llm_train.netem.profile.classes import tos_byte
from dist_llm_train.paramserver.numerics import Buffer
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.client import PSClient, as_float32, delta_base, have_fields
from dist_llm_train.paramserver.transport.security import PSCredentials


def _endpoint(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"


class ZmqPSClient(PSClient):
    def __init__(self, address: str, timeout_s: float, credentials: PSCredentials | None = None) -> None:
        super().__init__()
        self.address = address
        self.timeout_s = timeout_s
        creds = credentials or PSCredentials()
        self._token_frame: list[bytes] = [creds.token.encode()] if creds.token else []
        self._curve_server_key = creds.curve_server_key.encode() if creds.curve_server_key else None
        self._ctx = zmq.Context()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # a ZMQ socket must only be used by one thread at a time
        self._sock = self._new_socket()

    def _new_socket(self) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.TOS, tos_byte("ps_sync"))  # DSCP mark: the kernel backends shape ps_sync by it
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        if self._curve_server_key is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = self._curve_server_key
        sock.connect(_endpoint(self.address))
        return sock

    def _reset(self) -> None:
        self._sock.close(linger=0)
        self._sock = self._new_socket()

    def _request(
        self, op: str, args: dict[str, Any], data: list[Any], wait_s: float = 0.0
    ) -> tuple[dict[str, Any], list[zmq.Frame]]:
        with self._lock:
            req_id = next(self._ids)
            message = msgpack.packb({"op": op, "id": req_id, **args})
            try:
                self._sock.send_multipart([b"", *self._token_frame, message, *data], copy=False)
            except zmq.Again:
                self._reset()
                raise PSError(
                    ErrorCode.UNAVAILABLE, f"no connection to the parameter server at {self.address}"
                ) from None
            deadline = time.monotonic() + self.timeout_s + wait_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    self._reset()
                    raise PSError(
                        ErrorCode.UNAVAILABLE, f"no reply from the parameter server at {self.address} to {op}"
                    )
                frames = self._sock.recv_multipart(copy=False)
                if len(frames) < 2:
                    continue
                reply = msgpack.unpackb(frames[1].buffer, raw=False)
                if isinstance(reply, dict) and reply.get("id") == req_id:
                    break
                # Refused before the server could read the request (its id): one request is in flight
                # on this socket and late replies never reach a new one, so this refusal is ours.
                if isinstance(reply, dict) and reply.get("id") is None and "error" in reply:
                    break
        if "error" in reply:
            try:
                code = ErrorCode(reply["error"])
            except ValueError:
                code = ErrorCode.INTERNAL
            raise PSError(code, str(reply.get("message", "")))
        return reply, list(frames[2:])

    def init_job(self, spec: JobSpec, layout: list[TensorSpec], params: np.ndarray, members: list[str]) -> InitResult:
        flat = as_float32(params)
        reply, _ = self._request(
            "init_job",
            {
                "spec": spec.to_dict(),
                "layout": wire.layout_to_list(layout),
                "num_params": int(flat.shape[0]),
                "members": list(members),
            },
            [flat],
        )
        self._count(sent=flat.nbytes)
        return InitResult(created=bool(reply["created"]), version=int(reply["version"]))

    def pull(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have: PulledParams | None = None,
        own: np.ndarray | None = None,
    ) -> PulledParams:
        have_epoch, have_version, have_digest = have_fields(have, own)
        reply, frames = self._request(
            "pull",
            {
                "job_id": job_id,
                "worker_id": worker_id,
                "min_version": min_version,
                "wait_timeout_s": float(wait_timeout_s),
                "have_epoch": have_epoch,
                "have_version": have_version,
                "have_digest": have_digest,
            },
            [],
            wait_s=max(wait_timeout_s, 0.0),
        )
        if len(frames) != 1:
            raise PSError(ErrorCode.INTERNAL, "pull reply needs exactly one data frame")
        data = frames[0].buffer
        self._count(received=len(data))
        epoch, version = int(reply.get("epoch", 0)), int(reply["version"])
        if reply.get("delta"):
            base_version = int(reply["base_version"])
            base = delta_base(have, own, epoch, base_version)
            params = wire.params_from_deltas(base, epoch, base_version, version, list(reply.get("deltas", [])), data)
        elif len(data) != 4 * int(reply["num_params"]):
            raise PSError(ErrorCode.INTERNAL, "pull reply does not carry num_params float32 values")
        else:
            params = np.frombuffer(data, dtype=wire.FLOAT32).copy()
        return PulledParams(
            version=version,
            params=params,
            layout=wire.layout_from_list(reply["layout"]),
            job_complete=bool(reply["job_complete"]),
            epoch=epoch,
        )

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        # `vars` is a shallow copy of the flat header; `asdict` deep-copies and costs ~10x more.
        reply, _ = self._request("push", {"header": dict(vars(header))}, [payload])
        self._count(sent=len(payload))
        return PushResult(
            PushOutcome(reply["outcome"]),
            int(reply["version"]),
            int(reply["staleness"]),
            str(reply["message"]),
        )

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        reply, _ = self._request("set_members", {"job_id": job_id, "members": list(members)}, [])
        return [str(m) for m in reply["members"]]

    def stats(self, job_id: str | None = None) -> list[JobStats]:
        reply, _ = self._request("stats", {"job_id": job_id}, [])
        return [wire.stats_from_dict(s) for s in reply["jobs"]]

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)
            self._ctx.term()
