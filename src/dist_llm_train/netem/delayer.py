"""NFQUEUE delayer: the kernel fallback's delay, jitter and bursty loss, plus its schedule player.

Runs as a daemon (`python -m dist_llm_train.netem.delayer --config C --pidfile P`) started by the
kernel_fallback backend inside the same network namespace. Packets arrive from an iptables NFQUEUE rule on the
*receiving* side's ingress (mangle PREROUTING); one asyncio loop reads the queue's fd without blocking and
releases each packet with `loop.call_at(due, pkt.accept)`. Why this shape: on the sender's egress TCP small
queues throttle a held flow to ~1 Mbit/s, and a thread per packet falls apart under the GIL (ENVIRONMENT.md).

Per packet: the class is read from the IPv4 TOS byte; the class's delay is drawn from its distribution (an
AR(1) process gives netem-style correlation); Gilbert–Elliott or correlated loss, which iptables `statistic`
cannot express, is decided here. The pidfile is written only once the queue is bound, so `apply` returning means
shaping is live.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_llm_train.netem.classes import class_of_ipv4_packet


@dataclass
class ClassShaper:
    """Delay sampler and loss state for one traffic class."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    distribution: str = "normal"
    correlation: float = 0.0
    loss: dict[str, Any] | None = None
    rng: random.Random = field(default_factory=random.Random)
    _z: float = 0.0
    _bad: bool = False
    _last_lost: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], seed: int) -> ClassShaper:
        return cls(cfg.get("delay_ms", 0.0), cfg.get("jitter_ms", 0.0), cfg.get("distribution", "normal"),
                   cfg.get("delay_correlation_pct", 0.0) / 100.0, cfg.get("loss"), random.Random(seed))

    def _standard(self) -> float:
        if self.distribution == "uniform":
            return self.rng.uniform(-math.sqrt(3), math.sqrt(3))
        if self.distribution == "pareto" or (self.distribution == "paretonormal" and self.rng.random() < 0.25):
            return (self.rng.paretovariate(3.0) - 1.5) / math.sqrt(0.75)  # Pareto(α=3) scaled to mean 0, sd 1
        return self.rng.gauss(0.0, 1.0)

    def delay_s(self) -> float:
        if not self.jitter_ms:
            return self.delay_ms / 1000.0
        rho = self.correlation
        self._z = rho * self._z + math.sqrt(1 - rho * rho) * self._standard()
        return max(0.0, self.delay_ms + self.jitter_ms * self._z) / 1000.0

    def lost(self) -> bool:
        spec = self.loss
        if not spec:
            return False
        if spec["model"] == "gilbert_elliott":
            if self._bad and self.rng.random() < spec["r_pct"] / 100.0:
                self._bad = False
            elif not self._bad and self.rng.random() < spec["p_pct"] / 100.0:
                self._bad = True
            p = (spec["bad_loss_pct"] if self._bad else spec["good_loss_pct"]) / 100.0
            return self.rng.random() < p
        # Correlated random loss: with probability ρ repeat the previous outcome (netem's semantics).
        rho = spec.get("correlation_pct", 0.0) / 100.0
        if self.rng.random() < rho:
            return self._last_lost
        self._last_lost = self.rng.random() < spec["pct"] / 100.0
        return self._last_lost


class Delayer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.shapers: dict[str, ClassShaper] = {}
        self.load_classes(config["classes"])
        self.stats = {"packets": 0, "dropped": 0}
        self.lateness = 0.0  # EWMA of how late release timers fire, subtracted from the next ones

    def load_classes(self, classes: dict[str, dict[str, Any]]) -> None:
        seed = int(self.config.get("seed", 0))
        self.shapers = {name: ClassShaper.from_config(c, seed + i) for i, (name, c) in enumerate(classes.items())}

    def on_packet(self, pkt: Any) -> None:
        loop = asyncio.get_running_loop()
        self.stats["packets"] += 1
        tc = class_of_ipv4_packet(pkt.get_payload()[:2])
        shaper = self.shapers.get(tc or "default") or self.shapers["default"]
        if shaper.lost():
            self.stats["dropped"] += 1
            pkt.drop()
            return
        delay = shaper.delay_s()
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
        """Cycle (or play once) through segments: run each one's tc commands and swap the class shapers."""
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
