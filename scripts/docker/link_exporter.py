"""Network fidelity exporter: configured vs measured link figures for this container's path to a peer.

Runs in the background of a worker container (started by the entrypoint when DLT_PROBE_TARGET is set). Every
interval it sends a short paced UDP probe train, marked as the ps_sync class, to the peer's
`dist-llm-train netem probe --listen` responder and compares the median RTT and the round-trip loss with what the
profile configures for this path (this node's egress plus the peer's, and either end's ingress override, all
resolved by the project's own profile code, so the figures mean exactly what shaping applied). Two outputs:

* `dlt_link_*` gauges on its own port for Prometheus (the "network fidelity" dashboard);
* `--report-file`: the same figures as the `links` records of worker telemetry (netem/measure/path_report.py);
  the worker, told the file by DLT_LINK_REPORT_FILE, sends them to the controller, whose /status shows them.

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
from dist_llm_train.netem.measure.path_report import ProbeWindow, configured_path, path_report, write_reports
from dist_llm_train.netem.profile.loading import load_profile

log = logging.getLogger("dlt-link-exporter")
TRAFFIC_CLASS = "ps_sync"  # the probes carry training's mark, so a per-class override applies to both alike


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
    ap.add_argument("--report-file", default=None, help="write the path's `links` records here (JSON)")
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

    cfg = configured_path(load_profile(args.profile), args.node, args.peer_node, workers, TRAFFIC_CLASS)
    window = ProbeWindow()
    link = f"{args.node}->{args.peer_node}"
    while True:
        backend = backend_of(args.dev)
        lab = (args.node, args.peer_node, backend)
        conf["rtt_seconds"].labels(*lab).set(cfg.rtt_ms / 1000)
        conf["loss_ratio"].labels(*lab).set(cfg.loss_ratio)
        bottleneck = cfg.bottleneck_rate_mbit
        rate.labels(*lab).set(math.nan if bottleneck is None else bottleneck * 1e6)
        if args.report_file and window.loss_ratio is None:  # the configured side at once, before the first train
            write_reports(args.report_file, [path_report(link, TRAFFIC_CLASS, backend, cfg, window)])
        try:
            res = probe.measure_udp(host, int(port), count=args.count, interval_s=0.02, drain_s=1.0,
                                    traffic_class=TRAFFIC_CLASS)
        except OSError as err:
            log.warning("probe to %s failed: %s", args.target, err)
        else:
            probes.labels(args.node, args.peer_node).inc(args.count)
            window.add(res.sent, res.rtt_ms)
            if window.rtt_ms is not None:
                meas["rtt_seconds"].labels(*lab).set(window.rtt_ms / 1000)
            if window.loss_ratio is not None:
                meas["loss_ratio"].labels(*lab).set(window.loss_ratio)
            if args.report_file:
                write_reports(args.report_file, [path_report(link, TRAFFIC_CLASS, backend, cfg, window)])
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
