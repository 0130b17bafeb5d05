"""One kernel-shaped path, configured vs measured, written as the `links` records worker telemetry carries.

Under the kernel backends (Compose, Swarm) every container shapes its own egress (and, for a node with an
`ingress` override, what it receives), so the path worker → PS → worker is the worker's legs plus the PS's. The
link exporter beside each worker (scripts/docker/link_exporter.py) resolves what the profile configures for that
path with the same profile code shaping used (`configured_path`), measures it with paced UDP probe trains marked
as the ps_sync class, so a class override applies to the probes as it does to training traffic (`ProbeWindow`),
and writes the result as a list of link records (`write_reports`) — the shape embedded workers send
(link_monitor.py). The worker reads that file (`read_reports`), adds the push goodput it measures itself as the
measured rate, and attaches the records to its telemetry: the controller's /status then shows the link as it does
for an embedded run.

Unlike the userspace relays, the kernel drops real packets, so loss is *measured* here: probes lost over the last
few trains (`WINDOW_TRAINS`), not a single train of 50, whose 2 % figure would be 0 or 1 packet.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_llm_train.netem.measure.link_monitor import rtt_tolerance_ms
from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link
from dist_llm_train.netem.profile.schema import Link, Profile

WINDOW_TRAINS = 5
"""Probe trains the measured loss is counted over (the RTT is the latest train's median)."""


def _keep(*links: Link | None) -> float:
    """Probability a packet survives every one of `links` (None: no shaping there)."""
    keep = 1.0
    for link in links:
        if link is not None:
            keep *= 1 - link.loss_pct / 100
    return keep


def _slowest(*links: Link | None) -> float | None:
    rates = [link.rate_mbit for link in links if link is not None and link.rate_mbit]
    return min(rates) if rates else None


@dataclass(frozen=True)
class ConfiguredPath:
    """What the profile sets for node → peer → node on one traffic class."""

    rtt_ms: float
    loss_ratio: float
    up_rate_mbit: float | None  # node → peer: the node's egress and the peer's ingress; None = unlimited
    down_rate_mbit: float | None  # peer → node

    @property
    def bottleneck_rate_mbit(self) -> float | None:
        rates = [r for r in (self.up_rate_mbit, self.down_rate_mbit) if r]
        return min(rates) if rates else None


def configured_path(
    profile: Profile, node: str, peer: str, workers: list[str] | None = None,
    traffic_class: TrafficClass | None = "ps_sync",
) -> ConfiguredPath:
    """The round trip node → peer → node as the kernel backends shape it: each end's egress for `traffic_class`
    plus each end's ingress override, if it has one."""
    out = egress_links(profile, node, workers)[traffic_class]
    back = egress_links(profile, peer, workers)[traffic_class]
    peer_in, node_in = ingress_link(profile, peer, workers), ingress_link(profile, node, workers)
    delay = sum(link.delay_ms for link in (out, back, peer_in, node_in) if link is not None)
    return ConfiguredPath(
        rtt_ms=delay,
        loss_ratio=1 - _keep(out, back, peer_in, node_in),
        up_rate_mbit=_slowest(out, peer_in),
        down_rate_mbit=_slowest(back, node_in),
    )


@dataclass
class ProbeWindow:
    """The last few probe trains of one path: sent and echoed counts, and the latest train's median RTT."""

    trains: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW_TRAINS))
    rtt_ms: float | None = None
    rtt_samples: int = 0

    def add(self, sent: int, rtt_ms: list[float]) -> None:
        if sent <= 0 or len(rtt_ms) > sent:
            raise ValueError(f"a probe train needs 0 <= echoes <= sent > 0, got {len(rtt_ms)} of {sent}")
        self.trains.append((sent, len(rtt_ms)))
        if rtt_ms:  # a train that lost every probe says nothing new about the delay
            self.rtt_ms, self.rtt_samples = statistics.median(rtt_ms), len(rtt_ms)

    @property
    def loss_ratio(self) -> float | None:
        sent = sum(s for s, _ in self.trains)
        return None if sent == 0 else 1 - sum(e for _, e in self.trains) / sent


def path_report(
    link: str, traffic_class: TrafficClass, backend: str, configured: ConfiguredPath, measured: ProbeWindow
) -> dict[str, Any]:
    """One `links` record (controller.models.LinkReportIn) for the path; measured rate is the worker's to add."""
    tolerance = rtt_tolerance_ms(configured.rtt_ms)
    rtt, loss = measured.rtt_ms, measured.loss_ratio
    return {
        "link": link,
        "traffic_class": traffic_class,
        "backend": backend,
        "configured_rtt_ms": round(configured.rtt_ms, 3),
        "measured_rtt_ms": None if rtt is None else round(rtt, 3),
        "rtt_samples": measured.rtt_samples,
        "rtt_tolerance_ms": round(tolerance, 3),
        "within_tolerance": None if rtt is None else abs(rtt - configured.rtt_ms) <= tolerance,
        "configured_rate_mbit": configured.up_rate_mbit,
        "measured_rate_mbit": None,
        "configured_loss": round(configured.loss_ratio, 6),
        "measured_loss": None if loss is None else round(loss, 6),
        "loss_kind": "measured",
    }


def write_reports(path: str | Path, reports: list[dict[str, Any]]) -> None:
    """Replace the report file atomically: a reader sees the old list or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(reports))
    os.replace(tmp, path)


def read_reports(path: str | Path) -> list[dict[str, Any]]:
    """The records in the report file; [] when there is none yet. A file that is not a JSON list is an error."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of link records")
    return data
