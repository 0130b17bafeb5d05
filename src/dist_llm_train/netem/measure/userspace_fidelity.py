"""Configured vs measured for the userspace backend, end to end through a real shaper process on loopback.

Each check starts the shaper service for a two-node topology (`a`, `b`; `b` is the last worker, so a straggler
override applies to it) whose relays forward to sinks in this process, and measures from outside: TCP probe
one-way delays and modelled loss (`tcp_probe.classify`), bulk goodput by least squares, and the times at which
a schedule's rate changes show up in the delivered bytes (judged with stats.py). The tests and
`benchmarks/shaping.py` share it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dist_llm_train.netem.measure import tcp_probe as tp
from dist_llm_train.netem.measure.stats import binomial_interval, delay_ok
from dist_llm_train.netem.profile.classes import TRAFFIC_CLASSES, TrafficClass
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.schema import Link
from dist_llm_train.netem.userspace.topology import LinkSpec, ShapingTopology

WORKERS = ["a", "b"]


@dataclass
class DelayLoss:
    profile: str
    link: str
    traffic_class: str
    configured_ms: float
    median_ms: float
    samples: int
    configured_loss: float
    measured_loss: float
    held: int
    missing: int

    @property
    def delay_ok(self) -> bool:
        return delay_ok(self.median_ms, self.configured_ms)

    @property
    def loss_ok(self) -> bool:
        """Stalled fraction inside the exact 99 % binomial interval of the configured one-way loss."""
        if self.samples <= 0:
            return False
        lo, hi = binomial_interval(self.samples, self.configured_loss)
        return lo <= self.measured_loss <= hi

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "delay_ok": self.delay_ok, "loss_ok": self.loss_ok, "loss_kind": "modelled"}


def _topology(sink_port: int, src: str, classes: list[TrafficClass]) -> ShapingTopology:
    return ShapingTopology(
        workers=WORKERS,
        targets={"sink": f"127.0.0.1:{sink_port}"},
        links=[LinkSpec(src=src, dst="sink", classes=classes)],
    )


async def delay_and_loss(
    profile: str,
    src: str = "a",
    classes: tuple[TrafficClass, ...] = ("ps_sync",),
    count: int = 2000,
    realtime: bool = False,
) -> list[DelayLoss]:
    """One-way delay (median of `count` − held − stalled probes) and modelled loss, per class, src → sink."""
    arrivals: dict[tuple[int, int], tuple[float, float]] = {}
    server, port = await tp.start_sink(lambda: tp.StampSink(arrivals))
    out = []
    try:
        async with tp.shaper_process(profile, _topology(port, src, list(classes)), realtime=realtime) as info:
            for cls in classes:
                arrivals.clear()
                entry = tp.relay_entry(info, f"{src}->sink", cls)
                up, down = Link.model_validate(entry["up"]), Link.model_validate(entry["down"])
                spacing, conns = tp.probe_plan(up.jitter_ms, count)
                settle = (up.delay_ms + down.delay_ms) / 1000 + 0.05
                sent = await tp.probe(
                    *tp.relay_address(info, f"{src}->sink", cls), count, spacing, conns, settle
                )
                await asyncio.sleep(entry["rto_s"] + (up.delay_ms + 6 * up.jitter_ms) / 1000 + 0.3)
                res = tp.classify(sent, arrivals, up.delay_ms, entry["rto_s"] * 1000)
                out.append(
                    DelayLoss(
                        profile,
                        f"{src}->sink",
                        cls,
                        up.delay_ms,
                        res.median_ms,
                        res.sent - res.held,
                        up.loss_pct / 100,
                        res.loss,
                        res.held,
                        res.missing,
                    )
                )
    finally:
        server.close()
    return out


def without_loss(profile: str) -> str:
    """The profile as inline JSON with every loss figure set to zero.

    Rate checks use it: a modelled loss stalls delivery by up to an RTO without changing what the bottleneck
    drains, and a stall at a window's edge would show up as a rate error that is not one (the kernel tests
    likewise meter bytes leaving the sender, before receiver-side loss)."""
    data = load_profile(profile).model_dump(mode="json", exclude_none=True)
    data["link"]["loss"] = {"model": "random", "pct": 0}
    blocks = [
        *data.get("classes", {}).values(),
        *(n[k] for n in data.get("nodes", {}).values() for k in ("link", "ingress") if n.get(k)),
        *(seg["link"] for seg in (data.get("schedule") or {}).get("segments", [])),
    ]
    for block in blocks:
        block.pop("loss", None)
    return json.dumps(data)


async def goodput(
    profile: str, src: str = "a", seconds: float = 3.0, warmup_s: float = 1.0, realtime: bool = False
) -> tuple[float | None, float]:
    """(configured one-way rate, measured goodput) in Mbit/s of one bulk TCP transfer src → sink, loss off."""
    timeline: list[tuple[float, int]] = []
    server, port = await tp.start_sink(lambda: tp.ByteSink(timeline))
    try:
        async with tp.shaper_process(
            without_loss(profile), _topology(port, src, ["ps_sync"]), realtime=realtime
        ) as info:
            up = Link.model_validate(tp.relay_entry(info, f"{src}->sink", "ps_sync")["up"])
            t0 = asyncio.get_running_loop().time()
            await tp.bulk(*tp.relay_address(info, f"{src}->sink", "ps_sync"), seconds + warmup_s)
            await asyncio.sleep(0.3)
    finally:
        server.close()
    return up.rate_mbit, tp.slope_mbit(timeline, t0 + warmup_s, t0 + warmup_s + seconds)


async def schedule_timeline(
    profile: str, seconds: float, realtime: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Bulk transfer through a scheduled profile: (s since the schedule began, cumulative bytes, info)."""
    timeline: list[tuple[float, int]] = []
    server, port = await tp.start_sink(lambda: tp.ByteSink(timeline))
    try:
        async with tp.shaper_process(profile, _topology(port, "a", ["ps_sync"]), realtime=realtime) as info:
            if not info.get("schedule"):
                raise ValueError(f"profile {profile} has no schedule")
            loop = asyncio.get_running_loop()
            t0 = info["schedule"]["started_at"] - (time.time() - loop.time())
            await tp.bulk(*tp.relay_address(info, "a->sink", "ps_sync"), seconds - (loop.time() - t0))
            await asyncio.sleep(0.3)
    finally:
        server.close()
    return (np.array([t - t0 for t, _ in timeline]), np.array([b for _, b in timeline], dtype=float), info)


def measure(*args: str, timeout_s: float = 120.0) -> Any:
    """Run `main` in a child process (real-time priority, real-time shaper, when root) and parse its line."""
    rt = tp.realtime_prefix(5)
    cmd = [*rt, sys.executable, "-m", __name__, *args, *(["--realtime"] if rt else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m dist_llm_train.netem.measure.userspace_fidelity delay|rate …`: one JSON line, for tests and benches
    that run the measuring side at real-time priority (`chrt`) like the kernel fidelity probes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("what", choices=("delay", "rate"))
    ap.add_argument("--profile", required=True)
    ap.add_argument("--src", default="a", choices=WORKERS)
    ap.add_argument("--classes", default="ps_sync", help="comma-separated traffic classes (delay)")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--realtime", action="store_true", help="run the shaper at real-time priority (root)")
    args = ap.parse_args(argv)
    if args.what == "delay":
        classes = tuple(c for c in args.classes.split(",") if c)
        bad = [c for c in classes if c not in TRAFFIC_CLASSES]
        if bad:
            ap.error(f"unknown traffic classes {bad}")
        res = asyncio.run(
            delay_and_loss(
                args.profile,
                args.src,
                classes,
                args.count,  # type: ignore[arg-type]
                args.realtime,
            )
        )
        print(json.dumps([r.to_json() for r in res]))
    else:
        configured, measured = asyncio.run(
            goodput(args.profile, args.src, args.seconds, realtime=args.realtime)
        )
        print(
            json.dumps(
                {
                    "profile": args.profile,
                    "src": args.src,
                    "configured_mbit": configured,
                    "measured_mbit": measured,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
