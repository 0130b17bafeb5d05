"""Aggregate parameter-server ingest with P shards: how it scales until the cores run out.

P parameter servers (real `dist-llm-train serve paramserver` processes on loopback) each hold one contiguous
slice of a flat vector (`core.sharding`); `--pushers` client threads, each with its own sharded client
(`paramserver.transport.sharded`), push full updates (default 4 MB = 1M float32) one after another, as workers
do, and every shard decodes, checks and applies its slice (async mode, SGD: applied on arrival). Aggregate ingest
is update bytes accepted per second of wall time, summed over the pushers.

The P = 1..max rows run interleaved in each repeat (the same servers, a fresh job per trial), so every ratio to
P = 1 compares runs under the same machine load. Each PS process is single-threaded Python for its maths: more
shards help only while there are idle cores for them (and for the pushers and the client's own slicing).

    python benchmarks/ps_shards.py [--max-shards 4] [--pushers 2] [--mb 4] [--seconds 3] [--repeats 3] [--quick]

Writes results/ps_shards.json and results/ps_shards.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.embedded.processes import free_port
from dist_llm_train.experiments.machine import machine_info
from dist_llm_train.paramserver.transport.client import PSClient, connect

ROOT = Path(__file__).resolve().parent.parent
QUICK_ARGS = ["--quick"]
READY_TIMEOUT_S = 60.0


def spec(job_id: str) -> JobSpec:
    """Async, plain SGD: every push is decoded, checked and applied as soon as it arrives on each shard."""
    return JobSpec.from_wire(WireJobSpec(job_id, mode="async", optimizer="sgd", learning_rate=1e-6, momentum=0.0,
                                         max_staleness=1_000_000, total_steps=10_000_000))


def start_servers(count: int, transport: str) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, addresses = [], []
    for _ in range(count):
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dist_llm_train", "serve", "paramserver", "--insecure", "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0", "--transport", transport, "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        addresses.append(f"127.0.0.1:{port}")
    for proc, address in zip(procs, addresses, strict=True):
        client = connect(transport, address, timeout_s=5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"PS at {address} exited with {proc.returncode}")
                try:
                    client.stats()
                    break
                except PSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"PS at {address} did not become ready") from None
                    time.sleep(0.1)
        finally:
            client.close()
    return procs, addresses


def trial(transport: str, addresses: list[str], job_id: str, payload: bytes, pushers: int,
          seconds: float) -> dict[str, float]:
    """Every pusher pushes back to back for `seconds`; bytes of the updates all shards applied, per second."""
    n = len(payload) // 4
    address = ",".join(addresses)
    clients: list[PSClient] = [connect(transport, address, timeout_s=60) for _ in range(pushers)]
    try:
        clients[0].init_job(spec(job_id), [TensorSpec("w", (n,), 0)], np.zeros(n, np.float32), [])
        applied = [0] * pushers
        errors: list[BaseException] = []
        start = threading.Barrier(pushers + 1)
        stop_at = [0.0]

        def push_loop(i: int) -> None:
            client, step, version = clients[i], 0, 0
            try:
                start.wait()
                while time.perf_counter() < stop_at[0]:
                    step += 1
                    header = PushHeader(job_id, f"p{i}", step, version, payload_bytes=len(payload))
                    result = client.push(header, payload)
                    if result.outcome is not PushOutcome.APPLIED:
                        raise RuntimeError(f"push not applied: {result}")
                    version = result.version
                    applied[i] += 1
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=push_loop, args=(i,)) for i in range(pushers)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        stop_at[0] = t0 + seconds
        start.wait()
        for t in threads:
            t.join(timeout=seconds + 120)
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"a pusher failed: {errors[0]}")
        pushes = sum(applied)
        return {"pushes": pushes, "wall_s": wall, "mb_per_s": pushes * len(payload) / wall / 1e6}
    finally:
        for c in clients:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-shards", type=int, default=4)
    ap.add_argument("--pushers", type=int, default=2, help="concurrent pushing clients (threads)")
    ap.add_argument("--mb", type=float, default=4.0, help="update size in MB")
    ap.add_argument("--seconds", type=float, default=3.0, help="pushing time per trial")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--transport", choices=["grpc", "zmq"], default="grpc")
    ap.add_argument("--quick", action="store_true", help="short trials (CI): 0.6 s each, 2 repeats")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeats = 0.6, 2
    if not 1 <= args.max_shards <= 64 or args.pushers < 1 or args.mb <= 0 or args.seconds <= 0 or args.repeats < 1:
        ap.error("need 1 <= --max-shards <= 64, --pushers >= 1, --mb > 0, --seconds > 0, --repeats >= 1")
    n = int(args.mb * 1e6 / 4)
    payload = np.random.default_rng(0).standard_normal(n).astype("<f4").tobytes()
    shard_counts = list(range(1, args.max_shards + 1))
    load_before = os.getloadavg()[0]
    procs, addresses = start_servers(args.max_shards, args.transport)
    samples: dict[int, list[float]] = {p: [] for p in shard_counts}
    try:
        for r in range(args.repeats):
            for p in shard_counts:  # interleaved: every P sees the same load within a repeat
                res = trial(args.transport, addresses[:p], f"r{r}-p{p}", payload, args.pushers, args.seconds)
                samples[p].append(res["mb_per_s"])
                print(f"repeat {r} P={p}: {res['mb_per_s']:.0f} MB/s ({res['pushes']} pushes)", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = statistics.median(samples[1])
    rows = [{"shards": p, "ingest_mb_per_s": statistics.median(samples[p]),
             "ratio_to_one_shard": statistics.median(samples[p]) / base, "samples_mb_per_s": samples[p]}
            for p in shard_counts]
    cores = os.cpu_count() or 1
    best = max(rows, key=lambda row: row["ingest_mb_per_s"])
    data: dict[str, Any] = {
        "benchmark": "ps_shards",
        "transport": args.transport,
        "update_mb": args.mb,
        "pushers": args.pushers,
        "seconds_per_trial": args.seconds,
        "repeats": args.repeats,
        "cores": cores,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "rows": rows,
        "best_shards": best["shards"],
        "best_ratio_to_one_shard": best["ratio_to_one_shard"],
        "machine": machine_info(),
        "note": "measured on a shared, busy machine; ratios are side by side within each repeat",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ps_shards.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Sharded parameter servers: aggregate ingest",
        "",
        f"{args.pushers} pushers, {args.mb:g} MB float32 updates over {args.transport}, async SGD applied on every "
        f"shard; {args.repeats} interleaved repeats of {args.seconds:g} s per P, median. {cores} cores, shared with "
        f"other work while measured (1-min load average {data['load_average_1m']['before']:.1f} before, "
        f"{data['load_average_1m']['after']:.1f} after): ratios are side by side, absolute MB/s are not portable.",
        "",
        "| PS shards | ingest MB/s (median) | ratio to 1 shard |",
        "|---:|---:|---:|",
        *(f"| {r['shards']} | {r['ingest_mb_per_s']:.0f} | {r['ratio_to_one_shard']:.2f} |" for r in rows),
        "",
        f"Best: {best['shards']} shard(s), {best['ratio_to_one_shard']:.2f}x one. Each shard is one Python process; "
        f"with {cores} cores shared by the shards, the pushers and the client's slicing, shards past the free cores "
        "only add scheduling and per-call overhead.",
        "",
    ]
    (args.out / "ps_shards.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
