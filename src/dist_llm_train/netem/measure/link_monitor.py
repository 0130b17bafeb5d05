"""Fidelity in the running system: a worker's links, configured vs measured, as gauges and telemetry.

The configured side comes from the shaper service's ports document (netem/userspace/shaper.py): every relay
whose source is this worker, with its one-way links per direction (and per schedule segment, so a brownout's
configured rate follows the segment in force). The measured side is cheap and honest about what it is:

  * RTT — one tiny request per class every few seconds through that class's own relay (GET /healthz for the
    controller classes, a stats call for ps_sync), median of the last few; it includes the server's handling
    time, a millisecond or so;
  * rate — this worker's own pushes: payload bytes over (push time − median ps_sync RTT), median of the last
    few; only for ps_sync, the class that carries bulk data;
  * loss — not measurable from above TCP; under the userspace backend loss is *modelled* (recovery stalls), so
    the report carries the configured figure with `loss_kind: "modelled"` and no measured one.

Tolerance: a link whose measured RTT is further than `rtt_tolerance_ms` (RTT_TOLERANCE_REL × configured +
RTT_TOLERANCE_MS) from the configured one reports `within_tolerance: false`, and the controller's /status and the
run summary list it. Shaping can only add delay, so a measurement far *below* the configured RTT means the link
is not shaped; one far above means the host was too busy to keep the timing (the relays, the server, or the
probing worker itself, which trains at a low priority, were scheduled late) — the run goes on, and says so.

Gauges (`dlt_link_*`, labels link, traffic_class, backend): configured_delay_seconds is the configured round
trip (the two one-way delays), so it compares directly with measured_rtt_seconds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from dist_llm_train.netem.profile.schema import Link

WINDOW = 5  # samples kept per link for the medians
RTT_TOLERANCE_REL = 0.5
RTT_TOLERANCE_MS = 15.0
"""|measured − configured| RTT a link may show and count as faithful: the probe's RTT includes the server's
handling and the scheduling of a worker that trains beside it, so the bound is loose; an unshaped link (~1 ms
on loopback) is outside it for any configured RTT above 30 ms."""


def rtt_tolerance_ms(configured_ms: float) -> float:
    return RTT_TOLERANCE_REL * configured_ms + RTT_TOLERANCE_MS


def push_goodput_bps(nbytes: int, seconds: float, rtt_s: float) -> float | None:
    """Goodput of one push of `nbytes` payload that took `seconds`, with one round trip (`rtt_s`, the path's
    median) taken off — unless that would leave under a quarter of the time (then the RTT estimate is the
    larger error). None for an empty or instantaneous push."""
    if nbytes <= 0 or seconds <= 0:
        return None
    transfer = seconds - rtt_s if seconds - rtt_s > 0.25 * seconds else seconds
    return nbytes * 8 / transfer
LABELS = ("link", "traffic_class", "backend")
Probe = Callable[[], Awaitable[float | None]]  # None: no valid sample this time (e.g. a fresh connection)


class LinkGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        def g(name: str, doc: str) -> Gauge:
            return Gauge(f"dlt_link_{name}", doc, LABELS, registry=registry)

        self.configured_delay = g(
            "configured_delay_seconds",
            "Configured round-trip delay of the link (sum of both one-way delays).",
        )
        self.measured_rtt = g("measured_rtt_seconds", "Median measured round trip through the link.")
        self.configured_rate = g("configured_rate_bits_per_second", "Configured rate, worker to server.")
        self.measured_rate = g("measured_rate_bits_per_second", "Median push goodput with one RTT taken off.")
        self.configured_loss = g("configured_loss_ratio", "Configured round-trip loss probability.")
        self.measured_loss = g(
            "measured_loss_ratio", "Measured loss; absent where loss is modelled (userspace backend)."
        )


@dataclass
class MonitoredLink:
    link: str
    traffic_class: str
    backend: str
    listen: str
    up: Link
    down: Link
    segments: list[tuple[Link, Link]] = field(default_factory=list)
    rtt_s: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    rate_bps: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def configured(self, schedule: dict[str, Any] | None, now: float) -> tuple[Link, Link]:
        """The links in force at wall time `now` (the schedule segment, when there is one)."""
        if not schedule or not self.segments:
            return self.up, self.down
        durations = [float(s["duration_s"]) for s in schedule["segments"]]
        elapsed = max(0.0, now - float(schedule["started_at"]))
        period = sum(durations)
        if schedule["kind"] == "cycle":
            elapsed %= period
        elif elapsed >= period:
            return self.segments[-1]
        for i, d in enumerate(durations):
            if elapsed < d:
                return self.segments[i]
            elapsed -= d
        return self.segments[-1]


class LinkMonitor:
    """The links of one node, read from the shaper's ports document; fed by probes, read by telemetry."""

    def __init__(self, info: dict[str, Any], node: str, registry: CollectorRegistry | None = None) -> None:
        self.backend = str(info.get("backend", "unknown"))
        self.loss_kind = "modelled" if info.get("loss") == "modelled" else "measured"
        self.schedule: dict[str, Any] | None = info.get("schedule")
        # class -> its links in the order the shaper lists them: one per class, except ps_sync with parameter-server
        # shards, where there is one per shard, in shard order (topology.py)
        self.links: dict[str, list[MonitoredLink]] = {}
        for r in info.get("relays", []):
            if r.get("src") != node:
                continue
            segs = [
                (Link.model_validate(s["up"]), Link.model_validate(s["down"])) for s in r.get("segments", [])
            ]
            self.links.setdefault(r["traffic_class"], []).append(MonitoredLink(
                r["link"],
                r["traffic_class"],
                self.backend,
                r["listen"],
                Link.model_validate(r["up"]),
                Link.model_validate(r["down"]),
                segs,
            ))
        if not self.links:
            raise ValueError(f"the shaper shapes no link from {node!r}; is the topology for this run?")
        self.gauges = LinkGauges(registry) if registry is not None else None

    @classmethod
    def from_file(cls, path: str | Path, node: str, registry: CollectorRegistry | None = None) -> LinkMonitor:
        try:
            info = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the shaper's ports file {path}: {err}") from None
        return cls(info, node, registry)

    def url(self, traffic_class: str) -> str | None:
        address = self.address(traffic_class)
        return f"http://{address}" if address else None

    def address(self, traffic_class: str) -> str | None:
        """The relay of the class (with PS shards, ps_sync's relays comma-separated in shard order)."""
        links = self.links.get(traffic_class)
        return ",".join(link.listen for link in links) if links else None

    def add_rtt(self, traffic_class: str, seconds: float, index: int = 0) -> None:
        """An RTT sample of the class's link (`index`: which shard's, for ps_sync with PS shards)."""
        links = self.links.get(traffic_class, [])
        if 0 <= index < len(links) and seconds >= 0:
            links[index].rtt_s.append(seconds)

    def add_push(self, nbytes: int, seconds: float) -> None:
        """One push of `nbytes` payload that took `seconds`: goodput once one round trip is taken off. With PS
        shards one push goes to every shard at once through the worker's one shaped uplink (the shaper shares
        its rate): the goodput is the whole push's, put on the path to shard 0, as the link exporter's reports
        do in Compose (worker/links.py)."""
        links = self.links.get("ps_sync")
        if not links:
            return
        link = links[0]
        rate = push_goodput_bps(nbytes, seconds, statistics.median(link.rtt_s) if link.rtt_s else 0.0)
        if rate is not None:
            link.rate_bps.append(rate)

    def reports(self, now: float | None = None) -> list[dict[str, Any]]:
        """One record per link, as sent in telemetry and shown by the controller's /status."""
        now = time.time() if now is None else now
        out = []
        for link in (link for links in self.links.values() for link in links):
            up, down = link.configured(self.schedule, now)
            rtt = statistics.median(link.rtt_s) if link.rtt_s else None
            rate = statistics.median(link.rate_bps) if link.rate_bps else None
            loss = 1 - (1 - up.loss_pct / 100) * (1 - down.loss_pct / 100)
            configured_ms = up.delay_ms + down.delay_ms
            tolerance = rtt_tolerance_ms(configured_ms)
            out.append(
                {
                    "link": link.link,
                    "traffic_class": link.traffic_class,
                    "backend": link.backend,
                    "configured_rtt_ms": round(configured_ms, 3),
                    "measured_rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                    "rtt_samples": len(link.rtt_s),
                    "rtt_tolerance_ms": round(tolerance, 3),
                    "within_tolerance": None if rtt is None else abs(rtt * 1000 - configured_ms) <= tolerance,
                    "configured_rate_mbit": up.rate_mbit,
                    "measured_rate_mbit": None if rate is None else round(rate / 1e6, 4),
                    "configured_loss": round(loss, 6),
                    "measured_loss": None,
                    "loss_kind": self.loss_kind,
                }
            )
        self._export(out)
        return out

    def _export(self, reports: list[dict[str, Any]]) -> None:
        if self.gauges is None:
            return
        g = self.gauges
        for r in reports:
            labels = (r["link"], r["traffic_class"], r["backend"])
            g.configured_delay.labels(*labels).set(r["configured_rtt_ms"] / 1000)
            g.configured_loss.labels(*labels).set(r["configured_loss"])
            if r["configured_rate_mbit"]:
                g.configured_rate.labels(*labels).set(r["configured_rate_mbit"] * 1e6)
            if r["measured_rtt_ms"] is not None:
                g.measured_rtt.labels(*labels).set(r["measured_rtt_ms"] / 1000)
            if r["measured_rate_mbit"] is not None:
                g.measured_rate.labels(*labels).set(r["measured_rate_mbit"] * 1e6)
            if r["measured_loss"] is not None:
                g.measured_loss.labels(*labels).set(r["measured_loss"])

    async def probe_once(self, probes: dict[tuple[str, int], Probe]) -> None:
        """One RTT sample per (class, link index) that has a probe; a failing probe just yields no sample this
        round."""
        for (cls, index), fn in list(probes.items()):
            try:
                rtt = await fn()
            except Exception:  # noqa: BLE001 - a link being down is what the next sample will show
                continue
            if rtt is not None:
                self.add_rtt(cls, rtt, index)
        self.reports()
