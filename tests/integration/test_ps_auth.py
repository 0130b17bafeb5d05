"""The parameter server's auth matrix, on both transports (docs/security.md).

Every PS call (gRPC method / ZMQ op) is made without a credential, with a forged one (signed
with another cluster's secret), with a tampered one, with another worker's credential and with
a credential of the wrong role or job; each must be refused and leave the server's state exactly
as it was (versions, parameters, members, counters: not even a rejection is counted against the
job). The right credential is accepted. On gRPC the refusal comes before the request is parsed
(a garbage body without a token gets UNAUTHENTICATED, not INVALID_ARGUMENT); on ZMQ the token
frame is checked before the msgpack map, and without the PS's CURVE key no connection is made.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import msgpack
import numpy as np
import pytest
import zmq

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.credentials import TokenAuthority, generate_secret
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.transport.client import PSClient, connect
from dist_llm_train.paramserver.transport.security import PSCredentials

SECRET = generate_secret()
AUTHORITY = TokenAuthority(SECRET)
OTHER_CLUSTER = TokenAuthority(generate_secret())
N = 8
_ids = itertools.count()


@pytest.fixture(scope="module", params=["grpc", "zmq"])
def server(request: pytest.FixtureRequest) -> Iterator[BackgroundServer]:
    cfg = ParamServerConfig(port=0, metrics_port=0, transport=request.param, cluster_secret=SECRET)
    with BackgroundServer(cfg, with_metrics=False) as srv:
        yield srv


def curve_key(server: BackgroundServer) -> str | None:
    curve = server.server.transport.security.curve  # type: ignore[attr-defined]
    return curve[0].decode() if server.cfg.transport == "zmq" and curve else None


def client_with(server: BackgroundServer, token: str | None, *, stream_push: bool = False) -> PSClient:
    creds = PSCredentials(token=token, curve_server_key=curve_key(server))
    if stream_push:  # gRPC's chunked Push stream instead of PushUnary
        from dist_llm_train.paramserver.transport.grpc_client import GrpcPSClient

        return GrpcPSClient(server.address, 5, chunk_bytes=1024, max_message_bytes=1 << 20, unary_push=False,
                            credentials=creds)
    return connect(server.cfg.transport, server.address, timeout_s=5, credentials=creds)


@dataclass
class Job:
    spec: JobSpec
    layout: list[TensorSpec]
    params: np.ndarray
    members: list[str]


def new_job(server: BackgroundServer) -> Job:
    job_id = f"job-{next(_ids)}"
    spec = JobSpec.from_wire(
        WireJobSpec(job_id=job_id, optimizer="sgd", learning_rate=0.5, momentum=0.0, total_steps=100)
    )
    job = Job(spec, [TensorSpec("w", (N,), 0)], np.linspace(-1, 1, N, dtype=np.float32), ["w1", "w2"])
    with client_with(server, AUTHORITY.mint_for("worker", "w1", job=job_id)) as w1:
        assert w1.init_job(job.spec, job.layout, job.params, job.members).created
    return job


def state(server: BackgroundServer) -> Any:
    """Everything a refused call must leave alone: every job's stats (counters included) and parameters."""
    store = server.server.store
    return [(s, store.job_state(s.job_id).published.tobytes()) for s in store.stats()]


def header(job_id: str, worker: str, step: int = 1) -> PushHeader:
    return PushHeader(job_id=job_id, worker_id=worker, step=step, base_version=0, payload_bytes=4 * N)


UPDATE = np.ones(N, dtype="<f4").tobytes()

# Each PS call as (op name, what it does given a client and a job), for the matrix.
CALLS: dict[str, Callable[[PSClient, Job], Any]] = {
    "init_job": lambda c, j: c.init_job(j.spec, j.layout, j.params, j.members),
    "pull": lambda c, j: c.pull(j.spec.job_id, "w1"),
    "push": lambda c, j: c.push(header(j.spec.job_id, "w1"), UPDATE),
    "push_stream": lambda c, j: c.push(header(j.spec.job_id, "w1"), UPDATE),  # gRPC's Push (a client stream)
    "set_members": lambda c, j: c.set_members(j.spec.job_id, ["intruder"]),
    "stats": lambda c, j: c.stats(j.spec.job_id),
}
# Who may make each call (acting as worker w1 where a worker id is involved).
RIGHT: dict[str, Callable[[str], str]] = {
    "init_job": lambda job: AUTHORITY.mint_for("worker", "w1", job=job),
    "pull": lambda job: AUTHORITY.mint_for("worker", "w1", job=job),
    "push": lambda job: AUTHORITY.mint_for("worker", "w1", job=job),
    "push_stream": lambda job: AUTHORITY.mint_for("worker", "w1", job=job),
    "set_members": lambda job: AUTHORITY.mint_for("controller", "controller"),
    "stats": lambda job: AUTHORITY.mint_for("controller", "controller"),
}


def _tampered(token: str) -> str:
    """The same signature over claims changed to another worker's: must not verify."""
    prefix, _, signature = token.split(".")
    claims = wire_b64(b'{"job":"x","role":"worker","sub":"w2"}')
    return f"{prefix}.{claims}.{signature}"


def wire_b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def wrong_credentials(op: str, job_id: str) -> dict[str, tuple[str | None, set[ErrorCode]]]:
    """Every credential that must be refused for `op` on `job_id` as w1, with the refusal codes allowed."""
    unauth, denied = {ErrorCode.UNAUTHENTICATED}, {ErrorCode.PERMISSION_DENIED}
    wrong: dict[str, tuple[str | None, set[ErrorCode]]] = {
        "none": (None, unauth),
        "other cluster": (OTHER_CLUSTER.mint_for("admin", "root"), unauth),
        "tampered": (_tampered(RIGHT[op](job_id)), unauth),
        "garbage": ("dlt1.not-a-token", unauth),
        "expired": (AUTHORITY.mint_for("worker", "w1", job=job_id, ttl_s=-1), unauth),
        "worker without job": (AUTHORITY.mint_for("worker", "w1"), denied),
        "join": (AUTHORITY.mint_for("join", "w1"), denied),
        "worker of another job": (AUTHORITY.mint_for("worker", "w1", job="other-job"), denied),
    }
    if op in ("pull", "push", "push_stream"):
        wrong["another worker"] = (AUTHORITY.mint_for("worker", "w2", job=job_id), denied)
        wrong["controller"] = (AUTHORITY.mint_for("controller", "controller"), denied)
    if op in ("push", "push_stream"):
        wrong["admin"] = (AUTHORITY.mint_for("admin", "root"), denied)
    if op == "set_members":
        wrong["worker of the job"] = (AUTHORITY.mint_for("worker", "w1", job=job_id), denied)
    return wrong


@pytest.mark.parametrize("op", list(CALLS))
def test_every_call_refuses_wrong_credentials_and_changes_nothing(server: BackgroundServer, op: str) -> None:
    if op == "push_stream" and server.cfg.transport != "grpc":
        pytest.skip("ZMQ has one push message")
    stream = op == "push_stream"
    job = new_job(server)
    if op == "init_job":
        job = Job(JobSpec.from_wire(WireJobSpec(job_id=f"job-{next(_ids)}")), job.layout, job.params, job.members)
    before = state(server)
    for name, (token, codes) in wrong_credentials(op, job.spec.job_id).items():
        with client_with(server, token, stream_push=stream) as c, pytest.raises(PSError) as err:
            CALLS[op](c, job)
        assert err.value.code in codes, f"{op} with {name}: {err.value}"
        assert state(server) == before, f"{op} with {name} changed the server's state"
    with client_with(server, RIGHT[op](job.spec.job_id), stream_push=stream) as c:
        result = CALLS[op](c, job)
    if op in ("push", "push_stream"):
        assert result.outcome in (PushOutcome.APPLIED, PushOutcome.BUFFERED)
    if op in ("init_job", "push", "push_stream", "set_members"):
        assert state(server) != before  # the accepted call did act


def test_workers_stats_only_for_their_job_and_admin_pulls(server: BackgroundServer) -> None:
    job = new_job(server)
    with client_with(server, AUTHORITY.mint_for("worker", "w2", job=job.spec.job_id)) as w2:
        assert w2.stats(job.spec.job_id)[0].job_id == job.spec.job_id
        with pytest.raises(PSError) as err:
            w2.stats(None)  # every job's stats: not a worker's business
        assert err.value.code is ErrorCode.PERMISSION_DENIED
    with client_with(server, AUTHORITY.mint_for("admin", "root")) as admin:
        assert admin.pull(job.spec.job_id, "operator").version == 0


def test_a_worker_cannot_push_as_another_in_a_sync_round(server: BackgroundServer) -> None:
    """The attack from issue 14: a worker's credential pushes w2's share of the round; refused, round open."""
    job = new_job(server)
    with client_with(server, AUTHORITY.mint_for("worker", "w1", job=job.spec.job_id)) as w1:
        assert w1.push(header(job.spec.job_id, "w1"), UPDATE).outcome is PushOutcome.BUFFERED
        before = state(server)
        with pytest.raises(PSError, match="w1"):
            w1.push(header(job.spec.job_id, "w2"), UPDATE)
        assert state(server) == before
    with client_with(server, AUTHORITY.mint_for("worker", "w2", job=job.spec.job_id)) as w2:
        assert w2.push(header(job.spec.job_id, "w2"), UPDATE).outcome is PushOutcome.APPLIED


def test_grpc_refuses_before_parsing_the_body(server: BackgroundServer) -> None:
    if server.cfg.transport != "grpc":
        pytest.skip("gRPC only")
    garbage = b"\xff\xff\xff\xff not a protobuf message"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/{wire.SERVICE}/PushUnary")
        with pytest.raises(grpc.RpcError) as err:
            call(garbage, timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        token = AUTHORITY.mint_for("worker", "w1", job="j")
        with pytest.raises(grpc.RpcError) as err:  # the same bytes, authenticated: now they are parsed
            call(garbage, timeout=5, metadata=(("authorization", f"Bearer {token}"),))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_unary(f"/{wire.SERVICE}/Push")
        with pytest.raises(grpc.RpcError) as err:
            stream(iter([garbage] * 3), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_grpc_reflection_is_off_by_default(server: BackgroundServer) -> None:
    if server.cfg.transport != "grpc":
        pytest.skip("gRPC only")
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_zmq_checks_the_token_frame_before_the_map_and_needs_curve(server: BackgroundServer) -> None:
    if server.cfg.transport != "zmq":
        pytest.skip("ZMQ only")
    with connect("zmq", server.address, timeout_s=1, credentials=PSCredentials(AUTHORITY.mint_for("admin"))) as c:
        with pytest.raises(PSError) as err:  # no CURVE key: the handshake never completes
            c.stats(None)
        assert err.value.code is ErrorCode.UNAVAILABLE
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.curve_serverkey = curve_key(server).encode()  # type: ignore[union-attr]
    sock.connect(f"tcp://{server.address}")
    try:
        before = state(server)
        sock.send_multipart([b"", b"forged-token", b"\xc1 not msgpack"])
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv_multipart()[1], raw=False)
        assert reply["error"] == "UNAUTHENTICATED" and reply["id"] is None
        token = AUTHORITY.mint_for("admin").encode()
        sock.send_multipart([b"", token, b"\xc1 not msgpack"])
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv_multipart()[1], raw=False)
        assert reply["error"] == "INVALID_ARGUMENT"  # authenticated, so the map was read (and refused)
        assert state(server) == before
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_grpc_tls_and_mutual_tls(tmp_path: Any, mutual: bool) -> None:
    """Certificates from `dist-llm-train certs`: a TLS client that trusts the CA gets in (with a client certificate
    when the PS asks for one); a plaintext client, or a TLS client without its certificate under mTLS, does not."""
    from dist_llm_train.paramserver.transport.certs import write_certificates

    write_certificates(tmp_path, ["localhost", "127.0.0.1"], ["worker"])
    cfg = ParamServerConfig(
        port=0, metrics_port=0, transport="grpc", cluster_secret=SECRET, tls_cert=str(tmp_path / "paramserver.pem"),
        tls_key=str(tmp_path / "paramserver.key"), tls_client_ca=str(tmp_path / "ca.pem") if mutual else None,
    )
    token = AUTHORITY.mint_for("controller", "controller")
    ca = str(tmp_path / "ca.pem")
    client_cert = {"tls_cert": str(tmp_path / "worker.pem"), "tls_key": str(tmp_path / "worker.key")}
    with BackgroundServer(cfg, with_metrics=False) as srv:
        good = PSCredentials(token=token, tls_ca=ca, **(client_cert if mutual else {}))
        with connect("grpc", srv.address, timeout_s=5, credentials=good) as c:
            assert c.stats(None) == []
        refused = [PSCredentials(token=token)]  # plaintext against a TLS port
        if mutual:
            refused.append(PSCredentials(token=token, tls_ca=ca))  # TLS, but no client certificate
        for creds in refused:
            with connect("grpc", srv.address, timeout_s=3, credentials=creds) as c, pytest.raises(PSError) as err:
                c.stats(None)
            assert err.value.code is ErrorCode.UNAVAILABLE
