"""Parameter-server ingest throughput on loopback: raw TCP sink vs the gRPC PS vs the ZMQ PS.

Pushers send fixed-size updates (4, 16 and 64 MB of float32 by default) one after another, each
waiting for its reply, as a worker does: one pusher is one worker, two pushers are two workers
pushing to the same PS at once (each with its own connection), which is how a PS is loaded in a
real job. Every server runs in its own process. The raw TCP sink is the ceiling: it receives
length-prefixed messages into a reused buffer and acks each with one byte, doing nothing else (a
thread per connection); each PS row is compared with the sink fed by the same number of pushers
and the same size. The PS does everything it does in production: parse the header, validate
membership and size, decode and NaN-check the vector, check it against the per-update bound, apply
an SGD step (async mode) and reply. The job starts from parameters of the updates' scale, so these
honest updates are checked against the bound, not clipped.

The gRPC client pushes an update that fits under the message limit as one unary `PushUnary`
message (the default, rows `grpc`); `grpc_stream` is the same PS fed through the chunked
client-streaming `Push` that larger updates use. The servers run with the PS's allocator settings
(`paramserver.numerics.with_hugepage_malloc`). All rows run interleaved in one process, so every
ratio compares runs that saw the same machine load.

    python benchmarks/ps_throughput.py [--mb 4,16,64] [--pushers 1,2] [--count 40] [--repeats 3]

Writes results/ps_throughput.json and results/ps_throughput.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.experiments.machine import machine_info
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.numerics import hugepage_malloc_active, with_hugepage_malloc
from dist_llm_train.paramserver.transport.client import DEFAULT_MAX_MESSAGE_BYTES, PSClient, connect
from dist_llm_train.paramserver.transport.grpc_client import GrpcPSClient

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"grpc": 0.5, "zmq": 0.7}
QUICK_ARGS = ["--mb", "4,64", "--repeats", "1", "--count", "20"]
READY_TIMEOUT_S = 60.0
# Async mode, plain SGD: every push is decoded, checked and applied as soon as it arrives.
BENCH_SPEC = JobSpec.from_wire(WireJobSpec("bench", mode="async", optimizer="sgd", learning_rate=1e-6, momentum=0.0,
                     max_staleness=1_000_000, total_steps=10_000_000))  # fmt: skip

SINK = r"""
import socket, struct, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64)
print(srv.getsockname()[1], flush=True)
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20); head = bytearray(8)
    def fill(view):
        got = 0
        while got < len(view):
            n = conn.recv_into(view[got:])
            if n == 0:
                return False
            got += n
        return True
    while fill(memoryview(head)):
        (size,) = struct.unpack("<Q", head)
        if size > len(buf):
            buf = bytearray(size)
        if not fill(memoryview(buf)[:size]):
            return
        conn.sendall(b"k")
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
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


def pushed(senders: list[Callable[[], object]], count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    """Each sender (a pusher) sends `warmup` then up to `count` messages from its own thread, all starting
    together after their warm-ups (stopping early past the time budget): (messages sent after the warm-ups,
    seconds from the common start until the last pusher finished)."""
    start = threading.Barrier(len(senders) + 1)
    sent = [0] * len(senders)
    ends = [0.0] * len(senders)
    errors: list[BaseException] = []

    def pusher(i: int) -> None:
        try:
            for _ in range(warmup):
                senders[i]()
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        start.wait()
        t0 = time.perf_counter()
        try:
            while not errors and sent[i] < count and time.perf_counter() - t0 < budget_s:
                senders[i]()
                sent[i] += 1
        except BaseException as err:
            errors.append(err)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(len(senders))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(sent), max(ends) - t0


def bench_raw_tcp(payload: bytes, pushers: int, count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        head = struct.pack("<Q", len(payload))
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
                     for _ in range(pushers)]

            def sender(sock: socket.socket) -> Callable[[], None]:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def send_one() -> None:
                    sock.sendall(head)
                    sock.sendall(payload)
                    if sock.recv(1) != b"k":
                        raise RuntimeError("sink closed the connection")

                return send_one

            return pushed([sender(s) for s in socks], count, warmup, budget_s)
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
                return pushed([lambda: client.push(header, payload)], count, warmup, budget_s)
            zmq_client: Any = client
            return pushed([lambda: zmq_client._request("push", {"header": {}}, [payload])], count, warmup, budget_s)
    finally:
        proc.kill()
        proc.wait()


def start_params(n: int) -> np.ndarray:
    """Parameters of the updates' scale (norm ~ sqrt(n), as the updates'): honest updates stay under the PS's
    per-update bound (10x the parameters' norm during warm-up, then 10x the median update norm)."""
    return np.random.default_rng(1).standard_normal(n).astype(np.float32)


def bench_apply_only(payload: bytes, count: int, warmup: int, budget_s: float) -> tuple[int, float]:
    """The PS's own work per push (validate, decode, NaN check, bound, SGD step) without any transport."""
    n = len(payload) // 4
    store = ParameterStore(len(payload))
    store.init_job(BENCH_SPEC, [TensorSpec("w", (n,), 0)], start_params(n), ["bench"])
    state = {"step": 0, "version": 0}

    def send_one() -> None:
        header = PushHeader("bench", "bench", state["step"], state["version"], payload_bytes=len(payload))
        state["version"] = store.push(header, payload).version
        state["step"] += 1

    sent, secs = pushed([send_one], count, warmup, budget_s)
    assert store.stats("bench")[0].counters.get("updates_clipped", 0) == 0, "the bound clipped honest updates"
    return sent, secs


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


def ps_client(transport: str, port: int, chunk_bytes: int, grpc_unary: bool) -> PSClient:
    if transport == "grpc":
        return GrpcPSClient(f"127.0.0.1:{port}", 60, chunk_bytes=chunk_bytes,
                            max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, unary_push=grpc_unary)
    return connect(transport, f"127.0.0.1:{port}", timeout_s=60)


def bench_ps(
    transport: str,
    payload: bytes,
    pushers: int,
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
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(ps_client(transport, port, chunk_bytes, grpc_unary)) for _ in range(pushers)]
            _wait_ready(clients[0], proc)
            n = len(payload) // 4
            members = [f"bench{i}" for i in range(pushers)]
            clients[0].init_job(BENCH_SPEC, [TensorSpec("w", (n,), 0)], start_params(n), members)

            def sender(client: PSClient, worker: str) -> Callable[[], None]:
                step = itertools.count(1)

                def send_one() -> None:
                    header = PushHeader("bench", worker, next(step), 0, payload_bytes=len(payload))
                    result = client.push(header, payload)
                    if result.outcome is not PushOutcome.APPLIED:
                        raise RuntimeError(f"push not applied: {result}")

                return send_one

            out = pushed([sender(c, w) for c, w in zip(clients, members, strict=True)], count, warmup, budget_s)
            clipped = clients[0].stats("bench")[0].counters.get("updates_clipped", 0)
            assert clipped == 0, f"the bound clipped {clipped} honest updates"
            return out
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


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="4,16,64", help="update sizes in MB (float32 payload), comma-separated")
    ap.add_argument("--pushers", default="1,2", help="workers pushing at once (one connection each), comma-separated")
    ap.add_argument("--count", type=int, default=40, help="measured pushes per pusher and repeat")
    ap.add_argument("--warmup", type=int, default=10, help="pushes per pusher before timing (HTTP/2, allocator)")
    ap.add_argument("--repeats", type=int, default=3, help="the median repeat is reported")
    ap.add_argument("--budget-s", type=float, default=30.0, help="max seconds per pusher and repeat")
    ap.add_argument("--chunk-mb", type=float, default=4.0, help="gRPC stream chunk size (client and server)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if not hugepage_malloc_active():  # this process and the servers it starts: the PS's allocator settings
        os.execve(sys.executable, [sys.executable, *sys.argv], with_hugepage_malloc(os.environ))

    info = machine()  # before the runs, so the load average is the other processes' load
    chunk = int(args.chunk_mb * (1 << 20))
    sizes, pusher_counts = _numbers(args.mb, float), _numbers(args.pushers, int)
    rows: list[dict[str, Any]] = []
    for mb in sizes:
        n = int(mb * (1 << 20)) // 4
        payload = np.random.default_rng(0).standard_normal(n).astype("<f4").tobytes()
        # Smaller payloads repeat more often: every cell moves about the same number of bytes.
        count = max(4, round(args.count * 4 / mb))
        warmup = max(2, round(args.warmup * 4 / mb))
        runners: dict[tuple[str, int], Callable[[], tuple[int, float]]] = {}
        for k in pusher_counts:
            runners[("raw_tcp", k)] = partial(bench_raw_tcp, payload, k, count, warmup, args.budget_s)
            runners[("grpc", k)] = partial(bench_ps, "grpc", payload, k, count, warmup, args.budget_s, chunk)
            runners[("zmq", k)] = partial(bench_ps, "zmq", payload, k, count, warmup, args.budget_s, chunk)
        runners[("grpc_stream", 1)] = partial(
            bench_ps, "grpc", payload, 1, count, warmup, args.budget_s, chunk, grpc_unary=False
        )
        runners[("grpc_transport_only", 1)] = partial(bench_bare, "grpc", payload, count, warmup, args.budget_s, chunk)
        runners[("zmq_transport_only", 1)] = partial(bench_bare, "zmq", payload, count, warmup, args.budget_s, chunk)
        runners[("ps_apply_only", 1)] = partial(bench_apply_only, payload, count, warmup, args.budget_s)
        rates: dict[tuple[str, int], list[float]] = {key: [] for key in runners}
        for rep in range(args.repeats):  # interleaved, so load from other processes hits every sink alike
            for key, run in runners.items():
                sent, secs = run()
                rates[key].append(round(sent * len(payload) / secs / 1e6, 1))
            print(f"{mb:g} MB: repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        # The ceiling at this size: raw TCP's best median over the pusher counts (more pushing threads on two
        # cores can lower the sink's rate; a PS row must not look better for that).
        base = max(statistics.median(rates[("raw_tcp", k)]) for k in pusher_counts)
        for (sink, k), r in rates.items():
            ratio = statistics.median(r) / base
            target = TARGETS.get(sink)
            rows.append({
                "update_mb": mb,
                "pushers": k,
                "sink": sink,
                "mb_per_s": statistics.median(r),
                "repeats_mb_per_s": r,
                "ratio_vs_raw_tcp": round(ratio, 3),
                "target_ratio": target,
                "meets_target": None if target is None else ratio >= target,
            })
    result = {
        "update_mb": sizes,
        "pushers": pusher_counts,
        "count_per_pusher_at_4mb": args.count,
        "repeats": args.repeats,
        "grpc_chunk_bytes": chunk,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "machine": info,
        "results": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    lines = [
        "# Parameter-server ingest throughput (loopback)",
        "",
        f"Updates of {', '.join(f'{mb:g}' for mb in sizes)} MB (float32); {args.count} pushes per pusher and repeat "
        f"at 4 MB (proportionally fewer for bigger updates) after a warm-up; median of {args.repeats} interleaved "
        f"repeats; async mode, bound checked and SGD applied on every push; gRPC chunks {chunk >> 20} MiB; "
        f"GLIBC_TUNABLES={result['glibc_tunables']}. Machine: {info['nproc']} cores, {info['cpu_model']}, "
        f"Python {info['python']}, load average at start {info['loadavg']}.",
        "",
        "Each ratio is against raw TCP at the same size: the sink's best median over the pusher counts.",
        "",
        "| update | pushers | sink | MB/s | ratio vs raw TCP | target | met |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        goal = "" if row["target_ratio"] is None else f">= {row['target_ratio']}"
        met = "" if row["meets_target"] is None else ("yes" if row["meets_target"] else "no")
        lines.append(f"| {row['update_mb']:g} MB | {row['pushers']} | {row['sink']} | {row['mb_per_s']:.0f} | "
                     f"{row['ratio_vs_raw_tcp']:.2f} | {goal} | {met} |")
    lines += [
        "",
        "`grpc` pushes each update as one unary `PushUnary` message; `grpc_stream` is the same PS fed",
        "through the chunked client-streaming `Push` (used for updates over the message limit).",
        "Diagnostic rows (one pusher): `*_transport_only` push through a server with the same framing and",
        "no PS logic (the transport library's ceiling); `ps_apply_only` is the PS's own per-push work",
        "in-process (header checks, decode, NaN/Inf check, bound, SGD step) with no transport. With one",
        "pusher, PS time per push is roughly transport-only time + apply-only time, because the worker",
        "waits for each reply: the serial bound below is the rate one pusher could reach with no overhead",
        "besides the two. With more pushers, one update is received while another is applied.",
        "",
    ]
    for mb in sizes:
        cell = {(r["sink"], r["pushers"]): r for r in rows if r["update_mb"] == mb}
        base = max(r["mb_per_s"] for r in cell.values() if r["sink"] == "raw_tcp")
        for name in ("grpc", "zmq"):
            if (name, 1) not in cell:
                continue
            transport, apply = cell[(f"{name}_transport_only", 1)]["mb_per_s"], cell[("ps_apply_only", 1)]["mb_per_s"]
            bound = serial_bound(transport, apply)
            cell[(name, 1)]["serial_bound_mb_per_s"] = round(bound, 1)
            lines.append(f"- {mb:g} MB, {name}: serial bound {bound:.0f} MB/s = {bound / base:.2f} of raw TCP")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ps_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ps_throughput.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
