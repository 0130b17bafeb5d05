"""The link-physics bound: how fast a round *could* be on the profile's links, next to how fast it was.

A round (sync) or a PS version (async) cannot be faster than the compute it measured plus moving its measured
bytes through the profile's links at their rate plus the propagation delay. The bound ignores loss and
protocol overheads on purpose: measured / bound then says how much of the round time the implementation
(serialisation, RPC, retransmission, Python) adds on top of physics. See docs/experiments.md for the formulas.

Who shapes what follows `netem.resolve`: every node shapes its own egress with the one-way link, so
worker→PS traffic is limited by the worker's egress and PS→worker traffic by the PS's egress (shared by all
workers) and by the worker's extra ingress shaping, if any. Time-varying profiles use their time-weighted
mean rate and delay.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm_train.core.strategies import STRATEGIES
from dist_llm_train.experiments.metrics import Row
from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, to_one_way
from dist_llm_train.netem.profile.schema import Link, Profile

PS_NODE = "paramserver"
TRAFFIC_CLASS: TrafficClass = "ps_sync"


def worker_names(n: int) -> list[str]:
    """The names the embedded launcher gives its workers (the profile's `$last_worker` is the last one)."""
    return [f"worker-{i}" for i in range(n)]


@dataclass(frozen=True)
class WorkerLink:
    """One worker's path to the PS: round-trip delay and the rate each way (bit/s, None = unlimited)."""

    rtt_s: float
    up_bps: float | None
    down_bps: float | None


@dataclass(frozen=True)
class LinkModel:
    """The links of one run. `ps_egress_shared`: every pull leaves through one PS interface (kernel shaping,
    Compose, the simulator's default); False when each worker's path is shaped on its own in both directions
    (the userspace backend's relay per worker), so the PS side is no common bottleneck."""

    profile: str
    workers: dict[str, WorkerLink]
    ps_egress_bps: float | None
    ps_egress_shared: bool = True


def _mean_link(profile: Profile, node: str, names: list[str]) -> tuple[float, float | None]:
    """(one-way delay s, rate bit/s) of `node`'s ps_sync egress, time-averaged over the schedule if any."""
    one_way = to_one_way(profile)
    segments = one_way.schedule.segments if one_way.schedule is not None else []
    if not segments:
        link = egress_links(one_way, node, names)[TRAFFIC_CLASS]
        return link.delay_ms / 1000, _bps(link)
    total = sum(s.duration_s for s in segments)
    delay, rate = 0.0, 0.0
    for seg in segments:
        link = egress_links(one_way, node, names, seg.link)[TRAFFIC_CLASS]
        bps = _bps(link)
        if bps is None:
            return link.delay_ms / 1000, None
        delay += link.delay_ms / 1000 * seg.duration_s / total
        rate += bps * seg.duration_s / total
    return delay, rate


def _bps(link: Link) -> float | None:
    return None if link.rate_mbit is None else link.rate_mbit * 1e6


def _min_rate(*rates: float | None) -> float | None:
    known = [r for r in rates if r is not None]
    return min(known) if known else None


def link_model(profile: Profile, workers: int, ps_egress_shared: bool = True) -> LinkModel:
    names = worker_names(workers)
    ps_delay, ps_rate = _mean_link(profile, PS_NODE, names)
    out = {}
    for name in names:
        delay, rate = _mean_link(profile, name, names)
        extra = ingress_link(profile, name, names)
        in_delay = extra.delay_ms / 1000 if extra else 0.0
        in_rate = _bps(extra) if extra else None
        out[name] = WorkerLink(rtt_s=delay + ps_delay + in_delay, up_bps=rate,
                               down_bps=_min_rate(ps_rate, in_rate))
    return LinkModel(profile.name, out, ps_rate, ps_egress_shared)


@dataclass(frozen=True)
class RoundMeasure:
    """What one round (sync) or one PS version (async) cost, measured after every worker had joined.

    The window starts at the first row by which every worker has reported; compute is counted for the
    versions after that row's (the first rounds carry warm-up, e.g. PyTorch's first-call overheads).
    `rounds` holds each version's compute per worker; `compute_s` is the mean over versions of the slowest
    member's compute (for tables); `worker_compute_s` are per-worker means (async). Bytes are per worker per
    step, from the cumulative counters.
    """

    versions: int
    round_s: float
    rounds: list[dict[str, float]]
    worker_compute_s: dict[str, float]
    up_bytes: dict[str, float]
    down_bytes: dict[str, float]

    @property
    def compute_s(self) -> float:
        return sum(max(r.values()) for r in self.rounds) / len(self.rounds) if self.rounds else 0.0


def _per_step(values: list[int]) -> float:
    if len(values) >= 2:
        return (max(values) - min(values)) / (len(values) - 1)
    return float(values[0]) if values else 0.0


def measure_rounds(rows: list[Row]) -> RoundMeasure | None:
    """None when fewer than two PS versions were seen once every worker was running."""
    if not rows:
        return None
    first_seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        first_seen.setdefault(r.worker, i)
    steady = rows[max(first_seen.values()):]
    versions = steady[-1].ps_version - steady[0].ps_version
    span = steady[-1].wall_time - steady[0].wall_time
    if versions < 1 or span <= 0:
        return None
    by_version: dict[int, dict[str, float]] = {}
    steady_by_worker: dict[str, list[Row]] = {}
    # Compute of the version the window starts at happened before the window (and carries warm-up).
    for r in (r for r in steady if r.ps_version != steady[0].ps_version):
        group = by_version.setdefault(r.ps_version, {})
        group[r.worker] = max(group.get(r.worker, 0.0), r.compute_time_s)
        steady_by_worker.setdefault(r.worker, []).append(r)
    all_by_worker: dict[str, list[Row]] = {}  # bytes per step use every row: the counters are cumulative
    for r in rows:
        all_by_worker.setdefault(r.worker, []).append(r)
    return RoundMeasure(
        versions=versions,
        round_s=span / versions,
        rounds=[by_version[v] for v in sorted(by_version)],
        worker_compute_s={w: sum(r.compute_time_s for r in rs) / len(rs)
                          for w, rs in steady_by_worker.items()},
        up_bytes={w: _per_step([r.bytes_sent for r in rs]) for w, rs in all_by_worker.items()},
        down_bytes={w: _per_step([r.bytes_received for r in rs]) for w, rs in all_by_worker.items()},
    )


def _xfer(nbytes: float, bps: float | None) -> float:
    return 0.0 if bps is None else 8.0 * nbytes / bps


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def round_bound(m: RoundMeasure, links: LinkModel, mode: str) -> float:
    """Lower bound on `m.round_s` from measured compute and bytes and the links' rate and delay.

    net_w  = rtt_w + up_w/rate_up_w + down_w/rate_down_w              (one worker's own transfers)
    sync:  max( mean_r max_w (c_wr + net_w),                          (every member's own cycle)
                mean_r min_w c_wr + min_w rtt_w + max_w up_w/rate_up_w + Σ_w down_w/rate_ps_egress )
    async: max( 1 / Σ_w 1/(c_w + net_w),  mean_w down_w / rate_ps_egress )          (per PS version)
    The PS-egress terms apply only when `links.ps_egress_shared`: pulls leave one after another, and the
    worker served last computes at least as long as the fastest member of that round.
    """
    names = [w for w in m.up_bytes if w in links.workers] or list(links.workers)
    if not names:
        raise ValueError("no worker in the measurement matches the link model")

    def net(w: str) -> float:
        lk = links.workers[w]
        up = _xfer(m.up_bytes.get(w, 0.0), lk.up_bps)
        return lk.rtt_s + up + _xfer(m.down_bytes.get(w, 0.0), lk.down_bps)

    nets = {w: net(w) for w in names}
    strategy = STRATEGIES.get(mode)
    if strategy is not None and not strategy.rounds:  # the PS version advances per push, not per round
        rate = sum(1.0 / max(m.worker_compute_s.get(w, 0.0) + nets[w], 1e-12) for w in names)
        ps_share = _xfer(sum(m.down_bytes.get(w, 0.0) for w in names) / len(names), links.ps_egress_bps)
        return max(1.0 / rate, ps_share) if links.ps_egress_shared else 1.0 / rate
    rounds = m.rounds or [dict.fromkeys(names, 0.0)]
    own = _mean([max(c + nets.get(w, max(nets.values())) for w, c in r.items()) for r in rounds])
    if not links.ps_egress_shared:
        return own
    shared = (_mean([min(r.values()) for r in rounds])
              + min(links.workers[w].rtt_s for w in names)
              + max(_xfer(m.up_bytes.get(w, 0.0), links.workers[w].up_bps) for w in names)
              + _xfer(sum(m.down_bytes.get(w, 0.0) for w in names), links.ps_egress_bps))
    return max(own, shared)
