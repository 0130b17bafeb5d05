"""The real thing: htb per traffic class with a netem leaf each, DSCP filters, IFB for asymmetric ingress.

Needs a kernel with sch_netem (not this project's CI kernel — it is verified under qemu on Debian's stock
kernel, see scripts/netem_vm/). `plan` is pure, so golden tests cover it everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from dist_llm_train.netem.backends import ShapingError, register
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.kernel.base import KernelBackend
from dist_llm_train.netem.kernel.tc_tree import htb_tree, ifb_name, ifb_redirect, netem_args
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, to_one_way
from dist_llm_train.netem.profile.schema import Profile


@register
class TcNetemBackend(KernelBackend):
    name = "tc_netem"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        return probe_netem()

    def _ifb_for(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None) -> str | None:
        return ifb_name(dev) if ingress_link(profile, node, workers) is not None else None

    def plan(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None) -> list[list[str]]:
        cmds = htb_tree(dev, egress_links(profile, node, workers), lambda link: ["netem", *netem_args(link)])
        ingress = ingress_link(profile, node, workers)
        if ingress is not None:
            ifb = ifb_name(dev)
            cmds += ifb_redirect(dev, ifb)
            same = {k: ingress for k in egress_links(profile, node, workers)}
            cmds += htb_tree(ifb, same, lambda link: ["netem", *netem_args(link)])
        return cmds

    def segment_commands(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None,
                         index: int) -> list[list[str]]:
        """`tc … change` commands that switch the running tree to schedule segment `index`."""
        assert profile.schedule is not None
        seg = to_one_way(profile).schedule.segments[index].link  # type: ignore[union-attr]
        return htb_tree(dev, egress_links(profile, node, workers, seg),
                        lambda link: ["netem", *netem_args(link)], verb="change")


def probe_netem() -> tuple[bool, str]:
    """Try netem on a throwaway veth pair (created and deleted here) — the only reliable test."""
    if not Path("/proc/self/ns/net").exists():
        return False, "no network namespaces here"
    dev = f"dltprb{os.getpid() % 100000}"
    try:
        shell.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"])
    except ShapingError as err:
        return False, f"cannot create a probe device (need root / CAP_NET_ADMIN): {err}"
    try:
        shell.run(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"])
        return True, "sch_netem works (probe qdisc added on a throwaway veth)"
    except ShapingError as err:
        return False, f"kernel lacks sch_netem: {err}"
    finally:
        shell.run(["ip", "link", "del", dev], check=False)
