"""Parameter-server ingest throughput on loopback: raw TCP sink vs the gRPC PS vs the ZMQ PS.

One client pushes fixed-size updates (default 4 MB = 1M float32) one after another, each
waiting for its reply, as a worker does. Every server runs in its own process, so client
and server each get a core. The raw TCP sink is the ceiling: it receives length-prefixed
messages into a reused buffer and acks each with one byte, doing nothing else. The PS does
everything it does in production: parse the header, validate membership and size, decode
and NaN-check the vector, apply an SGD step (async mode) and reply.

The gRPC client pushes an update that fits under the message limit as one unary
`PushUnary` message (the default, row `grpc`); row `grpc_stream` is the same PS fed through
the chunked client-streaming `Push` that larger updates use. All rows run interleaved in
one process, so every ratio compares runs that saw the same machine load.

    python benchmarks/ps_throughput.py [--mb 4] [--count 40] [--repeats 3]

Writes results/ps_throughput.json and results/ps_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.experiments.machine import machine_info
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.transport.client import DEFAULT_MAX_MESSAGE_BYTES, PSClient, connect
from dist_llm_train.paramserver.transport.grpc_client import GrpcPSClient

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"grpc": 0.5, "zmq": 0.7}
READY_TIMEOUT_S = 60.0
# Async mode, plain SGD: every push is decoded, checked and applied as soon as it arrives.
BENCH_SPEC = JobSpec.from_wire(WireJobSpec("bench", mode="async", optimizer="sgd", learning_rate=1e-6, momentum=0.0,
                     max_staleness=1_000_000, total_steps=10_000_000))  # fmt: skip

SINK = r"""
import socket, struct, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(1 << 20); head = bytearray(8)
def fill(view):
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            sys.exit(0)
        got += n
while True:
    fill(memoryview(head))
    (size,) = struct.unpack("<Q", head)
    if size > len(buf):
        buf = bytearray(size)
    fill(memoryview(buf)[:size])
    conn.sendall(b"k")
"""

# Transport-only servers: the same framing as the PS, no PS logic. They show how much of the
# gap to raw TCP is the transport library and how much is the PS's own work.
BARE_ZMQ = r"""
import msgpack, zmq
from dist_llm_train.paramserver.numerics import keep_freed_vectors
keep_freed_vectors()  # the same allocator policy as the PS process
ctx = zmq.Context(); sock = ctx.socket(zmq.ROUTER)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    frames = sock.recv_multipart(copy=False)
    request = msgpack.unpackb(frames[2].buffer)
    reply = msgpack.packb({"id": request["id"], "bytes": len(frames[3].buffer)})
    sock.send_multipart([frames[0], b"", reply])
"""

BARE_GRPC = r"""
import asyncio, grpc
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.paramserver.numerics import keep_freed_vectors
from dist_llm_train.proto import paramserver_pb2 as pb
keep_freed_vectors()  # the same allocator policy as the PS process
async def push(requests, context):
    n = 0
    async for msg in requests:
        n += len(msg) if isinstance(msg, memoryview) else 0
    return pb.PushResponse(outcome=pb.APPLIED, version=n)
async def push_unary(request, context):
    header, data = request
    return pb.PushResponse(outcome=pb.APPLIED, version=len(data))
async def main():
    server = grpc.aio.server(options=wire.channel_options(512 << 20))
    handlers = {
        "Push": grpc.stream_unary_rpc_method_handler(
            push, request_deserializer=wire.chunk_deserializer(pb.PushChunk),
            response_serializer=pb.PushResponse.SerializeToString),
        "PushUnary": grpc.unary_unary_rpc_method_handler(
            push_unary, request_deserializer=wire.push_request_deserializer,
            response_serializer=pb.PushResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(wire.SERVICE, handlers),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""

PS = r"""
import asyncio, sys
from dist_llm_train.config import ParamServerConfig
from dist_llm_train.paramserver.server import serve
asyncio.run(serve(ParamServerConfig(port=int(sys.argv[1]), metrics_port=0, transport=sys.argv[2],
                                    chunk_bytes=int(sys.argv[3]))))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(send_one: Callable[[], object], count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    """Send `warmup` then up to `count` messages (stopping early past the time budget)."""
    for _ in range(warmup):
        send_one()
    sent = 0
    start = time.perf_counter()
    while sent < count and time.perf_counter() - start < budget_s:
        send_one()
        sent += 1
    return sent, time.perf_counter() - start


def bench_raw_tcp(payload: bytes, count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = struct.pack("<Q", len(payload))

            def send_one() -> None:
                sock.sendall(head)
                sock.sendall(payload)
                if sock.recv(1) != b"k":
                    raise RuntimeError("sink closed the connection")

            return timed(send_one, count, warmup, budget_s)
    finally:
        proc.kill()
        proc.wait()


def bench_bare(
    transport: str, payload: bytes, count: int, warmup: int, budget_s: float, chunk_bytes: int
) -> tuple[int, float]:
    """Push through a transport-only server with the real client's framing."""
    script = BARE_GRPC if transport == "grpc" else BARE_ZMQ
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        header = PushHeader("bench", "bench", 0, 0, payload_bytes=len(payload))
        with connect(transport, f"127.0.0.1:{port}", timeout_s=60, chunk_bytes=chunk_bytes) as client:
            if transport == "grpc":
                return timed(lambda: client.push(header, payload), count, warmup, budget_s)
            zmq_client: Any = client
            return timed(lambda: zmq_client._request("push", {"header": {}}, [payload]), count, warmup, budget_s)
    finally:
        proc.kill()
        proc.wait()


def bench_apply_only(payload: bytes, count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    """The PS's own work per push (validate, decode, NaN check, SGD step) without any transport."""
    n = len(payload) // 4
    store = ParameterStore(len(payload))
    store.init_job(BENCH_SPEC, [TensorSpec("w", (n,), 0)], np.zeros(n, np.float32), ["bench"])
    state = {"step": 0, "version": 0}

    def send_one() -> None:
        header = PushHeader("bench", "bench", state["step"], state["version"], payload_bytes=len(payload))
        state["version"] = store.push(header, payload).version
        state["step"] += 1

    return timed(send_one, count, warmup, budget_s)


def _wait_ready(client: PSClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"PS exited with {proc.returncode}")
        try:
            client.stats()
            return
        except PSError:
            time.sleep(0.1)
    raise TimeoutError("PS did not become ready")


def bench_ps(
    transport: str,
    payload: bytes,
    count: int,
    warmup: int,
    budget_s: float,
    chunk_bytes: int,
    *,
    grpc_unary: bool = True,
) -> tuple[int, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", PS, str(port), transport, str(chunk_bytes)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client: PSClient = (
            GrpcPSClient(
                f"127.0.0.1:{port}",
                60,
                chunk_bytes=chunk_bytes,
                max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                unary_push=grpc_unary,
            )
            if transport == "grpc"
            else connect(transport, f"127.0.0.1:{port}", timeout_s=60)
        )
        with client:
            _wait_ready(client, proc)
            n = len(payload) // 4
            client.init_job(BENCH_SPEC, [TensorSpec("w", (n,), 0)], np.zeros(n, np.float32), ["bench"])
            state = {"step": 0, "version": 0}

            def send_one() -> None:
                header = PushHeader("bench", "bench", state["step"], state["version"], payload_bytes=len(payload))
                result = client.push(header, payload)
                if result.outcome is not PushOutcome.APPLIED:
                    raise RuntimeError(f"push not applied: {result}")
                state["step"] += 1
                state["version"] = result.version

            return timed(send_one, count, warmup, budget_s)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serial_bound(transport_mb_per_s: float, apply_mb_per_s: float) -> float:
    """Throughput when each push costs its transport time plus its apply time, one after the other."""
    return 1.0 / (1.0 / transport_mb_per_s + 1.0 / apply_mb_per_s)


def machine() -> dict[str, object]:
    info = machine_info()
    return {**info, "nproc": info["cores"], "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="update size in MB (float32 payload)")
    ap.add_argument("--count", type=int, default=40, help="measured pushes per repeat")
    ap.add_argument("--warmup", type=int, default=20, help="pushes before timing (HTTP/2 windows, allocator)")
    ap.add_argument("--repeats", type=int, default=5, help="the median repeat is reported")
    ap.add_argument("--budget-s", type=float, default=60.0, help="max seconds per repeat")
    ap.add_argument("--chunk-mb", type=float, default=4.0, help="gRPC stream chunk size (client and server)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    info = machine()  # before the runs, so the load average is the other processes' load
    n = int(args.mb * (1 << 20)) // 4
    payload = np.random.default_rng(0).standard_normal(n).astype("<f4").tobytes()
    chunk = int(args.chunk_mb * (1 << 20))
    runners: dict[str, Callable[[], tuple[int, float]]] = {
        "raw_tcp": lambda: bench_raw_tcp(payload, args.count, args.warmup, args.budget_s),
        "grpc": lambda: bench_ps("grpc", payload, args.count, args.warmup, args.budget_s, chunk),
        "zmq": lambda: bench_ps("zmq", payload, args.count, args.warmup, args.budget_s, chunk),
        "grpc_stream": lambda: bench_ps(
            "grpc", payload, args.count, args.warmup, args.budget_s, chunk, grpc_unary=False
        ),
        "grpc_transport_only": lambda: bench_bare("grpc", payload, args.count, args.warmup, args.budget_s, chunk),
        "zmq_transport_only": lambda: bench_bare("zmq", payload, args.count, args.warmup, args.budget_s, chunk),
        "ps_apply_only": lambda: bench_apply_only(payload, args.count, args.warmup, args.budget_s),
    }
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits every sink alike
        for name, run in runners.items():
            sent, secs = run()
            rates[name].append(round(sent * len(payload) / secs / 1e6, 1))
    base = statistics.median(rates["raw_tcp"])
    rows: dict[str, dict[str, Any]] = {}
    for name, r in rates.items():
        ratio = statistics.median(r) / base
        target = TARGETS.get(name)
        rows[name] = {
            "mb_per_s": statistics.median(r),
            "repeats_mb_per_s": r,
            "ratio_vs_raw_tcp": round(ratio, 3),
            "target_ratio": target,
            "meets_target": None if target is None else ratio >= target,
        }
    result = {
        "update_bytes": len(payload),
        "count": args.count,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "grpc_chunk_bytes": chunk,
        "machine": info,
        "results": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    lines = [
        "# Parameter-server ingest throughput (loopback)",
        "",
        f"{len(payload) / 1e6:.1f} MB updates, {args.count} pushes per repeat after {args.warmup} warm-up, "
        f"median of {args.repeats} interleaved repeats; async mode, SGD applied on every push; gRPC chunks "
        f"{chunk >> 20} MiB. Machine: {info['nproc']} cores, {info['cpu_model']}, Python {info['python']}, "
        f"load average at start {info['loadavg']}.",
        "",
        "| sink | MB/s | ratio vs raw TCP | target |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        goal = "" if row["target_ratio"] is None else f">= {row['target_ratio']}"
        lines.append(f"| {name} | {row['mb_per_s']:.0f} | {row['ratio_vs_raw_tcp']:.2f} | {goal} |")
    lines += [
        "",
        "`grpc` pushes each update as one unary `PushUnary` message; `grpc_stream` is the same PS fed",
        "through the chunked client-streaming `Push` (used for updates over the message limit).",
        "Diagnostic rows: `*_transport_only` push through a server with the same framing and no PS logic",
        "(the transport library's ceiling); `ps_apply_only` is the PS's own per-push work in-process",
        "(header checks, decode, NaN/Inf check, SGD step) with no transport. Per push, PS time is roughly",
        "transport-only time + apply-only time, because a worker waits for each reply: the serial bound",
        "below is the rate the PS would reach with no overhead besides the two.",
        "",
    ]
    apply_rate = rows["ps_apply_only"]["mb_per_s"]
    for name in ("grpc", "zmq"):
        bound = serial_bound(rows[f"{name}_transport_only"]["mb_per_s"], apply_rate)
        result["results"][name]["serial_bound_mb_per_s"] = round(bound, 1)
        lines.append(f"- {name}: serial bound {bound:.0f} MB/s = {bound / base:.2f} of raw TCP")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ps_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ps_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
