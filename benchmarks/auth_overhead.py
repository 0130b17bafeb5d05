"""What authentication costs: token verification, and PS round trips with auth off vs on, side by side.

For each transport, one in-process PS without a secret and one with (tokens checked on every call; ZMQ
also runs CURVE), on loopback. Each point is the median of `--calls` timed calls after a warm-up:
`stats` of one job (a small request: the fixed cost of the check) and a push of a `--params`-float update
to an async job (where CURVE's encryption of the payload shows). Off and on are measured three times, interleaved,
keeping each one's lower median. Bounded: a few thousand calls in all.

    python benchmarks/auth_overhead.py [--calls 300] [--params 262144] [--out results]

Writes results/auth_overhead.json and results/auth_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.credentials import TokenAuthority, generate_secret
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport.client import PSClient, connect
from dist_llm_train.paramserver.transport.security import PSCredentials, curve_keypair

ROOT = Path(__file__).resolve().parent.parent


def _median_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(min(20, calls)):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _measure(transport: str, secret: str | None, calls: int, n: int) -> dict[str, float]:
    cfg = ParamServerConfig(port=0, metrics_port=0, transport=transport, cluster_secret=secret)
    job_id = "bench"
    creds = None
    if secret is not None:
        authority = TokenAuthority(secret)
        curve = curve_keypair(authority.curve_seed)[0].decode() if transport == "zmq" else None
        creds = PSCredentials(token=authority.mint_for("worker", "w1", job=job_id), curve_server_key=curve)
    with BackgroundServer(cfg, with_metrics=False) as srv:
        client: PSClient = connect(transport, srv.address, timeout_s=30, credentials=creds)
        with client:
            spec = JobSpec.from_wire(WireJobSpec(job_id=job_id, mode="async", max_staleness=1 << 30,
                                                 optimizer="sgd", learning_rate=1e-6, total_steps=1 << 40))
            client.init_job(spec, [TensorSpec("w", (n,), 0)], np.zeros(n, np.float32), ["w1"])
            payload = np.full(n, 1e-3, dtype="<f4").tobytes()
            step = iter(range(1, 1 << 40))

            def push() -> None:
                header = PushHeader(job_id=job_id, worker_id="w1", step=next(step), base_version=0,
                                    payload_bytes=len(payload))
                client.push(header, payload)

            return {
                "stats_us": _median_us(lambda: client.stats(job_id), calls),
                "push_us": _median_us(push, max(calls // 5, 10)),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--params", type=int, default=262_144)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    secret = generate_secret()
    authority = TokenAuthority(secret)
    token = authority.mint_for("worker", "w1", job="bench")
    verify_us = _median_us(lambda: authority.verify(token), 5000)
    rows = []
    for transport in ("grpc", "zmq"):
        # Off and on interleaved, three times, keeping each one's lower median: the machine is shared, and a burst of
        # load during one measurement would otherwise read as a cost (or a saving) of auth.
        rounds = [(_measure(transport, None, args.calls, args.params), _measure(transport, secret, args.calls,
                                                                               args.params)) for _ in range(3)]
        off = {k: min(r[0][k] for r in rounds) for k in rounds[0][0]}
        on = {k: min(r[1][k] for r in rounds) for k in rounds[0][1]}
        for what in ("stats_us", "push_us"):
            rows.append({"transport": transport, "call": what.removesuffix("_us"), "auth_off_us": off[what],
                         "auth_on_us": on[what], "ratio": on[what] / off[what]})
    result = {"verify_us": verify_us, "params": args.params, "calls": args.calls, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auth_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Authentication overhead (benchmarks/auth_overhead.py)",
        "",
        f"Token verification (HMAC-SHA256 + JSON claims): {verify_us:.1f} µs median. "
        f"Push: {args.params} float32 ({args.params * 4 / 1e6:.1f} MB), async job, loopback; medians.",
        "",
        "| transport | call | auth off (µs) | auth on (µs) | on / off |",
        "|---|---|---:|---:|---:|",
        *[f"| {r['transport']} | {r['call']} | {r['auth_off_us']:.0f} | {r['auth_on_us']:.0f} | {r['ratio']:.2f} |"
          for r in rows],
        "",
    ]
    (args.out / "auth_overhead.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
