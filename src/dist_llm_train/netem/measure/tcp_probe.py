"""Measuring the userspace backend from outside: one-way delays of TCP probes and goodput through its relays.

Used by the tests and `benchmarks/shaping.py`. A `StampSink` records when each probe frame arrives (same host,
same clock as the sender); `probe` spreads small frames over many connections, spaced so that TCP's in-order
delivery does not couple consecutive draws (a connection carries one probe per ≥ 6 σ of jitter); `ByteSink`
keeps the arrival timeline of a bulk transfer, and `slope_mbit` fits its rate by least squares, so a recovery
stall at the edge of the window does not bias the figure.

Classifying what a probe saw (`classify`): a probe delivered together with its predecessor was *held* by TCP
order behind a stalled one — its own draw is hidden, so it counts neither as a delay sample nor as a loss; a
probe later than the configured delay plus half the RTO was *stalled*: a modelled loss. Probes are sent at
most `MAX_PROBES_PER_S` in all, so the measuring process itself adds well under a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_llm_train.netem.userspace.topology import ShapingTopology

FRAME = struct.Struct("!IId")  # connection, sequence, send time (time.time())
FRAME_BYTES = 32
PAD = b"\0" * (FRAME_BYTES - FRAME.size)
MAX_PROBES_PER_S = 800


def probe_plan(jitter_ms: float, count: int) -> tuple[float, int]:
    """(spacing, connections): ≥ 6 σ between a connection's probes, ≤ MAX_PROBES_PER_S in all."""
    spacing = max(0.01, 6 * jitter_ms / 1000)
    return spacing, int(min(200, max(1, spacing * MAX_PROBES_PER_S), count))


class StampSink(asyncio.Protocol):
    """Arrival times of probe frames, per (connection, sequence)."""

    def __init__(self, arrivals: dict[tuple[int, int], tuple[float, float]]) -> None:
        self.arrivals = arrivals
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buf += data
        while len(self.buf) >= FRAME_BYTES:
            conn, seq, sent = FRAME.unpack_from(self.buf)
            self.buf = self.buf[FRAME_BYTES:]
            self.arrivals[(conn, seq)] = (sent, now)


class ByteSink(asyncio.Protocol):
    """(loop time, cumulative bytes) at every read of a bulk transfer."""

    def __init__(self, timeline: list[tuple[float, int]]) -> None:
        self.timeline = timeline
        self.total = 0

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        self.timeline.append((asyncio.get_running_loop().time(), self.total))


@dataclass
class ProbeResult:
    delays_ms: list[float] = field(default_factory=list)  # probes neither held nor stalled
    stalled: int = 0
    held: int = 0
    missing: int = 0
    sent: int = 0

    @property
    def loss(self) -> float:
        n = self.sent - self.held
        return self.stalled / n if n else math.nan

    @property
    def median_ms(self) -> float:
        d = sorted(self.delays_ms)
        if not d:
            return math.nan
        mid = len(d) // 2
        return d[mid] if len(d) % 2 else (d[mid - 1] + d[mid]) / 2


async def start_sink(factory: Any, host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(factory, host, 0)
    return server, int(server.sockets[0].getsockname()[1])


async def probe(
    host: str, port: int, count: int, spacing_s: float, connections: int, settle_s: float = 0.1
) -> dict[tuple[int, int], float]:
    """Send `count` frames over `connections` connections, each sending one per `spacing_s`, staggered evenly.

    Returns the send time of every frame; the sink at the relay's target records arrivals. `settle_s` waits
    after connecting so that the emulated handshake (one RTT) is over before the first probe.
    """
    per = -(-count // connections)
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]
    await asyncio.sleep(settle_s)
    sent: dict[tuple[int, int], float] = {}
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01

    async def one(i: int, writer: asyncio.StreamWriter) -> None:
        for seq in range(per):
            if i * per + seq >= count:
                return
            await asyncio.sleep(max(0.0, start + (seq + i / connections) * spacing_s - loop.time()))
            t = time.time()
            sent[(i, seq)] = t
            writer.write(FRAME.pack(i, seq, t) + PAD)

    try:
        await asyncio.gather(*(one(i, w) for i, (_, w) in enumerate(streams)))
    finally:
        for _, w in streams:
            with contextlib.suppress(OSError):
                w.close()
    return sent


def classify(
    sent: dict[tuple[int, int], float],
    arrivals: dict[tuple[int, int], tuple[float, float]],
    delay_ms: float,
    rto_ms: float,
    held_within_ms: float = 0.5,
) -> ProbeResult:
    res = ProbeResult(sent=len(sent))
    for conn, seq in sorted(sent):
        got = arrivals.get((conn, seq))
        if got is None:
            res.missing += 1
            continue
        delay = (got[1] - got[0]) * 1000
        prev = arrivals.get((conn, seq - 1))
        # Delivered together with its predecessor although sent a whole spacing later: TCP order held it back
        # behind a stalled probe (independent draws practically never coincide to half a millisecond).
        if prev is not None and (got[1] - prev[1]) * 1000 < held_within_ms:
            res.held += 1
        elif delay > delay_ms + rto_ms / 2:
            res.stalled += 1
        else:
            res.delays_ms.append(delay)
    return res


async def bulk(host: str, port: int, seconds: float, chunk: int = 1 << 16) -> int:
    """Write zeros as fast as the path takes them for `seconds`; returns bytes written."""
    reader, writer = await asyncio.open_connection(host, port)
    loop = asyncio.get_running_loop()
    end, buf, n = loop.time() + seconds, b"\0" * chunk, 0
    try:
        while loop.time() < end:
            writer.write(buf)
            n += chunk
            with contextlib.suppress(TimeoutError):  # a slow link must not stretch the run past `seconds`
                await asyncio.wait_for(writer.drain(), max(0.0, end - loop.time()))
    finally:
        writer.transport.abort()  # what is still queued would take long to drain at a low rate; not measured
    return n


def slope_mbit(timeline: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Least-squares rate (Mbit/s) of cumulative bytes over loop-time window [t0, t1]."""
    pts = [(t, b) for t, b in timeline if t0 <= t <= t1]
    if len(pts) < 3:
        return math.nan
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mb = sum(b for _, b in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    cov = sum((t - mt) * (b - mb) for t, b in pts)
    return cov / var * 8 / 1e6 if var > 0 else math.nan


@contextlib.asynccontextmanager
async def shaper_process(
    profile: str, topo: ShapingTopology, seed: str = "0", realtime: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Run the shaper service for `topo` in a child process; yields its ready document (ports, links).

    `realtime` runs it at a low real-time priority when allowed (root), as the kernel fallback's delayer runs,
    so that a measurement on a busy machine shows the shaper, not the scheduler."""
    with tempfile.TemporaryDirectory(prefix="dlt-shaper-") as tmp:
        path = Path(tmp) / "topology.json"
        path.write_text(topo.model_dump_json())
        log = Path(tmp) / "shaper.log"
        with open(log, "wb") as logf:
            proc = await asyncio.create_subprocess_exec(
                *(realtime_prefix(10) if realtime else []),
                sys.executable,
                "-m",
                "dist_llm_train.netem.userspace.shaper",
                "--profile",
                profile,
                "--topology",
                str(path),
                "--seed",
                seed,
                stdout=asyncio.subprocess.PIPE,
                stderr=logf,
            )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            if not line:
                await proc.wait()
                raise RuntimeError(
                    f"shaper exited ({proc.returncode}): {log.read_text(errors='replace')[-800:]}"
                )
            yield dict(json.loads(line))
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), timeout=10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def realtime_prefix(priority: int = 5) -> list[str]:
    """`chrt -f N` when this process may use real-time scheduling, else nothing."""
    return ["chrt", "-f", str(priority)] if shutil.which("chrt") and os.geteuid() == 0 else []


def relay_address(info: dict[str, Any], link: str, traffic_class: str) -> tuple[str, int]:
    for r in info["relays"]:
        if r["link"] == link and r["traffic_class"] == traffic_class:
            host, _, port = r["listen"].rpartition(":")
            return host, int(port)
    raise KeyError(f"no relay for {link} {traffic_class}")


def relay_entry(info: dict[str, Any], link: str, traffic_class: str) -> dict[str, Any]:
    return next(r for r in info["relays"] if r["link"] == link and r["traffic_class"] == traffic_class)
