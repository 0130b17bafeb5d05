"""One behavioural suite for the parameter server, run against both transports.

A real server (gRPC or ZMQ) listens on 127.0.0.1 with an OS-chosen port; the blocking
client talks to it over the socket. Every test uses its own job id, so the module-wide
servers can be shared.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import (
    ErrorCode,
    PSError,
    PushHeader,
    PushOutcome,
    TensorSpec,
)
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.client import PSClient, connect
from dist_llm_train.proto import paramserver_pb2 as pb

TRANSPORTS = ["grpc", "zmq"]
MAX_MB = 32  # server payload limit: the 20 MB vector fits, a 33 MB update does not
_ids = itertools.count()


@pytest.fixture(scope="module", params=TRANSPORTS)
def server(request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    cfg = ParamServerConfig(port=0, metrics_port=0, transport=request.param, max_message_mb=MAX_MB)
    with BackgroundServer(cfg) as srv:
        yield srv


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[PSClient]:
    c = connect(server.cfg.transport, server.address, timeout_s=20)
    yield c
    c.close()


def new_job(
    client: PSClient, n: int = 8, members: list[str] | None = None, **spec_kw: Any
) -> tuple[JobSpec, np.ndarray]:
    defaults: dict[str, Any] = {
        "optimizer": "sgd",
        "learning_rate": 0.5,
        "momentum": 0.0,
        "total_steps": 100,
    }
    spec = JobSpec.from_wire(WireJobSpec(job_id=f"job-{next(_ids)}", **{**defaults, **spec_kw}))
    params = np.linspace(-1, 1, n, dtype=np.float32)
    assert client.init_job(spec, [TensorSpec("w", (n,), 0)], params, members or []).created
    return spec, params


def push(
    client: PSClient, job_id: str, worker: str, step: int, base: int, update: np.ndarray | bytes, **kw: Any
) -> PushOutcome:
    payload = update if isinstance(update, bytes) else np.asarray(update, dtype="<f4").tobytes()
    header = PushHeader(job_id=job_id, worker_id=worker, step=step, base_version=base, payload_bytes=len(payload), **kw)
    return client.push(header, payload).outcome


def counters(client: PSClient, job_id: str) -> dict[str, int]:
    return client.stats(job_id)[0].counters


# -- init, pull, push ----------------------------------------------------------------------
def test_init_is_idempotent_and_conflicts_are_refused(client: PSClient) -> None:
    spec, params = new_job(client, n=8)
    again = client.init_job(spec, [TensorSpec("w", (8,), 0)], params + 1, ["x"])
    assert (again.created, again.version) == (False, 0)
    assert np.array_equal(client.pull(spec.job_id, "w").params, params)  # the second init changed nothing
    for layout, vec in (
        ([TensorSpec("v", (8,), 0)], params),
        ([TensorSpec("w", (9,), 0)], np.zeros(9, np.float32)),
    ):
        with pytest.raises(PSError) as err:
            client.init_job(spec, layout, vec, [])
        assert err.value.code is ErrorCode.FAILED_PRECONDITION


def test_pull_push_round_trip(client: PSClient) -> None:
    spec, params = new_job(client, n=6, mode="async")
    pulled = client.pull(spec.job_id, "w0")
    assert pulled.version == 0 and not pulled.job_complete
    assert pulled.layout == [TensorSpec("w", (6,), 0)]
    assert np.array_equal(pulled.params, params)
    grad = np.arange(6, dtype=np.float32)
    assert push(client, spec.job_id, "w0", 1, 0, grad) is PushOutcome.APPLIED
    after = client.pull(spec.job_id, "w0")
    assert after.version == 1
    np.testing.assert_array_equal(after.params, params - np.float32(0.5) * grad)
    assert client.bytes_sent == params.nbytes + grad.nbytes
    assert client.bytes_received == 2 * params.nbytes


def test_fp16_codec_is_decoded(client: PSClient) -> None:
    spec, params = new_job(client, n=4, mode="async", learning_rate=1.0)
    grad = np.array([0.5, -1.0, 2.0, 0.25], dtype="<f2")
    assert push(client, spec.job_id, "w", 1, 0, grad.tobytes(), codec="fp16") is PushOutcome.APPLIED
    np.testing.assert_array_equal(client.pull(spec.job_id, "w").params, params - grad.astype(np.float32))


def test_twenty_megabyte_vector_round_trips(client: PSClient) -> None:
    n = 5_000_000
    spec, params = new_job(client, n=n, mode="async", learning_rate=1.0)
    pulled = client.pull(spec.job_id, "w")
    assert pulled.params.shape == (n,) and np.array_equal(pulled.params, params)
    grad = np.full(n, 0.25, dtype=np.float32)
    assert push(client, spec.job_id, "w", 1, 0, grad) is PushOutcome.APPLIED
    np.testing.assert_array_equal(client.pull(spec.job_id, "w").params, params - np.float32(0.25))


# -- sync rounds ---------------------------------------------------------------------------
def test_sync_barrier_waits_for_all_three_members(server: BackgroundServer, client: PSClient) -> None:
    spec, params = new_job(client, n=4, members=["a", "b", "c"])
    grads = {w: np.full(4, i + 1, dtype=np.float32) for i, w in enumerate("abc")}
    assert push(client, spec.job_id, "a", 1, 0, grads["a"]) is PushOutcome.BUFFERED
    assert push(client, spec.job_id, "b", 1, 0, grads["b"]) is PushOutcome.BUFFERED
    assert client.pull(spec.job_id, "a", min_version=1, wait_timeout_s=0.05).version == 0  # times out, returns v0
    waiter: dict[str, int] = {}
    with connect(server.cfg.transport, server.address) as other:
        t = threading.Thread(target=lambda: waiter.update(v=other.pull(spec.job_id, "a", 1, 20).version))
        t.start()
        assert push(client, spec.job_id, "c", 1, 0, grads["c"]) is PushOutcome.APPLIED
        t.join(timeout=30)
    assert waiter["v"] == 1
    np.testing.assert_allclose(client.pull(spec.job_id, "a").params, params - 0.5 * 2.0, rtol=0, atol=1e-7)
    c = counters(client, spec.job_id)
    assert (c["rounds_closed"], c["pushes_buffered"], c["pushes_applied"]) == (1, 2, 1)


def test_straggler_timeout_closes_round_then_late_push_is_dropped(client: PSClient) -> None:
    spec, params = new_job(client, n=4, members=["a", "b"], straggler_timeout_s=0.3)
    assert push(client, spec.job_id, "a", 1, 0, np.ones(4)) is PushOutcome.BUFFERED
    pulled = client.pull(spec.job_id, "a", min_version=1, wait_timeout_s=20)
    assert pulled.version == 1  # closed by the timeout with a's update alone
    np.testing.assert_allclose(pulled.params, params - 0.5, atol=1e-7)
    assert push(client, spec.job_id, "b", 1, 0, np.ones(4)) is PushOutcome.LATE_DROPPED
    c = counters(client, spec.job_id)
    assert (c["rounds_timed_out"], c["pushes_late_dropped"]) == (1, 1)
    assert client.pull(spec.job_id, "b").version == 1  # the late update changed nothing


def test_late_update_for_closed_round_is_dropped_and_counted(client: PSClient) -> None:
    spec, _ = new_job(client, n=4, members=["a", "b"])
    push(client, spec.job_id, "a", 1, 0, np.ones(4))
    assert push(client, spec.job_id, "b", 1, 0, np.ones(4)) is PushOutcome.APPLIED
    before = client.pull(spec.job_id, "a")
    assert push(client, spec.job_id, "a", 2, 0, np.ones(4)) is PushOutcome.LATE_DROPPED
    after = client.pull(spec.job_id, "a")
    assert after.version == before.version == 1 and np.array_equal(after.params, before.params)
    assert counters(client, spec.job_id)["pushes_late_dropped"] == 1


def test_membership_shrink_closes_a_round_waiting_only_for_the_removed_worker(client: PSClient) -> None:
    spec, _ = new_job(client, n=4, members=["a", "b", "c"])
    push(client, spec.job_id, "a", 1, 0, np.ones(4))
    push(client, spec.job_id, "b", 1, 0, np.ones(4))
    assert client.set_members(spec.job_id, ["a", "b"]) == ["a", "b"]
    assert client.pull(spec.job_id, "a").version == 1
    with pytest.raises(PSError) as err:
        push(client, spec.job_id, "c", 1, 1, np.ones(4))
    assert err.value.code is ErrorCode.PERMISSION_DENIED


def test_open_membership_until_set_members(client: PSClient) -> None:
    spec, _ = new_job(client, n=4, mode="async")
    assert push(client, spec.job_id, "anyone", 1, 0, np.ones(4)) is PushOutcome.APPLIED
    client.set_members(spec.job_id, ["a"])
    with pytest.raises(PSError) as err:
        push(client, spec.job_id, "anyone", 2, 1, np.ones(4))
    assert err.value.code is ErrorCode.PERMISSION_DENIED


# -- async, replay, completion -------------------------------------------------------------
def test_async_update_beyond_staleness_bound_is_rejected(client: PSClient) -> None:
    spec, _ = new_job(client, n=4, mode="async", max_staleness=1)
    push(client, spec.job_id, "a", 1, 0, np.ones(4))
    push(client, spec.job_id, "b", 1, 0, np.ones(4))  # staleness 1: allowed
    before = client.pull(spec.job_id, "a")
    assert push(client, spec.job_id, "c", 1, 0, np.ones(4)) is PushOutcome.STALE_REJECTED
    after = client.pull(spec.job_id, "a")
    assert after.version == before.version == 2 and np.array_equal(after.params, before.params)
    assert counters(client, spec.job_id)["pushes_stale_rejected"] == 1


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_replayed_push_is_counted_once(client: PSClient, mode: str) -> None:
    spec, params = new_job(client, n=4, mode=mode, members=["a", "b"])
    first = push(client, spec.job_id, "a", 7, 0, np.ones(4))
    assert push(client, spec.job_id, "a", 7, 0, np.ones(4)) is PushOutcome.DUPLICATE
    c = counters(client, spec.job_id)
    assert c["pushes_duplicate"] == 1 and c[f"pushes_{first.value.lower()}"] == 1
    assert c.get("updates_aggregated", 0) == (1 if mode == "async" else 0)
    if mode == "sync":  # the round still waits for b, with a's update counted once
        assert push(client, spec.job_id, "b", 1, 0, np.ones(4)) is PushOutcome.APPLIED
        np.testing.assert_allclose(client.pull(spec.job_id, "a").params, params - 0.5, atol=1e-7)


def test_job_completes_at_total_steps(client: PSClient) -> None:
    spec, _ = new_job(client, n=4, mode="async", total_steps=2)
    push(client, spec.job_id, "a", 1, 0, np.ones(4))
    push(client, spec.job_id, "a", 2, 1, np.ones(4))
    pulled = client.pull(spec.job_id, "a", min_version=99, wait_timeout_s=20)  # complete: no waiting
    assert pulled.version == 2 and pulled.job_complete
    assert push(client, spec.job_id, "a", 3, 2, np.ones(4)) is PushOutcome.JOB_COMPLETE
    assert client.pull(spec.job_id, "a").version == 2
    assert client.stats(spec.job_id)[0].complete


# -- bad input -----------------------------------------------------------------------------
N = 8
BAD_PUSHES: list[tuple[str, dict[str, object], bytes | None, ErrorCode]] = [
    ("unknown job", {"job_id": "no-such-job"}, None, ErrorCode.NOT_FOUND),
    ("not a member", {"worker_id": "mallory"}, None, ErrorCode.PERMISSION_DENIED),
    ("wrong length", {}, np.ones(N - 1, "<f4").tobytes(), ErrorCode.INVALID_ARGUMENT),
    ("nan", {}, np.array([np.nan] + [0] * (N - 1), "<f4").tobytes(), ErrorCode.INVALID_ARGUMENT),
    ("inf", {}, np.array([np.inf] + [0] * (N - 1), "<f4").tobytes(), ErrorCode.INVALID_ARGUMENT),
    ("unknown codec", {"codec": "zstd-magic"}, None, ErrorCode.INVALID_ARGUMENT),
    ("bad codec meta", {"codec_meta": b"\xc1"}, None, ErrorCode.INVALID_ARGUMENT),
    ("base ahead", {"base_version": 5}, None, ErrorCode.ABORTED),  # a restarted PS: the worker re-pulls
    ("negative step", {"step": -1}, None, ErrorCode.INVALID_ARGUMENT),
    ("bad kind", {"kind": "vibes"}, None, ErrorCode.INVALID_ARGUMENT),
    ("nan loss", {"loss": float("nan")}, None, ErrorCode.INVALID_ARGUMENT),
    ("length lie", {"payload_bytes": 4 * N + 4}, None, ErrorCode.INVALID_ARGUMENT),
    ("oversize", {}, bytes((MAX_MB << 20) + 4096), ErrorCode.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize("case", BAD_PUSHES, ids=[c[0] for c in BAD_PUSHES])
def test_bad_push_gets_its_code_and_changes_nothing(client: PSClient, case: tuple) -> None:
    _, overrides, payload, code = case
    spec, params = new_job(client, n=N, mode="async", members=["a"])
    push(client, spec.job_id, "a", 1, 0, np.ones(N))
    before_stats = client.stats(spec.job_id)[0]
    before = client.pull(spec.job_id, "a")
    data = payload if payload is not None else np.ones(N, "<f4").tobytes()
    fields: dict[str, object] = {
        "job_id": spec.job_id,
        "worker_id": "a",
        "step": 2,
        "base_version": 1,
        "payload_bytes": len(data),
        **overrides,
    }
    with pytest.raises(PSError) as err:
        client.push(PushHeader(**fields), data)  # type: ignore[arg-type]
    assert err.value.code is code, err.value
    after = client.pull(spec.job_id, "a")
    assert after.version == before.version and np.array_equal(after.params, before.params)
    after_stats = client.stats(spec.job_id)[0]
    pushes = {k: v for k, v in after_stats.counters.items() if k.startswith(("pushes_", "updates_", "bytes_"))}
    assert pushes == {k: v for k, v in before_stats.counters.items() if k.startswith(("pushes_", "updates_", "bytes_"))}
    assert after_stats.members == before_stats.members
    if code is not ErrorCode.NOT_FOUND:
        assert after_stats.counters[f"rejected_{code.value.lower()}"] == 1
    # the same step is still accepted afterwards: the refused push was not remembered as seen
    assert push(client, spec.job_id, "a", 2, 1, np.ones(N)) is PushOutcome.APPLIED


def test_bad_requests_other_than_push(client: PSClient) -> None:
    def code_of(fn: object, *args: object) -> ErrorCode:
        with pytest.raises(PSError) as err:
            fn(*args)  # type: ignore[operator]
        return err.value.code

    layout = [TensorSpec("w", (4,), 0)]
    ok = np.zeros(4, np.float32)
    # A typed JobSpec cannot even be built with an unknown strategy; the server's own parse of the wire
    # form (both transports share it) refuses it with INVALID_ARGUMENT.
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        JobSpec.from_wire(WireJobSpec("bad-mode", mode="bogus"))
    for parse in (lambda: wire.spec_from_pb(pb.JobSpec(job_id="bad-mode", mode="bogus")),
                  lambda: wire.spec_from_dict(dataclasses.asdict(WireJobSpec("bad-mode", mode="bogus")))):
        with pytest.raises(PSError) as err:
            parse()
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert (
        code_of(client.init_job, JobSpec.from_wire(WireJobSpec("bad/id")), layout, ok, []) is ErrorCode.INVALID_ARGUMENT
    )
    assert (
        code_of(client.init_job, JobSpec.from_wire(WireJobSpec("nan-init")), layout, np.full(4, np.nan, np.float32), [])
        is ErrorCode.INVALID_ARGUMENT
    )
    assert (
        code_of(client.init_job, JobSpec.from_wire(WireJobSpec("off-layout")), [TensorSpec("w", (5,), 0)], ok, [])
        is ErrorCode.INVALID_ARGUMENT
    )
    with pytest.raises(PSError) as bad_lr:  # refused where either transport parses the wire form
        wire.spec_from_dict(dataclasses.asdict(WireJobSpec("neg-lr", learning_rate=-1.0)))
    assert bad_lr.value.code is ErrorCode.INVALID_ARGUMENT and "learning_rate" in bad_lr.value.message
    assert (
        code_of(
            client.init_job,
            JobSpec.from_wire(WireJobSpec("big")),
            [TensorSpec("w", ((MAX_MB << 18) + 1,), 0)],
            np.zeros((MAX_MB << 18) + 1, np.float32),
            [],
        )
        is ErrorCode.RESOURCE_EXHAUSTED
    )
    assert code_of(client.pull, "no-such-job", "w") is ErrorCode.NOT_FOUND
    assert code_of(client.set_members, "no-such-job", ["a"]) is ErrorCode.NOT_FOUND
    spec, _ = new_job(client, n=4)
    assert code_of(client.pull, spec.job_id, "w", -1) is ErrorCode.INVALID_ARGUMENT
    assert code_of(client.set_members, spec.job_id, [""]) is ErrorCode.INVALID_ARGUMENT
    assert client.stats(spec.job_id)[0].members == []  # the refused SetMembers changed nothing
    assert client.stats("no-such-job") == []
    for job_id in ("bad-mode", "nan-init", "off-layout", "neg-lr", "big"):
        assert client.stats(job_id) == []  # refused InitJobs created nothing


def test_unreachable_server_is_unavailable(server: BackgroundServer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with (
            connect(server.cfg.transport, f"127.0.0.1:{port}", timeout_s=0.5) as c,
            pytest.raises(PSError) as err,
        ):
            c.stats()
    assert err.value.code is ErrorCode.UNAVAILABLE


# -- observability -------------------------------------------------------------------------
def test_metrics_are_exposed(server: BackgroundServer, client: PSClient) -> None:
    spec, _ = new_job(client, n=4, mode="async")
    push(client, spec.job_id, "a", 1, 0, np.ones(4))
    with pytest.raises(PSError):
        push(client, spec.job_id, "a", 2, 1, np.full(4, np.nan))
    text = httpx.get(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).text
    assert f'dlt_ps_version{{job="{spec.job_id}"}} 1.0' in text
    assert f'dlt_ps_members{{job="{spec.job_id}"}} 1.0' in text
    assert 'dlt_ps_rejected_total{reason="INVALID_ARGUMENT"}' in text
    for name in (
        'dlt_ps_pushes_total{outcome="APPLIED"}',
        "dlt_ps_bytes_received_total",
        "dlt_ps_bytes_sent_total",
        "dlt_ps_round_seconds_bucket",
        f'dlt_ps_push_latency_seconds_count{{transport="{server.cfg.transport}"}}',
    ):
        assert name in text, name


# -- checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_checkpoint_on_shutdown_and_resume(tmp_path: Path, transport: str) -> None:
    """A resumed server continues exactly where it stopped: params, Adam state, replay memory."""
    ckpt = tmp_path / "ckpt"
    cfg = ParamServerConfig(port=0, metrics_port=0, transport=transport, checkpoint_dir=str(ckpt), checkpoint_every=2)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(16).astype(np.float32) for _ in range(4)]
    spec = JobSpec.from_wire(
        WireJobSpec(job_id="resume-me", mode="async", optimizer="adam", learning_rate=0.01, total_steps=50)
    )
    layout = [TensorSpec("a", (4, 2), 0), TensorSpec("b", (8,), 8)]
    init = rng.standard_normal(16).astype(np.float32)
    with BackgroundServer(cfg, with_metrics=False) as srv, connect(transport, srv.address) as c:
        c.init_job(spec, layout, init, ["w"])
        for i, g in enumerate(grads[:3]):
            push(c, spec.job_id, "w", i, i, g)
    assert (ckpt / "resume-me.ckpt.npz").is_file()
    with BackgroundServer(cfg, with_metrics=False) as srv, connect(transport, srv.address) as c:
        assert c.init_job(spec, layout, init, ["w"]).created is False
        assert c.stats(spec.job_id)[0].members == ["w"]
        assert push(c, spec.job_id, "w", 2, 3, grads[2]) is PushOutcome.DUPLICATE
        push(c, spec.job_id, "w", 3, 3, grads[3])
        resumed = c.pull(spec.job_id, "w")
    with (
        BackgroundServer(cfg.model_copy(update={"checkpoint_dir": None}), with_metrics=False) as ref,
        connect(transport, ref.address) as c,
    ):
        c.init_job(spec, layout, init, ["w"])
        for i, g in enumerate(grads):
            push(c, spec.job_id, "w", i, i, g)
        uninterrupted = c.pull(spec.job_id, "w")
    assert resumed.version == uninterrupted.version == 4
    np.testing.assert_array_equal(resumed.params, uninterrupted.params)
    assert resumed.layout == layout


# -- gRPC extras ---------------------------------------------------------------------------
def test_grpc_health_and_reflection_answer() -> None:
    """Reflection is served only when asked for (`reflection: true`; off by default, test_ps_auth.py)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cfg = ParamServerConfig(port=0, metrics_port=0, transport="grpc", reflection=True)
    with BackgroundServer(cfg, with_metrics=False) as srv, grpc.insecure_channel(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "dist_llm_train.v1.ParameterServer"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"dist_llm_train.v1.ParameterServer", "grpc.health.v1.Health"} <= names


def test_plain_generated_grpc_stub_interoperates() -> None:
    """The server's hand-rolled chunk path must accept and produce ordinary protobuf messages."""
    import grpc

    from dist_llm_train.proto import paramserver_pb2 as pb
    from dist_llm_train.proto import paramserver_pb2_grpc as pb_grpc

    cfg = ParamServerConfig(port=0, metrics_port=0, transport="grpc", chunk_bytes=1024)
    with BackgroundServer(cfg, with_metrics=False) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        params = np.arange(1000, dtype="<f4")
        spec = pb.JobSpec(
            job_id="plain",
            mode="async",
            optimizer="sgd",
            learning_rate=1.0,
            total_steps=9,
            straggler_timeout_s=1.0,
            max_staleness=1,
        )
        header = pb.InitJobHeader(spec=spec, layout=[pb.TensorSpec(name="w", shape=[1000], offset=0)], num_params=1000)
        raw = params.tobytes()
        chunks = [pb.InitJobChunk(header=header)] + [
            pb.InitJobChunk(data=raw[i : i + 1500]) for i in range(0, len(raw), 1500)
        ]
        assert stub.InitJob(iter(chunks), timeout=10).created
        grad = np.ones(1000, "<f4").tobytes()
        resp = stub.Push(
            iter(
                [
                    pb.PushChunk(header=pb.PushHeader(job_id="plain", worker_id="w", step=1, payload_bytes=len(grad))),
                    pb.PushChunk(data=grad[:10]),
                    pb.PushChunk(data=grad[10:]),
                ]
            ),
            timeout=10,
        )
        assert resp.outcome == pb.APPLIED and resp.version == 1
        msgs = list(stub.Pull(pb.PullRequest(job_id="plain", worker_id="w"), timeout=10))
        assert msgs[0].header.version == 1 and msgs[0].header.num_params == 1000
        assert len(msgs) == 1 + 4  # 4000 bytes in 1024-byte chunks
        got = np.frombuffer(b"".join(m.data for m in msgs[1:]), dtype="<f4")
        np.testing.assert_array_equal(got, params - 1)


# -- ZMQ extras ----------------------------------------------------------------------------
def test_zmq_malformed_request_gets_an_error_reply() -> None:
    import zmq

    cfg = ParamServerConfig(port=0, metrics_port=0, transport="zmq")
    with BackgroundServer(cfg, with_metrics=False) as server:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{server.address}")
        try:
            for req, code in (
                ({"op": "frobnicate", "id": 1}, "INVALID_ARGUMENT"),
                ({"op": "push", "id": 2, "header": {"job_id": 3}}, "INVALID_ARGUMENT"),
                ({"op": "pull", "id": 3, "job_id": "no-such-job"}, "NOT_FOUND"),
                ({"op": "pull", "id": 4, "job_id": "x", "min_version": "1"}, "INVALID_ARGUMENT"),
            ):
                sock.send_multipart([b"", msgpack.packb(req)])
                assert sock.poll(10_000)
                reply = msgpack.unpackb(sock.recv_multipart()[1])
                assert reply["id"] == req["id"] and reply["error"] == code and reply["message"]
            sock.send_multipart([b"", b"\xc1not msgpack"])
            assert sock.poll(10_000)
            assert msgpack.unpackb(sock.recv_multipart()[1])["error"] == "INVALID_ARGUMENT"
        finally:
            sock.close()
            ctx.term()


def test_a_client_that_initialised_the_params_itself_pulls_no_model(client: PSClient, server: Any) -> None:
    """`own`: parameters the worker made from the job's seed. When they are what the job started from, the
    first pull sends no parameter bytes, later ones only the deltas since; other parameters get the model."""
    n = 20_000
    spec, initial = new_job(client, n=n, members=["w0"], options={"downlink": '{"name": "int8"}'})
    before = client.bytes_received
    first = client.pull(spec.job_id, "w0", own=initial.copy())
    assert client.bytes_received == before and first.version == 0 and first.epoch != 0
    assert first.params.tobytes() == initial.tobytes()
    rng = np.random.default_rng(1)
    for step in range(2):
        assert push(client, spec.job_id, "w0", step, step, rng.standard_normal(n)) is PushOutcome.APPLIED
    before = client.bytes_received
    late = client.pull(spec.job_id, "w0", own=initial.copy())  # a worker that joins at version 2
    assert client.bytes_received - before == 2 * (n + 4 * -(-n // 1024))  # two int8 deltas, a scale per 1,024
    assert late.params.tobytes() == client.pull(spec.job_id, "w0").params.tobytes()
    before = client.bytes_received
    client.pull(spec.job_id, "w0", own=initial + np.float32(1.0))  # not the job's initial parameters
    assert client.bytes_received - before == 4 * n


def test_downlink_deltas_keep_the_client_bit_identical_with_fewer_bytes(client: PSClient, server: Any) -> None:
    """A job with a downlink codec: a client passing what it holds gets compressed deltas and rebuilds
    exactly the PS's published parameters; a client that holds nothing gets them in full."""
    n = 20_000
    downlink = '{"name": "topk", "ratio": 0.01}'
    spec, _ = new_job(client, n=n, members=["w0"], options={"downlink": downlink})
    held = client.pull(spec.job_id, "w0")
    assert held.epoch != 0
    rng = np.random.default_rng(0)
    for step in range(4):
        assert push(client, spec.job_id, "w0", step, step, rng.standard_normal(n)) is PushOutcome.APPLIED
        before = client.bytes_received
        held = client.pull(spec.job_id, "w0", have=held)
        delta_bytes = client.bytes_received - before
        assert held.version == step + 1
        assert delta_bytes < 0.05 * 4 * n  # 1 % of the values and their indices, not the model
    full = client.pull(spec.job_id, "w0")  # holds nothing: the published params in full
    assert full.params.tobytes() == held.params.tobytes()
    c = counters(client, spec.job_id)
    assert c["pulls_delta"] == 4 and c["params_bytes_sent"] == 2 * 4 * n
    stale = dataclasses.replace(held, epoch=held.epoch ^ 1)  # another lineage: full again, still exact
    assert client.pull(spec.job_id, "w0", have=stale).params.tobytes() == held.params.tobytes()
