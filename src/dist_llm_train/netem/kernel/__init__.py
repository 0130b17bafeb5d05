"""Kernel shaping: real packets delayed, lost and rate-limited on a network interface (root / CAP_NET_ADMIN).

    tc_netem.py   the real thing: htb per traffic class with a netem leaf each, DSCP filters, IFB for ingress
    fallback.py   kernels without sch_netem: htb for rate, iptables `statistic` for loss, the NFQUEUE delayer
    delayer.py    the fallback's daemon: per-packet delay, bursty loss and schedules from one asyncio loop
    base.py       the life cycle both share: refuse foreign qdiscs, record state first, roll back, clear exactly
    tc_tree.py    the `tc` command lines (htb tree, leaves, DSCP filters, IFB redirect)
    shell.py      running `tc` / `ip` / `iptables`, and the per-(namespace, device) state files

Names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_llm_train.netem._lazy import lazy_attribute

if TYPE_CHECKING:
    from dist_llm_train.netem.kernel.base import KernelBackend
    from dist_llm_train.netem.kernel.fallback import KernelFallbackBackend
    from dist_llm_train.netem.kernel.tc_netem import TcNetemBackend, probe_netem

__all__ = ["KernelBackend", "KernelFallbackBackend", "TcNetemBackend", "probe_netem"]
_SOURCES = {
    "KernelBackend": "base",
    "KernelFallbackBackend": "fallback",
    "TcNetemBackend": "tc_netem",
    "probe_netem": "tc_netem",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _SOURCES, name)
