"""The profile file, turned into per-path parameter tables the engines can index by worker and by time.

The same `deploy/netem/<name>.yaml` the real backends apply is resolved with the netem package's own rules
(`netem.resolve`: round trip → one way, default ← class ← node ← schedule segment), for four paths:

* `up`   worker → PS, class ps_sync: the worker's egress, plus the PS node's ingress override if any;
* `down` PS → worker, class ps_sync: the PS's egress (its rate is a queue shared by every pull when
  `transport.shared_ps_egress`, as when the PS container shapes its own interface) plus the worker's ingress;
* `hb`   worker → controller, class heartbeat; `task` controller → worker, class task.

Two hops in a row add their delays, combine jitters as independent (√(j₁² + j₂²)) and losses as
1 − (1 − p₁)(1 − p₂), and the slower rate wins. Nodes are named as the embedded launcher names them
(`worker-<n>`, `paramserver`, `controller`), so `nodes:` overrides and `$last_worker` work unchanged.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, to_one_way
from dist_llm_train.netem.profile.schema import Link, LinkOverride, Profile
from dist_llm_train.sim.linkmath import DIST_CODES

PS_NODE = "paramserver"
CONTROLLER_NODE = "controller"


def worker_name(slot: int) -> str:
    return f"worker-{slot}"


@dataclass(frozen=True)
class Hop:
    """One direction of one link, in seconds, probability and bits per second (inf: unshaped)."""

    delay: float = 0.0
    jitter: float = 0.0
    dist: int = 0
    loss: float = 0.0
    rate: float = math.inf

    @classmethod
    def of(cls, link: Link | None) -> Hop:
        if link is None:
            return cls()
        return cls(
            link.delay_ms / 1e3,
            link.jitter_ms / 1e3,
            DIST_CODES[link.distribution],
            link.loss_pct / 100.0,
            link.rate_mbit * 1e6 if link.rate_mbit else math.inf,
        )

    def then(self, other: Hop) -> Hop:
        return Hop(
            self.delay + other.delay,
            math.hypot(self.jitter, other.jitter),
            self.dist,
            1.0 - (1.0 - self.loss) * (1.0 - other.loss),
            min(self.rate, other.rate),
        )


class Timeline:
    """Which schedule segment is active at a virtual time (`segments` play once, then hold; `cycle` loops)."""

    def __init__(self, durations: list[float], cycle: bool) -> None:
        self.starts = [0.0]
        for d in durations[:-1]:
            self.starts.append(self.starts[-1] + d)
        self.period = sum(durations) if durations else 0.0
        self.cycle = cycle and len(durations) > 1
        self.single = len(durations) <= 1
        self._starts = np.array(self.starts)

    def index(self, t: np.ndarray) -> np.ndarray:
        if self.single:
            return np.zeros(np.shape(t), dtype=np.intp)
        tt = np.mod(t, self.period) if self.cycle else t
        return np.searchsorted(self._starts, tt, side="right") - 1

    def index_1(self, t: float) -> int:
        if self.single:
            return 0
        tt = math.fmod(t, self.period) if self.cycle else t
        return bisect.bisect_right(self.starts, tt) - 1


class PathTable:
    """One path's parameters for every (node group, segment); `rows[g][s]` is the same as a Python tuple."""

    def __init__(self, hops: list[list[Hop]]) -> None:
        self.hops = hops
        self.delay = np.array([[h.delay for h in row] for row in hops])
        self.jitter = np.array([[h.jitter for h in row] for row in hops])
        self.dist = np.array([[h.dist for h in row] for row in hops], dtype=np.int64)
        self.loss = np.array([[h.loss for h in row] for row in hops])
        self.rate = np.array([[h.rate for h in row] for row in hops])
        self.any_jitter_shape = bool(np.any(self.dist != 0))


class Topology:
    """Per-slot groups and per-path tables for one profile and one set of worker slots."""

    def __init__(
        self, profile: Profile | None, capacity: int, initial_workers: int, rto_min_s: float
    ) -> None:
        self.profile = profile
        names = [worker_name(i) for i in range(initial_workers)]
        one_way = to_one_way(profile) if profile is not None else None
        segs: list[LinkOverride | None] = [None]
        cycle = False
        durations: list[float] = [1.0]
        if one_way is not None and one_way.schedule is not None:
            segs = [s.link for s in one_way.schedule.segments]
            durations = [s.duration_s for s in one_way.schedule.segments]
            cycle = one_way.schedule.kind == "cycle"
        self.timeline = Timeline(durations, cycle)
        self.n_segments = len(segs)
        # Group slots by the node override that applies to them; group 0 has none.
        overrides: list[str | None] = [None]
        group = np.zeros(capacity, dtype=np.intp)
        for slot in range(capacity):
            key = self._override_key(one_way, worker_name(slot), names)
            if key not in overrides:
                overrides.append(key)
            group[slot] = overrides.index(key)
        self.group = group
        self._group_list = group.tolist()
        rep = [self._representative(key, names) for key in overrides]

        def table(build: str) -> PathTable:
            return PathTable([[self._path(one_way, build, node, names, seg) for seg in segs] for node in rep])

        self.up, self.down, self.hb, self.task = table("up"), table("down"), table("hb"), table("task")
        ps = [self._egress(one_way, PS_NODE, names, seg, "ps_sync") for seg in segs]
        self.ps_rate = np.array([h.rate for h in ps])
        self.rtt = self.up.delay + self.down.delay
        jrtt = np.hypot(self.up.jitter, self.down.jitter)
        self.rto = self.rtt + np.maximum(rto_min_s, 4.0 * jrtt)
        # A heartbeat's reply rides the same class back, so its RTT is twice the one-way heartbeat path.
        self.hb_rto = 2.0 * self.hb.delay + np.maximum(rto_min_s, 4.0 * math.sqrt(2.0) * self.hb.jitter)
        self.compute_slowdown = np.array(
            [self._slowdown(one_way, worker_name(s), names) for s in range(capacity)], dtype=np.float64
        )

    # -- resolution --------------------------------------------------------------------------------------
    @staticmethod
    def _override_key(p: Profile | None, node: str, names: list[str]) -> str | None:
        if p is None:
            return None
        if node in p.nodes:
            return node
        if p.node_override(node, names) is not None:
            return "$last_worker"
        return None

    @staticmethod
    def _representative(key: str | None, names: list[str]) -> str:
        if key == "$last_worker":
            return names[-1]
        return key if key is not None else "\0default"  # a name no profile can use

    @staticmethod
    def _egress(
        p: Profile | None, node: str, names: list[str], seg: LinkOverride | None, cls: TrafficClass
    ) -> Hop:
        if p is None:
            return Hop()
        return Hop.of(egress_links(p, node, names, seg)[cls])

    @staticmethod
    def _ingress(p: Profile | None, node: str, names: list[str]) -> Hop:
        return Hop() if p is None else Hop.of(ingress_link(p, node, names))

    def _path(
        self, p: Profile | None, kind: str, node: str, names: list[str], seg: LinkOverride | None
    ) -> Hop:
        if kind == "up":
            return self._egress(p, node, names, seg, "ps_sync").then(self._ingress(p, PS_NODE, names))
        if kind == "down":
            ps = self._egress(p, PS_NODE, names, seg, "ps_sync")
            return Hop(ps.delay, ps.jitter, ps.dist, ps.loss, math.inf).then(self._ingress(p, node, names))
        if kind == "hb":
            return self._egress(p, node, names, seg, "heartbeat").then(
                self._ingress(p, CONTROLLER_NODE, names)
            )
        return self._egress(p, CONTROLLER_NODE, names, seg, "task").then(self._ingress(p, node, names))

    @staticmethod
    def _slowdown(p: Profile | None, node: str, names: list[str]) -> float:
        if p is None:
            return 1.0
        o = p.node_override(node, names)
        return o.compute_slowdown if o is not None else 1.0

    # -- lookups -----------------------------------------------------------------------------------------
    def group_of(self, slot: int) -> int:
        return int(self._group_list[slot])

    def configured_links(self) -> list[dict[str, object]]:
        """The run report's `links`: each simulated path of a default worker as configured (segment 0)."""
        out: list[dict[str, object]] = []
        paths = (
            ("worker -> paramserver", "ps_sync", self.up),
            ("paramserver -> worker", "ps_sync", self.down),
            ("worker -> controller", "heartbeat", self.hb),
            ("controller -> worker", "task", self.task),
        )
        for name, cls, table in paths:
            h = table.hops[0][0]
            rate = float(self.ps_rate[0]) if table is self.down else h.rate
            out.append(
                {
                    "link": name,
                    "class": cls,
                    "backend": "simulated",
                    "delay_ms": h.delay * 1e3,
                    "jitter_ms": h.jitter * 1e3,
                    "loss_pct": h.loss * 100,
                    "rate_mbit": rate / 1e6 if math.isfinite(rate) else None,
                }
            )
        return out

    def describe(self) -> dict[str, float | str | None]:
        """The default worker's figures (segment 0), for reports and the link-physics bound."""
        up, down = self.up.hops[0][0], self.down.hops[0][0]
        return {
            "profile": self.profile.name if self.profile is not None else None,
            "rtt_s": up.delay + down.delay,
            "up_rate_bps": up.rate,
            "down_rate_bps": min(float(self.ps_rate[0]), down.rate),
            "ps_rate_bps": float(self.ps_rate[0]),
            "loss_up": up.loss,
            "loss_down": down.loss,
        }
