"""Two network namespaces joined by a veth pair, and the processes that run inside them.

Why namespaces: they give the guest two "hosts" with a real link between them, so shaping one end and measuring
from the other crosses exactly the qdiscs under test and nothing else. Everything here is created by the test and
deleted again; names carry a prefix so a crashed earlier run can be cleaned up by name.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IP = "/usr/sbin/ip"
TC = "/usr/sbin/tc"  # full path: busybox (in the initramfs and on PATH) has a tc applet of its own
HERE = Path(__file__).resolve().parent
PROBES = str(HERE / "vm_probes.py")


class LabError(RuntimeError):
    """A lab command failed; the message quotes the command and its stderr."""


def run(argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; raise LabError with its stderr when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        raise LabError(f"exit {proc.returncode}: {' '.join(argv)}\n{proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class VethLab:
    """Namespace `ns_a` holds `dev_a` (`ip_a`), namespace `ns_b` holds `dev_b` (`ip_b`), on one /24."""

    ns_a: str = "nvmA"
    ns_b: str = "nvmB"
    dev_a: str = "vethA"
    dev_b: str = "vethB"
    ip_a: str = "10.77.0.1"
    ip_b: str = "10.77.0.2"
    mtu: int = 9000
    """Jumbo frames let an emulated CPU offer 130 Mbit/s (for the 100 Mbit/s profile) in ~1800 packets/s;
    shapers count bytes, so the frame size changes how hard the meter works, not what is measured."""

    def create(self) -> None:
        self.delete()
        run([IP, "netns", "add", self.ns_a])
        run([IP, "netns", "add", self.ns_b])
        run([IP, "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth", "peer", "name", self.dev_b,
             "netns", self.ns_b])
        for ns, dev, addr in ((self.ns_a, self.dev_a, self.ip_a), (self.ns_b, self.dev_b, self.ip_b)):
            run([IP, "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            run([IP, "-n", ns, "link", "set", "lo", "up"])
            run([IP, "-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up"])

    def delete(self) -> None:
        """Remove both namespaces (the veth pair and any IFB inside them go with them). Idempotent."""
        for ns in (self.ns_a, self.ns_b):
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=30)

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", ns, *argv]

    def python(self, ns: str, args: list[str], timeout: float = 120.0,
               env: dict[str, str] | None = None) -> str:
        return run(self.exec_argv(ns, [sys.executable, *args]), timeout=timeout, env=env)

    def start(self, ns: str, args: list[str], ready_timeout: float = 60.0) -> subprocess.Popen[str]:
        """Start a vm_probes role in `ns` and wait until it prints READY (bounded), so no probe races its bind."""
        proc = subprocess.Popen(self.exec_argv(ns, [sys.executable, PROBES, *args]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + ready_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if sel.select(min(left, 1.0)):
                    line = proc.stdout.readline()  # READY is written with one flushed write: a whole line
                    if line.strip() == "READY":
                        return proc
                    if not line:  # EOF: the role died before binding
                        break
        err = ""
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            err = proc.communicate(timeout=10)[1]
        raise LabError(f"{args[0]} in {ns} not ready within {ready_timeout}s (exit {proc.returncode}): {err.strip()}")

    def probes(self, ns: str, args: list[str], timeout: float = 120.0) -> dict[str, Any]:
        """Run a vm_probes role to completion in `ns` and return its JSON result."""
        out: dict[str, Any] = json.loads(self.python(ns, [PROBES, *args], timeout=timeout))
        return out

    def qdiscs(self, ns: str, dev: str) -> list[dict[str, Any]]:
        """Kernel view of `dev`'s qdiscs (tc -j), with counters dropped."""
        raw = json.loads(run([TC, "-n", ns, "-j", "qdisc", "show", "dev", dev]) or "[]")
        return [{k: q.get(k) for k in ("kind", "handle", "parent", "root")} for q in raw]

    def links(self, ns: str) -> list[str]:
        """Names of every link in `ns` (to see that an IFB came and went)."""
        return [x["ifname"] for x in json.loads(run([IP, "-n", ns, "-j", "link", "show"]) or "[]")]


def reap(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """Wait for a started role to finish and return its JSON result."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise LabError(f"process did not finish within {timeout}s") from None
    if proc.returncode != 0:
        raise LabError(f"exit {proc.returncode}: {err.strip()}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
