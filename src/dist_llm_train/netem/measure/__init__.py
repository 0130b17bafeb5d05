"""Measuring links: probes, the running system's link monitor, and the fidelity checks behind tests and benches.

    probe.py               UDP echo (RTT, one-way delay, forward loss), TCP goodput, paced UDP flood; `netem probe`
    link_monitor.py        a worker's links, configured vs measured, as `dlt_link_*` gauges and telemetry
    path_report.py         a kernel-shaped path (Compose, Swarm), configured vs measured, as telemetry `links` records
    kernel_fidelity.py     kernel backends: two namespaces and a veth pair, shaped with the CLI, measured
    tcp_probe.py           userspace backend: framed TCP probes, sinks and bulk transfers through its relays
    userspace_fidelity.py  userspace backend: a real shaper process on loopback, measured from outside
    stats.py               the judgement: exact binomial interval for loss, delay tolerance, rate change points

Names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_llm_train.netem._lazy import lazy_attribute

if TYPE_CHECKING:
    from dist_llm_train.netem.measure.kernel_fidelity import NetnsPair
    from dist_llm_train.netem.measure.link_monitor import LinkMonitor
    from dist_llm_train.netem.measure.probe import measure_tcp_rate, measure_udp, udp_flood
    from dist_llm_train.netem.measure.stats import binomial_interval, change_point, delay_ok

__all__ = [
    "LinkMonitor",
    "NetnsPair",
    "binomial_interval",
    "change_point",
    "delay_ok",
    "measure_tcp_rate",
    "measure_udp",
    "udp_flood",
]
_SOURCES = {
    "LinkMonitor": "link_monitor",
    "NetnsPair": "kernel_fidelity",
    "binomial_interval": "stats",
    "change_point": "stats",
    "delay_ok": "stats",
    "measure_tcp_rate": "probe",
    "measure_udp": "probe",
    "udp_flood": "probe",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _SOURCES, name)
