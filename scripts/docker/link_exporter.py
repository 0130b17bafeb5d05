"""Network fidelity exporter: configured vs measured link figures for this container's path to a peer.

Runs in the background of a worker container (started by the entrypoint when DLT_PROBE_TARGET is set) and serves
`dlt_link_*` gauges on its own port for Prometheus, which the "network fidelity" dashboard plots. Every interval it
sends a short paced UDP probe train to the peer's `dist-llm-train netem probe --listen` responder and compares the
median RTT and round-trip loss with what the profile configures for this path (this node's egress plus the peer's
egress, both resolved by the project's own profile code, so the figures mean exactly what shaping applied).

Why here and not in the worker: measurement must not depend on training traffic, and the probe train is tiny
(default 50 x 64 B every 15 s) so it does not disturb what it measures.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dist_llm_train.netem.backends import ShapingError
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.measure import probe
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.resolve import egress_links

log = logging.getLogger("dlt-link-exporter")


def configured_path(profile_name: str, node: str, peer: str, workers: list[str] | None) -> dict[str, float]:
    """Round-trip figures the profile sets for node -> peer -> node on the default (unmarked) class."""
    profile = load_profile(profile_name)
    out_link = egress_links(profile, node, workers)[None]
    back_link = egress_links(profile, peer, workers)[None]
    keep = (1 - out_link.loss_pct / 100) * (1 - back_link.loss_pct / 100)
    rates = [r for r in (out_link.rate_mbit, back_link.rate_mbit) if r]
    return {
        "rtt_s": (out_link.delay_ms + back_link.delay_ms) / 1000,
        "loss_ratio": 1 - keep,
        "rate_bps": min(rates) * 1e6 if rates else math.nan,
    }


def backend_of(dev: str) -> str:
    """The shaping backend the entrypoint applied on `dev` ('none' when unshaped)."""
    try:
        state = shell.read_state(dev)
    except (ShapingError, OSError):  # an unreadable state file means we cannot vouch for any shaping
        return "none"
    return str(state.get("backend", "none")) if state else "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="HOST:PORT of the peer's probe responder")
    ap.add_argument("--peer-node", required=True, help="the peer's node name in the profile (e.g. paramserver)")
    ap.add_argument("--node", required=True, help="this container's node name (e.g. worker-2)")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--workers", default="", help="comma-separated worker names (for $last_worker overrides)")
    ap.add_argument("--dev", default="eth0")
    ap.add_argument("--port", type=int, default=9101, help="metrics port")
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--count", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = args.target.rpartition(":")
    workers = [w for w in args.workers.split(",") if w] or None

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

    cfg = configured_path(args.profile, args.node, args.peer_node, workers)
    while True:
        backend = backend_of(args.dev)
        lab = (args.node, args.peer_node, backend)
        conf["rtt_seconds"].labels(*lab).set(cfg["rtt_s"])
        conf["loss_ratio"].labels(*lab).set(cfg["loss_ratio"])
        rate.labels(*lab).set(cfg["rate_bps"])
        try:
            res = probe.measure_udp(host, int(port), count=args.count, interval_s=0.02, drain_s=1.0).summary()
        except OSError as err:
            log.warning("probe to %s failed: %s", args.target, err)
        else:
            probes.labels(args.node, args.peer_node).inc(args.count)
            if not math.isnan(res["rtt_ms_median"]):
                meas["rtt_seconds"].labels(*lab).set(res["rtt_ms_median"] / 1000)
            meas["loss_ratio"].labels(*lab).set(res["round_trip_loss"])
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
