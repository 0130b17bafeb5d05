"""The ZMQ server's receive loop under concurrency (real server on 127.0.0.1).

The loop drains the socket itself (`ZmqServer._drain`): these tests check that nothing is
lost when many requests are queued at once, when more are queued than one wake-up takes,
when the in-flight cap stops reading, and that a pull waiting for a version never holds up
the pushes that will produce it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport import zmq_server
from dist_llm_train.paramserver.transport.client import connect

N = 32
TIMEOUT_MS = 20_000


@pytest.fixture
def server() -> Iterator[BackgroundServer]:
    with BackgroundServer(ParamServerConfig(port=0, metrics_port=0, transport="zmq"), with_metrics=False) as srv:
        yield srv


def new_job(address: str, job_id: str, total_steps: int = 1000) -> None:
    with connect("zmq", address, timeout_s=20) as client:
        wire_spec = WireJobSpec(
            job_id, mode="async", learning_rate=0.1, momentum=0.0, max_staleness=10_000, total_steps=total_steps
        )
        spec = JobSpec.from_wire(wire_spec)
        client.init_job(spec, [TensorSpec("w", (N,), 0)], np.zeros(N, np.float32), [])


def push_request(job_id: str, worker: str, step: int, req_id: int) -> list[bytes]:
    payload = np.ones(N, "<f4").tobytes()
    header = {"job_id": job_id, "worker_id": worker, "step": step, "base_version": 0,
              "payload_bytes": len(payload)}  # fmt: skip
    return [b"", msgpack.packb({"op": "push", "id": req_id, "header": header}), payload]


def collect(sock: zmq.Socket[bytes], count: int) -> dict[int, dict[str, Any]]:
    replies: dict[int, dict[str, Any]] = {}
    while len(replies) < count:
        assert sock.poll(TIMEOUT_MS), f"only {len(replies)} of {count} replies arrived"
        reply = msgpack.unpackb(sock.recv_multipart()[1])
        replies[reply["id"]] = reply
    return replies


@pytest.fixture
def dealer(server: BackgroundServer) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{server.address}")
    yield sock
    sock.close()
    ctx.term()


def test_more_queued_requests_than_one_wake_up_takes(server: BackgroundServer, dealer: zmq.Socket[bytes]) -> None:
    new_job(server.address, "burst")
    count = 5 * zmq_server.DRAIN_BATCH + 3
    for i in range(count):  # pipelined: all queued before the first reply is read
        dealer.send_multipart(push_request("burst", "w", i, i))
    replies = collect(dealer, count)
    assert sorted(replies) == list(range(count))
    assert all(r["outcome"] == PushOutcome.APPLIED.value for r in replies.values())
    with connect("zmq", server.address, timeout_s=20) as client:
        assert client.stats("burst")[0].version == count


def test_waiting_pulls_do_not_hold_up_the_pushes_they_wait_for(
    server: BackgroundServer, dealer: zmq.Socket[bytes]
) -> None:
    new_job(server.address, "wait")
    for i in range(4):  # long polls for version 3, each handled as its own task
        dealer.send_multipart([b"", msgpack.packb({"op": "pull", "id": 100 + i, "job_id": "wait",
                                                   "min_version": 3, "wait_timeout_s": 30.0})])  # fmt: skip
    for step in range(3):
        dealer.send_multipart(push_request("wait", "w", step, step))
    replies = collect(dealer, 7)
    assert [replies[i]["outcome"] for i in range(3)] == [PushOutcome.APPLIED.value] * 3
    assert all(replies[100 + i]["version"] == 3 for i in range(4))


def test_in_flight_cap_stops_reading_then_resumes(
    server: BackgroundServer, dealer: zmq.Socket[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    new_job(server.address, "cap")
    monkeypatch.setattr(zmq_server, "MAX_IN_FLIGHT", 2)
    for i in range(3):  # two fill the cap until their 0.3 s wait ends; the third waits to be read
        dealer.send_multipart([b"", msgpack.packb({"op": "pull", "id": i, "job_id": "cap",
                                                   "min_version": 1, "wait_timeout_s": 0.3})])  # fmt: skip
    dealer.send_multipart(push_request("cap", "w", 0, 3))
    replies = collect(dealer, 4)
    assert replies[3]["outcome"] == PushOutcome.APPLIED.value
    assert {replies[i]["version"] for i in range(3)} <= {0, 1}


def test_many_clients_at_once(server: BackgroundServer) -> None:
    new_job(server.address, "many")
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with connect("zmq", server.address, timeout_s=20) as client:
                for step in range(5):
                    payload = np.full(N, 0.5, "<f4").tobytes()
                    header = PushHeader("many", name, step, 0, payload_bytes=len(payload))
                    assert client.push(header, payload).outcome is PushOutcome.APPLIED
                    assert client.pull("many", name).version >= 1
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with connect("zmq", server.address, timeout_s=20) as client:
        stats = client.stats("many")[0]
    assert stats.version == 60 and sorted(stats.members) == sorted(f"w{i}" for i in range(12))
