"""Network fidelity exporter: configured vs measured link figures for this container's paths to its peers.

Runs in the background of a worker container (started by the entrypoint when DLT_PROBE_TARGETS or
DLT_PROBE_TARGET is set). Every interval it sends a short paced UDP probe train, marked as the ps_sync class, to
each peer's `dist-llm-train netem probe --listen` responder in turn (one train at a time), and compares the median
RTT and the round-trip loss with what the profile configures for that path (this node's egress plus the peer's,
and either end's ingress override, all resolved by the project's own profile code, so the figures mean exactly
what shaping applied). The peers are the parameter server, or with sharded parameter servers every shard
(`--target paramserver=paramserver:9199,shard-1=…`). Two outputs:

* `dlt_link_*` gauges on its own port for Prometheus (the "network fidelity" dashboard), one series per path
  (`src`, `dst` = the peer's node name);
* `--report-file`: the same figures as the `links` records of worker telemetry, one per path in target order
  (netem/measure/path_report.py); the worker, told the file by DLT_LINK_REPORT_FILE, sends them to the
  controller, whose /status shows them.

A peer whose train fails (no address, refused) does not stop the others: its path's measurement is cleared (the
record says "not measured", its measured gauges go away) until it answers again.

Why here and not in the worker: measurement must not depend on training traffic, and the probe train is tiny
(default 50 x 64 B per peer every 15 s) so it does not disturb what it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import struct
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dist_llm_train.netem.backends import ShapingError
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.measure import probe
from dist_llm_train.netem.measure.path_report import (
    ConfiguredPath,
    ProbeWindow,
    configured_path,
    path_report,
    write_reports,
)
from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.loading import load_profile

log = logging.getLogger("dlt-link-exporter")
# The probes carry training's mark, so a per-class override applies to both alike.
TRAFFIC_CLASS: TrafficClass = "ps_sync"
MAX_PEERS = 64  # PS_SHARDS' bound, and the controller's bound on a telemetry record's `links`
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Peer:
    node: str  # the peer's node name in the profile
    host: str
    port: int


def parse_targets(targets: list[str], peer_node: str | None) -> list[Peer]:
    """The peers named by `--target` values, in order. Each value is `[NODE=]HOST:PORT` or a comma-separated list
    of them; a bare HOST:PORT is the peer `peer_node` (the single-peer form). ValueError says what is wrong."""
    peers: list[Peer] = []
    for item in (part.strip() for value in targets for part in value.split(",")):
        if not item:
            continue
        node, sep, address = item.rpartition("=")
        if not sep:
            if peer_node is None:
                raise ValueError(f"target {item!r} names no peer: write NODE={item} or give --peer-node")
            node = peer_node
        if not _NODE.fullmatch(node):
            raise ValueError(f"target {item!r}: peer node name {node!r} must be letters, digits, '_', '.', '-'")
        host, colon, port_text = address.rpartition(":")
        if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"target {item!r}: expected [NODE=]HOST:PORT with a port in 1..65535")
        peers.append(Peer(node, host, int(port_text)))
    if not peers:
        raise ValueError("no target given")
    seen: set[str] = set()
    for p in peers:
        if p.node in seen:
            raise ValueError(f"peer {p.node!r} is named by more than one target")
        seen.add(p.node)
    if len(peers) > MAX_PEERS:
        raise ValueError(f"{len(peers)} targets; at most {MAX_PEERS}")
    return peers


@dataclass
class PeerPath:
    """One path this node -> peer -> this node: what the profile configures and what the probes measured."""

    peer: Peer
    configured: ConfiguredPath
    window: ProbeWindow = field(default_factory=ProbeWindow)


def backend_of(dev: str) -> str:
    """The shaping backend the entrypoint applied on `dev` ('none' when unshaped)."""
    try:
        state = shell.read_state(dev)
    except (ShapingError, OSError):  # an unreadable state file means we cannot vouch for any shaping
        return "none"
    return str(state.get("backend", "none")) if state else "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", required=True, metavar="[NODE=]HOST:PORT[,...]",
                    help="a peer's probe responder; repeat it or give a comma-separated list for several peers "
                         "(e.g. paramserver=paramserver:9199,shard-1=dlt-paramserver-shard-1:9199)")
    ap.add_argument("--peer-node", default=None,
                    help="the node name in the profile of a target given as bare HOST:PORT (e.g. paramserver)")
    ap.add_argument("--node", required=True, help="this container's node name (e.g. worker-2)")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--workers", default="", help="comma-separated worker names (for $last_worker overrides)")
    ap.add_argument("--dev", default="eth0")
    ap.add_argument("--port", type=int, default=9101, help="metrics port")
    ap.add_argument("--report-file", default=None, help="write the paths' `links` records here (JSON)")
    ap.add_argument("--interval", type=float, default=15.0, help="seconds between rounds of probe trains")
    ap.add_argument("--count", type=int, default=50, help="probes per train")
    args = ap.parse_args()
    try:
        peers = parse_targets(args.target, args.peer_node)
    except ValueError as err:
        ap.error(f"--target: {err}")
    if any(p.node == args.node for p in peers):
        ap.error(f"--target: a peer is named like this node ({args.node})")
    if not args.interval > 0 or args.count < 1:
        ap.error("--interval must be > 0 and --count >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workers = [w for w in args.workers.split(",") if w] or None
    profile = load_profile(args.profile)
    paths = [PeerPath(p, configured_path(profile, args.node, p.node, workers, TRAFFIC_CLASS)) for p in peers]

    reg = CollectorRegistry()
    labels = ["src", "dst", "backend"]
    names = ("rtt_seconds", "loss_ratio")
    conf = {n: Gauge(f"dlt_link_configured_{n}", f"Configured round-trip {n} of the path.", labels, registry=reg)
            for n in names}
    meas = {n: Gauge(f"dlt_link_measured_{n}", f"Measured round-trip {n} of the path.", labels, registry=reg)
            for n in names}
    rate = Gauge("dlt_link_configured_rate_bits_per_second", "Bottleneck rate configured on the path.", labels,
                 registry=reg)
    probes = Counter("dlt_link_probes", "Probe packets sent.", ["src", "dst"], registry=reg)
    start_http_server(args.port, registry=reg)

    def write(backend: str) -> None:
        if args.report_file:
            write_reports(args.report_file, [path_report(f"{args.node}->{p.peer.node}", TRAFFIC_CLASS, backend,
                                                         p.configured, p.window) for p in paths])

    written = False
    while True:
        backend = backend_of(args.dev)
        for p in paths:
            lab = (args.node, p.peer.node, backend)
            conf["rtt_seconds"].labels(*lab).set(p.configured.rtt_ms / 1000)
            conf["loss_ratio"].labels(*lab).set(p.configured.loss_ratio)
            bottleneck = p.configured.bottleneck_rate_mbit
            rate.labels(*lab).set(math.nan if bottleneck is None else bottleneck * 1e6)
        if not written:  # the configured side at once, before the first train
            write(backend)
            written = True
        for p in paths:  # one train at a time: trains to different peers share this node's egress
            lab = (args.node, p.peer.node, backend)
            try:
                res = probe.measure_udp(p.peer.host, p.peer.port, count=args.count, interval_s=0.02, drain_s=1.0,
                                        traffic_class=TRAFFIC_CLASS)
            except (OSError, struct.error) as err:  # struct.error: something else answered on that port
                log.warning("probe to %s (%s:%d) failed: %s", p.peer.node, p.peer.host, p.peer.port, err)
                p.window = ProbeWindow()  # unreachable now: no figures from before it went away
                for gauge in meas.values():
                    with contextlib.suppress(KeyError):  # KeyError: never measured
                        gauge.remove(*lab)
            else:
                probes.labels(args.node, p.peer.node).inc(args.count)
                p.window.add(res.sent, res.rtt_ms)
                if p.window.rtt_ms is not None:
                    meas["rtt_seconds"].labels(*lab).set(p.window.rtt_ms / 1000)
                if p.window.loss_ratio is not None:
                    meas["loss_ratio"].labels(*lab).set(p.window.loss_ratio)
            write(backend)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
