"""The no-root backend: asyncio TCP relays per (link, traffic class) — what embedded mode uses.

Kernel backends shape an interface; this one shapes the links of a *topology* (userspace/topology.py): its `dev`
argument is the path of a topology JSON file, and `node`/`workers` come from that file. `apply` starts the
shaper service (userspace/shaper.py) as a daemon with a pidfile and returns once every relay listens; the chosen
ports are in the state directory (`describe` shows them); `clear` stops it. In embedded mode the launcher runs
the same service as a child instead (`dist-llm-train serve shaper`).

Classes are told apart by port — each class has its own relay — so no DSCP mark is needed here. Loss is
modelled as recovery stalls (userspace/relay.py) and reported as "modelled" everywhere. Duplicate, reorder and corrupt
have no effect a TCP application could see and are listed under `not_emulated`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dist_llm_train.netem.backends import (
    ShapingBackend,
    ShapingError,
    read_state_file,
    reap,
    register,
    runs_module,
    state_dir,
    write_state_file,
)
from dist_llm_train.netem.profile.resolve import to_one_way
from dist_llm_train.netem.profile.schema import Profile, ProfileError
from dist_llm_train.netem.userspace.topology import ShapingTopology, directions, load_topology, summarise

SERVICE_MODULE = "dist_llm_train.netem.userspace.shaper"
NOT_EMULATED = ("duplicate_pct", "reorder_pct", "corrupt_pct")


def is_topology_spec(dev: str) -> bool:
    """True when a `--dev` argument names a topology file rather than an interface."""
    return dev.endswith(".json") or os.sep in dev


def _key(dev: str) -> str:
    return "userspace-" + hashlib.sha1(str(Path(dev).resolve()).encode()).hexdigest()[:12]


def _paths(dev: str) -> dict[str, Path]:
    base = state_dir() / _key(dev)
    return {s: base.with_name(base.name + s) for s in (".json", ".ports.json", ".pid", ".log")}


@register
class UserspaceBackend(ShapingBackend):
    name = "userspace"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return True, (
            "asyncio TCP relays on loopback: no root or kernel support needed; shapes only the "
            "connections it relays, loss modelled as recovery stalls"
        )

    def _topology(self, dev: str) -> ShapingTopology:
        if not is_topology_spec(dev):
            raise ShapingError(
                f"the userspace backend shapes a topology, not an interface: give --dev "
                f"TOPOLOGY.json (got {dev!r})"
            )
        try:
            return load_topology(dev)
        except ProfileError as err:
            raise ShapingError(str(err)) from None

    def plan(
        self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None
    ) -> list[list[str]]:
        topo = self._topology(dev)
        out: list[list[str]] = []
        for spec in topo.links:
            for cls in spec.classes:
                up, down = directions(profile, topo, spec, cls)
                out.append(
                    [
                        "relay",
                        f"{spec.name}/{cls}",
                        "listen=127.0.0.1:auto",
                        f"target={topo.targets[spec.dst]}",
                        f"up={summarise(up)}",
                        f"down={summarise(down)}",
                    ]
                )
        sched = to_one_way(profile).schedule
        if sched is not None:
            for i, seg in enumerate(sched.segments):
                changed = seg.link.model_dump(exclude_none=True)
                out.append(
                    [
                        "schedule",
                        sched.kind,
                        f"segment={i}",
                        f"label={seg.label or '-'}",
                        f"duration={seg.duration_s:g}s",
                        f"override={json.dumps(changed, sort_keys=True)}",
                    ]
                )
        return out

    def apply(
        self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None
    ) -> dict[str, Any]:
        self.plan(profile, node, dev, workers)  # validates the topology against the profile first
        paths = _paths(dev)
        if paths[".json"].exists():
            self.clear(dev)
        paths[".json"].parent.mkdir(parents=True, exist_ok=True)
        for p in paths.values():
            p.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            SERVICE_MODULE,
            "--profile",
            json.dumps(profile.model_dump(mode="json")),
            "--topology",
            str(Path(dev).resolve()),
            "--ports-out",
            str(paths[".ports.json"]),
            "--pidfile",
            str(paths[".pid"]),
        ]
        with open(paths[".log"], "ab") as logf:
            proc = subprocess.Popen(
                argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
            )
        state = {
            "backend": self.name,
            "dev": dev,
            "profile": profile.name,
            "pid": proc.pid,
            "applied_at": time.time(),
            "profile_data": profile.model_dump(mode="json"),
        }
        write_state_file(paths[".json"], state)
        deadline = time.monotonic() + 20
        while not (paths[".ports.json"].exists() and paths[".pid"].exists()):
            if proc.poll() is not None:
                log = paths[".log"].read_text(errors="replace")[-600:]
                self.clear(dev)
                raise ShapingError(f"shaper service exited ({proc.returncode}): {log}")
            if time.monotonic() > deadline:
                self.clear(dev)
                raise ShapingError(
                    f"shaper service did not report its ports within 20 s; see {paths['.log']}"
                )
            time.sleep(0.05)
        return self.describe(dev)

    def clear(self, dev: str) -> list[list[str]]:
        paths = _paths(dev)
        state = read_state_file(paths[".json"])
        if state is None:
            return []
        ran: list[list[str]] = []
        pid = int(state.get("pid") or 0)
        if pid and runs_module(pid, SERVICE_MODULE):
            os.kill(pid, signal.SIGTERM)
            ran.append(["kill", "-TERM", str(pid)])
            for _ in range(200):
                reap(pid)
                if not runs_module(pid, SERVICE_MODULE):
                    break
                time.sleep(0.025)
            else:
                os.kill(pid, signal.SIGKILL)
                ran.append(["kill", "-KILL", str(pid)])
            reap(pid)
        for p in paths.values():
            p.unlink(missing_ok=True)
        return ran

    def describe(self, dev: str) -> dict[str, Any]:
        paths = _paths(dev)
        state = read_state_file(paths[".json"])
        out: dict[str, Any] = {
            "backend": self.name,
            "dev": dev,
            "applied": state is not None,
            "loss": "modelled",
        }
        if state is None:
            return out
        info = read_state_file(paths[".ports.json"]) or {}
        profile = Profile.model_validate(state["profile_data"])
        one_way = to_one_way(profile).link
        pid = int(state.get("pid") or 0)
        out.update(
            profile=state["profile"],
            node=None,
            daemon={"pid": pid, "alive": runs_module(pid, SERVICE_MODULE)},
            relays=[
                {k: r[k] for k in ("link", "traffic_class", "listen", "target", "up", "down")}
                for r in info.get("relays", [])
            ],
            schedule=info.get("schedule"),
            not_emulated=[f for f in NOT_EMULATED if getattr(one_way, f)],
        )
        return out
