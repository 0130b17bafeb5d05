"""NFQUEUE delayer: the kernel fallback's delay, jitter and bursty loss, plus its schedule player.

Runs as a daemon (`python -m dist_llm_train.netem.kernel.delayer --config C --pidfile P`) started by the
kernel_fallback backend inside the same network namespace. Packets arrive from an iptables NFQUEUE rule on the
*receiving* side's ingress (mangle PREROUTING); one asyncio loop reads the queue's fd without blocking and
releases each packet with `loop.call_at(due, pkt.accept)`. Why this shape: on the sender's egress TCP small
queues throttle a held flow to ~1 Mbit/s, and a thread per packet falls apart under the GIL (ENVIRONMENT.md).

Per packet: the class is read from the IPv4 TOS byte; the class's delay is drawn from its distribution (an
AR(1) process gives netem-style correlation, see netem/sampling.py); Gilbert–Elliott or correlated loss, which
iptables `statistic` cannot express, is decided here. The pidfile is written only once the queue is bound, so
`apply` returning means shaping is live.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dist_llm_train.netem.profile.classes import class_of_ipv4_packet
from dist_llm_train.netem.sampling import LinkSampler


class Delayer:
    """Holds each queued packet for its class's drawn delay (or drops it), and plays the profile's schedule."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.samplers: dict[str, LinkSampler] = {}
        self.load_classes(config["classes"])
        self.stats = {"packets": 0, "dropped": 0}
        self.lateness = 0.0  # EWMA of how late release timers fire, subtracted from the next ones

    def load_classes(self, classes: dict[str, dict[str, Any]]) -> None:
        seed = int(self.config.get("seed", 0))
        self.samplers = {name: LinkSampler.from_config(c, seed + i) for i, (name, c) in enumerate(classes.items())}

    def on_packet(self, pkt: Any) -> None:
        loop = asyncio.get_running_loop()
        self.stats["packets"] += 1
        tc = class_of_ipv4_packet(pkt.get_payload()[:2])
        sampler = self.samplers.get(tc or "default") or self.samplers["default"]
        if sampler.lost():
            self.stats["dropped"] += 1
            pkt.drop()
            return
        delay = sampler.delay_s()
        now = loop.time()
        # Count the delay from when the kernel queued the packet, not from when this loop got round to it.
        # The skb stamp may be unset or in another clock (veth keeps the sender's EDT stamp): trust it only when
        # it is a plausible recent wall-clock time.
        ts = pkt.get_timestamp()
        age = time.time() - ts if ts else -1.0
        queued_for = min(age, delay) if 0.0 <= age < 0.1 else 0.0
        due = now + delay - queued_for
        if delay <= 0 or due - self.lateness <= now:
            pkt.accept()
        else:
            loop.call_at(due - self.lateness, self._release, pkt, due)

    def _release(self, pkt: Any, due: float) -> None:
        """Accept and learn how late timers fire (epoll rounds timeouts up to whole ms) to fire earlier next time."""
        pkt.accept()
        late = asyncio.get_running_loop().time() - due
        self.lateness = min(max(self.lateness + 0.05 * late, 0.0), 0.005)

    def _record_segment(self, started_at: float, index: int) -> None:
        """Where the schedule is (wall clock), for `describe` and for tests that time the segments."""
        path = self.config.get("schedule_file")
        if path:
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            tmp.write_text(json.dumps({"started_at": started_at, "segment": index, "at": time.time()}))
            os.replace(tmp, path)

    async def play_schedule(self) -> None:
        """Cycle (or play once) through segments: run each one's tc commands and swap the class samplers."""
        sched = self.config.get("schedule")
        if not sched:
            return
        segments, cycle = sched["segments"], sched["kind"] == "cycle"
        loop = asyncio.get_running_loop()
        t = loop.time()
        started_at = time.time()
        while True:
            for i, seg in enumerate(segments):
                for cmd in seg["commands"]:
                    await asyncio.to_thread(subprocess.run, cmd, capture_output=True, check=False, timeout=10)
                self.load_classes(seg["classes"])
                self._record_segment(started_at, i)
                t += seg["duration_s"]
                await asyncio.sleep(max(0.0, t - loop.time()))
            if not cycle:
                return


async def serve(config: dict[str, Any], pidfile: Path | None) -> None:
    from netfilterqueue import NetfilterQueue  # imported here: the module is optional ([netem] extra)

    delayer = Delayer(config)
    _realtime()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nfq = NetfilterQueue()
    queue = config.get("queue")
    if queue is not None:
        nfq.bind(int(queue), delayer.on_packet, max_len=int(config.get("max_len", 8192)))
        loop.add_reader(nfq.get_fd(), lambda: nfq.run(block=False))
    if pidfile is not None:
        tmp = pidfile.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, pidfile)
    player = asyncio.create_task(delayer.play_schedule())
    try:
        await stop.wait()
    finally:
        player.cancel()
        if queue is not None:
            loop.remove_reader(nfq.get_fd())
            nfq.unbind()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)


def _realtime() -> None:
    """Run like the kernel code it stands in for: a low real-time priority, so that CPU contention from the
    workload does not turn into extra link delay (falls back to a high nice priority, then to nothing)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(-10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--pidfile", type=Path)
    args = ap.parse_args(argv)
    config = json.loads(args.config.read_text())
    try:
        asyncio.run(serve(config, args.pidfile))
    except OSError as err:
        print(f"delayer: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
