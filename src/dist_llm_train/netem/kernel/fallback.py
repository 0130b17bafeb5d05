"""Shaping for kernels without sch_netem: htb for rate, iptables `statistic` for loss, an NFQUEUE delayer daemon
for delay and jitter.

Where each piece sits and why:
  * rate — htb tree on the device's egress (the same per-class tree as tc_netem, pfifo leaves);
  * random loss — `iptables -t mangle` rules in a chain of our own jumped to from PREROUTING for the device,
    matched per class with `-m dscp`, dropping with `-m statistic --mode random`;
  * delay, jitter, correlated or Gilbert–Elliott loss, schedules — the delayer daemon (kernel/delayer.py) fed by an
    NFQUEUE rule in the same chain. It must be the receiver's ingress: on egress TCP small queues collapse it.
Because delay is applied where packets arrive, a node's one-way delay figure delays the traffic *it receives*
(tc_netem delays what it sends). Every round trip crosses both nodes, so RTTs are identical; only the split of
an asymmetric pair's two directions is mirrored. Not emulated here: duplicate, reorder (beyond what jitter
causes), corrupt — `describe` lists them under `not_emulated`. IPv4 only (iptables, TOS byte).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from dist_llm_train.netem.backends import ShapingError, read_state_file, reap, register, runs_module
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.kernel.base import KernelBackend
from dist_llm_train.netem.kernel.tc_tree import htb_tree, ifb_name, ifb_redirect, pfifo_args
from dist_llm_train.netem.profile.classes import DSCP, TRAFFIC_CLASSES, TrafficClass
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, to_one_way
from dist_llm_train.netem.profile.schema import Link, LinkOverride, Profile, RandomLoss

DAEMON_MODULE = "dist_llm_train.netem.kernel.delayer"


def chain_name(dev: str) -> str:
    return f"DLT-{dev}"[:28]


def queue_num(dev: str) -> int:
    return 1000 + zlib.crc32(dev.encode()) % 60000


def _combine(link: Link, extra: Link | None) -> Link:
    """Receiver-side link: the node's own one-way figures plus any asymmetric ingress extra."""
    if extra is None:
        return link
    p = 1 - (1 - link.loss_pct / 100) * (1 - extra.loss_pct / 100)
    loss = link.loss if extra.loss_pct == 0 else RandomLoss(pct=round(p * 100, 6))
    return link.model_copy(update={"delay_ms": link.delay_ms + extra.delay_ms,
                                   "jitter_ms": link.jitter_ms + extra.jitter_ms, "loss": loss})


def _iptables_loss(link: Link) -> float:
    """Probability handled by iptables statistic (plain uncorrelated random loss), else 0."""
    loss = link.loss
    return loss.pct / 100 if isinstance(loss, RandomLoss) and not loss.correlation_pct else 0.0


def _daemon_class(link: Link) -> dict[str, Any]:
    loss = link.loss
    daemon_loss = None if _iptables_loss(link) or link.loss_pct == 0 else loss.model_dump()
    return {"delay_ms": link.delay_ms, "jitter_ms": link.jitter_ms, "distribution": link.distribution,
            "delay_correlation_pct": link.delay_correlation_pct, "loss": daemon_loss}


def _needs_queue(link: Link) -> bool:
    return bool(link.delay_ms or link.jitter_ms or _daemon_class(link)["loss"])


@register
class KernelFallbackBackend(KernelBackend):
    name = "kernel_fallback"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        missing = [tool for tool in ("tc", "iptables") if shutil.which(tool) is None]
        if missing:
            return False, f"missing {', '.join(missing)} (scripts/install_system_deps.sh)"
        try:
            import netfilterqueue  # noqa: F401
        except ImportError:
            return False, "python package NetfilterQueue not installed (pip install 'dist-llm-train[netem]')"
        if os.geteuid() != 0:
            return False, "needs root (CAP_NET_ADMIN) for tc and iptables"
        return True, "htb + iptables statistic + NFQUEUE delayer available"

    def _ifb_for(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None) -> str | None:
        extra = ingress_link(profile, node, workers)
        return ifb_name(dev) if extra is not None and extra.rate_mbit else None

    def receiver_links(self, profile: Profile, node: str | None, workers: list[str] | None,
                       segment: LinkOverride | None = None) -> dict[TrafficClass | None, Link]:
        extra = ingress_link(profile, node, workers)
        return {k: _combine(v, extra) for k, v in egress_links(profile, node, workers, segment).items()}

    def iptables_rules(self, dev: str, links: dict[TrafficClass | None, Link]) -> list[list[str]]:
        chain, ipt = chain_name(dev), ["iptables", "-w", "5", "-t", "mangle"]
        rules: list[list[str]] = []
        for tc in (*TRAFFIC_CLASSES, None):
            link = links[tc]
            match = ["-m", "dscp", "--dscp", str(DSCP[tc])] if tc else []
            if _iptables_loss(link):
                rules.append([*ipt, "-A", chain, *match, "-m", "statistic", "--mode", "random",
                              "--probability", f"{_iptables_loss(link):.6f}", "-j", "DROP"])
            if _needs_queue(link):
                rules.append([*ipt, "-A", chain, *match, "-j", "NFQUEUE", "--queue-num", str(queue_num(dev)),
                              "--queue-bypass"])
            if tc:
                rules.append([*ipt, "-A", chain, *match, "-j", "RETURN"])
        return rules

    def plan(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None) -> list[list[str]]:
        cmds = htb_tree(dev, egress_links(profile, node, workers), pfifo_args)
        ifb = self._ifb_for(profile, node, dev, workers)
        if ifb is not None:
            extra = ingress_link(profile, node, workers)
            assert extra is not None
            cmds += ifb_redirect(dev, ifb)
            cmds += htb_tree(ifb, {k: extra for k in egress_links(profile, node, workers)}, pfifo_args)
        ipt = ["iptables", "-w", "5", "-t", "mangle"]
        cmds += [[*ipt, "-N", chain_name(dev)], [*ipt, "-A", "PREROUTING", "-i", dev, "-j", chain_name(dev)]]
        cmds += self.iptables_rules(dev, self.receiver_links(profile, node, workers))
        return cmds

    def daemon_config(self, profile: Profile, node: str | None, dev: str,
                      workers: list[str] | None) -> dict[str, Any] | None:
        links = self.receiver_links(profile, node, workers)
        queued = any(_needs_queue(link) for link in links.values())
        if not queued and profile.schedule is None:
            return None
        cfg: dict[str, Any] = {"queue": queue_num(dev) if queued else None, "dev": dev,
                               "classes": {str(k or "default"): _daemon_class(v) for k, v in links.items()}}
        if profile.schedule is not None:
            one_way = to_one_way(profile)
            assert one_way.schedule is not None
            segs = []
            for seg in one_way.schedule.segments:
                seg_links = self.receiver_links(profile, node, workers, seg.link)
                cmds = htb_tree(dev, egress_links(profile, node, workers, seg.link), pfifo_args, verb="change")
                cmds += [["iptables", "-w", "5", "-t", "mangle", "-F", chain_name(dev)],
                         *self.iptables_rules(dev, seg_links)]
                segs.append({"duration_s": seg.duration_s, "commands": cmds,
                             "classes": {str(k or "default"): _daemon_class(v) for k, v in seg_links.items()}})
            cfg["schedule"] = {"kind": one_way.schedule.kind, "segments": segs}
        return cfg

    def _start(self, state: dict[str, Any], profile: Profile, node: str | None, dev: str,
               workers: list[str] | None) -> None:
        cfg = self.daemon_config(profile, node, dev, workers)
        if cfg is None:
            return
        base = shell.state_path(dev)
        cfg_path, pidfile, log, sched = (base.with_suffix(s) for s in (".delayer.json", ".pid", ".log",
                                                                        ".schedule.json"))
        if cfg.get("schedule"):
            cfg["schedule_file"] = str(sched)
            state["schedule_file"] = str(sched)
        cfg_path.write_text(json.dumps(cfg))
        pidfile.unlink(missing_ok=True)
        with open(log, "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", DAEMON_MODULE, "--config", str(cfg_path),
                                     "--pidfile", str(pidfile)], stdout=logf, stderr=logf,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        state.update(pid=proc.pid, pidfile=str(pidfile), daemon_log=str(log), daemon_config=str(cfg_path))
        shell.write_state(dev, state)
        deadline = time.monotonic() + 10
        while not pidfile.exists():
            if proc.poll() is not None:
                raise ShapingError(f"delayer daemon exited ({proc.returncode}): {log.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise ShapingError(f"delayer daemon did not start within 10 s; see {log}")
            time.sleep(0.05)

    def _stop(self, state: dict[str, Any]) -> list[list[str]]:
        pid = state.get("pid")
        if pid and runs_module(pid, DAEMON_MODULE):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not runs_module(pid, DAEMON_MODULE):
                    break
                reap(pid)
                time.sleep(0.03)
            else:
                os.kill(pid, signal.SIGKILL)
            reap(pid)
        dev = state["dev"]
        ipt = ["iptables", "-w", "5", "-t", "mangle"]
        cmds = [[*ipt, "-D", "PREROUTING", "-i", dev, "-j", chain_name(dev)],
                [*ipt, "-F", chain_name(dev)], [*ipt, "-X", chain_name(dev)]]
        for cmd in cmds:
            shell.run(cmd, check=False)
        for key in ("daemon_config", "daemon_log", "pidfile", "schedule_file"):
            if state.get(key):
                Path(state[key]).unlink(missing_ok=True)
        return cmds

    def describe(self, dev: str) -> dict[str, Any]:
        out = super().describe(dev)
        state = shell.read_state(dev)
        if state is not None:
            profile = Profile.model_validate(state["profile_data"])
            link = egress_links(profile, state["node"], state["workers"])[None]
            out["not_emulated"] = [f for f in ("duplicate_pct", "reorder_pct", "corrupt_pct") if getattr(link, f)]
            pid = state.get("pid")
            out["daemon"] = {"pid": pid, "alive": bool(pid and runs_module(pid, DAEMON_MODULE))} if pid else None
            out["delay_applied_at"] = "ingress (receiver side)"
            if state.get("schedule_file"):
                out["schedule"] = read_state_file(Path(state["schedule_file"]))
        return out
