"""The shaper service: every relay of a topology under one profile, in one asyncio process.

`dist-llm-train serve shaper --profile P --topology T.json` (or `python -m dist_llm_train.netem.userspace.shaper`,
which skips the CLI's imports) opens one relay per (link, traffic class), plays the profile's schedule on all of
them, and reports the ports it bound — as one JSON line on stdout and, atomically, in `--ports-out` — so a
launcher can hand each worker its per-class URLs. The same document carries the configured one-way links of
every relay (and of every schedule segment), which is what workers compare their measurements with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dist_llm_train.netem.backends import write_state_file
from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.resolve import to_one_way
from dist_llm_train.netem.profile.schema import Link, Profile, ProfileError
from dist_llm_train.netem.userspace.relay import Relay, TokenBucket, make_relay, rto_s
from dist_llm_train.netem.userspace.topology import LinkSpec, ShapingTopology, directions, load_topology

log = logging.getLogger(__name__)
BACKEND = "userspace"


SHAPER_NICE = -10
"""Nice value the shaper asks for: well above training (nice 0, or 10 when the launcher shapes a run)."""


def raise_priority(nice: int = SHAPER_NICE) -> dict[str, Any]:
    """Ask for a scheduling priority above the training processes, so that a busy CPU delays the relays'
    timers less (their lateness is link delay nobody configured). Not real-time: a relay forwarding a fast link
    can use a whole core, and at SCHED_FIFO it would starve everything else. Never fails: without the right
    (CAP_SYS_NICE) the priority stays as it was, and the returned record says so."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before > nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:
            log.info("shaper keeps nice %d (cannot raise its priority: %s)", before, err)
    now = os.getpriority(os.PRIO_PROCESS, 0)
    return {"nice": now, "raised": now < before, "wanted": nice}


def _json(link: Link) -> dict[str, Any]:
    return link.model_dump(mode="json")


class ShaperService:
    """Relays for every (link, class) of `topo`, shaped per `profile` (figures resolved to one-way)."""

    def __init__(self, profile: Profile, topo: ShapingTopology, host: str = "127.0.0.1", seed: str = "0") -> None:
        self.profile, self.topo, self.host, self.seed = profile, topo, host, seed
        self.entries: list[tuple[Relay, LinkSpec, TrafficClass]] = []
        one_way = to_one_way(profile)
        self.segments = list(one_way.schedule.segments) if one_way.schedule else []
        self.cycle = bool(one_way.schedule and one_way.schedule.kind == "cycle")
        self.started_at = 0.0
        self.segment = 0
        self._player: asyncio.Task[None] | None = None
        self.priority: dict[str, Any] = {}

    def _links(self, spec: LinkSpec, cls: TrafficClass, index: int | None) -> tuple[Link, Link]:
        seg = self.segments[index].link if index is not None else None
        return directions(self.profile, self.topo, spec, cls, seg)

    async def start(self) -> dict[str, Any]:
        """Bind every relay (ports chosen by the OS), apply the first schedule segment, start the schedule.

        Relays of one source node and class share that node's rate (one token bucket per direction): a worker
        pushing to P parameter-server shards at once has one uplink and one downlink, as a container has one
        interface, so P shards give it the bandwidth one PS would, not P times it. (The PS side's egress is
        modelled per worker, with shards as with one PS; `round_time.py` labels it.)"""
        first = 0 if self.segments else None
        shared: dict[tuple[str, str], tuple[TokenBucket, TokenBucket]] = {}
        try:
            for spec in self.topo.links:
                for cls in spec.classes:
                    up, down = self._links(spec, cls, first)
                    relay = make_relay(
                        f"{spec.name}/{cls}",
                        self.topo.target(spec.dst),
                        up,
                        down,
                        seed=f"{self.seed}:{spec.name}:{cls}",
                        host=self.host,
                    )
                    relay.buckets = shared.setdefault((spec.src, cls), relay.buckets)
                    self.entries.append((relay, spec, cls))
                    await relay.start()
        except OSError as err:
            await self.close()
            raise ProfileError(f"cannot open a relay on {self.host}: {err}") from None
        self.started_at = time.time()
        if self.segments:
            self._player = asyncio.get_running_loop().create_task(self._play())
        return self.info()

    async def _play(self) -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        while True:
            for i, seg in enumerate(self.segments):
                self.segment = i
                for relay, spec, cls in self.entries:
                    relay.set_links(*self._links(spec, cls, i))
                log.info("schedule segment %d (%s) for %gs", i, seg.label or "-", seg.duration_s)
                t += seg.duration_s
                await asyncio.sleep(max(0.0, t - loop.time()))
            if not self.cycle:
                return

    def info(self) -> dict[str, Any]:
        relays = []
        for relay, spec, cls in self.entries:
            up, down = self._links(spec, cls, None)
            entry: dict[str, Any] = {
                "link": spec.name,
                "src": spec.src,
                "dst": spec.dst,
                "traffic_class": cls,
                "listen": f"{relay.host}:{relay.port}",
                "target": self.topo.targets[spec.dst],
                "up": _json(up),
                "down": _json(down),
                "rto_s": rto_s((up.delay_ms + down.delay_ms) / 1000),
            }
            if self.segments:
                entry["segments"] = [
                    {"up": _json(u), "down": _json(d)}
                    for u, d in (self._links(spec, cls, i) for i in range(len(self.segments)))
                ]
            relays.append(entry)
        schedule = None
        if self.segments:
            schedule = {
                "kind": "cycle" if self.cycle else "segments",
                "started_at": self.started_at,
                "segments": [{"duration_s": s.duration_s, "label": s.label} for s in self.segments],
            }
        return {
            "backend": BACKEND,
            "loss": "modelled",
            "profile": self.profile.name,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "schedule": schedule,
            "priority": self.priority,
            "relays": relays,
        }

    def stats(self) -> list[dict[str, Any]]:
        return [relay.describe() for relay, _, _ in self.entries]

    async def close(self) -> None:
        if self._player is not None:
            self._player.cancel()
        await asyncio.gather(*(relay.close() for relay, _, _ in self.entries), return_exceptions=True)


async def serve(
    profile: Profile,
    topo: ShapingTopology,
    ports_out: Path | None = None,
    host: str = "127.0.0.1",
    seed: str = "0",
    pidfile: Path | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop`); the ports file and pidfile are removed on the way out."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = ShaperService(profile, topo, host, seed)
    service.priority = raise_priority()
    info = await service.start()
    try:
        if ports_out is not None:
            write_state_file(ports_out, info)  # atomically: the launcher polls for this file
        if pidfile is not None:
            tmp = pidfile.with_name(pidfile.name + ".tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, pidfile)
        print(json.dumps({"event": "ready", **info}), flush=True)
        await stop.wait()
        log.info("relay stats: %s", json.dumps(service.stats()))
    finally:
        await service.close()
        for p in (ports_out, pidfile):
            if p is not None:
                p.unlink(missing_ok=True)


def run(
    profile_spec: str,
    topology: Path,
    ports_out: Path | None = None,
    host: str = "127.0.0.1",
    seed: str = "0",
    profile_dir: str | None = None,
    pidfile: Path | None = None,
) -> None:
    """Load, validate and serve; raises ProfileError (naming the file and field) before opening anything."""
    profile = load_profile(profile_spec, profile_dir)
    topo = load_topology(topology)
    asyncio.run(serve(profile, topo, ports_out, host, seed, pidfile))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dist_llm_train.netem.userspace.shaper", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--profile", required=True, help="name, file, or inline JSON/YAML")
    ap.add_argument("--topology", required=True, type=Path, help="topology JSON (see netem/userspace/topology.py)")
    ap.add_argument("--ports-out", type=Path, help="write the bound ports and configured links here")
    ap.add_argument("--host", default="127.0.0.1", help="address the relays listen on")
    ap.add_argument("--seed", default="0", help="seed of the delay/loss draws (deterministic per connection)")
    ap.add_argument("--profile-dir")
    ap.add_argument("--pidfile", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        run(args.profile, args.topology, args.ports_out, args.host, args.seed, args.profile_dir, args.pidfile)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
