"""Building `tc` command lines: an htb tree with one class per traffic class, leaves, DSCP filters, IFB ingress.

Shared by the tc_netem backend (netem leaves) and the kernel fallback (plain fifo leaves, delay done elsewhere).
Layout on a device (handles are fixed so that `show` and `clear` can find them):

    1:   htb root, default 1:10 (unmarked traffic)
    1:1  htb, rate = the highest class rate (the link)
    1:10 default class, 1:11 heartbeat, 1:12 task, 1:13 telemetry, 1:14 ps_sync
         each: ceil = its own rate, guaranteed rate = ceil / 5 so no class can starve another
    10:..14:  leaf qdisc under each class (netem, or pfifo)
    u32 filters on the DSCP bits (mask 0xfc leaves ECN alone) for IPv4 and IPv6 → 1:11..1:14
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from dist_llm_train.netem.profile.classes import CLASS_INDEX, TRAFFIC_CLASSES, TrafficClass, tos_byte
from dist_llm_train.netem.profile.schema import GilbertElliottLoss, Link

UNLIMITED_MBIT = 10_000.0  # htb needs a rate; "no rate" means one no test link here can reach
N_CLASSES = len(TRAFFIC_CLASSES) + 1


def class_minor(tc: TrafficClass | None) -> int:
    return 10 + (CLASS_INDEX[tc] if tc else 0)


def fmt_num(x: float) -> str:
    """Plain decimal (never exponent notation, which tc does not parse), trailing zeros removed."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return s or "0"


def fmt_time(ms: float) -> str:
    return f"{round(ms * 1000)}us"


def fmt_rate(mbit: float | None) -> str:
    return f"{max(1, round((mbit or UNLIMITED_MBIT) * 1000))}kbit"


def netem_args(link: Link) -> list[str]:
    """netem's arguments for one link (rate is left to htb, which is exact and shared per class)."""
    args = ["limit", str(link.limit_packets)]
    if link.delay_ms or link.jitter_ms:
        args += ["delay", fmt_time(link.delay_ms)]
        if link.jitter_ms:
            args.append(fmt_time(link.jitter_ms))
            if link.delay_correlation_pct:
                args.append(fmt_num(link.delay_correlation_pct) + "%")
            args += ["distribution", link.distribution]
    loss = link.loss
    if isinstance(loss, GilbertElliottLoss):
        args += ["loss", "gemodel", fmt_num(loss.p_pct) + "%", fmt_num(loss.r_pct) + "%",
                 fmt_num(loss.bad_loss_pct) + "%", fmt_num(loss.good_loss_pct) + "%"]
    elif loss.pct:
        args += ["loss", "random", fmt_num(loss.pct) + "%"]
        if loss.correlation_pct:
            args.append(fmt_num(loss.correlation_pct) + "%")
    if link.duplicate_pct:
        args += ["duplicate", fmt_num(link.duplicate_pct) + "%"]
    if link.reorder_pct:
        args += ["reorder", fmt_num(link.reorder_pct) + "%"]
        if link.reorder_correlation_pct:
            args.append(fmt_num(link.reorder_correlation_pct) + "%")
    if link.corrupt_pct:
        args += ["corrupt", fmt_num(link.corrupt_pct) + "%"]
    return args


def pfifo_args(link: Link) -> list[str]:
    return ["pfifo", "limit", str(link.limit_packets)]


LeafFn = Callable[[Link], list[str]]


def htb_tree(dev: str, links: dict[TrafficClass | None, Link], leaf: LeafFn | None,
             verb: str = "add") -> list[list[str]]:
    """Commands for the whole tree on `dev`; `verb="change"` re-rates classes and leaves in place (schedules)."""
    top = max(link.rate_mbit or UNLIMITED_MBIT for link in links.values())
    cmds: list[list[str]] = []
    if verb == "add":
        cmds.append(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
    cmds.append(["tc", "class", verb, "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                 "rate", fmt_rate(top), "ceil", fmt_rate(top), "quantum", "1514"])
    for tc in (None, *TRAFFIC_CLASSES):
        link, minor = links[tc], class_minor(tc)
        ceil = link.rate_mbit or UNLIMITED_MBIT
        cmds.append(["tc", "class", verb, "dev", dev, "parent", "1:1", "classid", f"1:{minor}", "htb",
                     "rate", fmt_rate(ceil / N_CLASSES), "ceil", fmt_rate(ceil), "quantum", "1514"])
        if leaf is not None:
            cmds.append(["tc", "qdisc", verb, "dev", dev, "parent", f"1:{minor}", "handle", f"{minor}:",
                         *leaf(link)])
    if verb == "add":
        for tc in TRAFFIC_CLASSES:
            tos, flow = f"{tos_byte(tc):#04x}", f"1:{class_minor(tc)}"
            cmds.append(["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                         "u32", "match", "ip", "dsfield", tos, "0xfc", "flowid", flow])
            cmds.append(["tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ipv6", "prio", "2",
                         "u32", "match", "ip6", "priority", tos, "0xfc", "flowid", flow])
    return cmds


def ifb_name(dev: str) -> str:
    """A stable IFB name for `dev` within the 15-character limit."""
    name = f"ifb-{dev}"
    return name if len(name) <= 15 else f"ifb-{zlib.crc32(dev.encode()):08x}"


def ifb_redirect(dev: str, ifb: str) -> list[list[str]]:
    """Create `ifb` and send everything arriving on `dev` through it (where the ingress tree shapes it)."""
    return [
        ["ip", "link", "add", "name", ifb, "type", "ifb"],
        ["ip", "link", "set", "dev", ifb, "up"],
        ["tc", "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1", "u32",
         "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb],
    ]


def clear_commands(dev: str, ifb: str | None) -> list[list[str]]:
    cmds = [["tc", "qdisc", "del", "dev", dev, "root"], ["tc", "qdisc", "del", "dev", dev, "ingress"]]
    if ifb:
        cmds.append(["ip", "link", "del", "dev", ifb])
    return cmds
