"""Running `tc` / `ip` / `iptables` with errors that quote the failing command, and the kernel backends' state:
one file per (network namespace, device), plus the qdisc snapshot `clear` must restore."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dist_llm_train.netem.backends import ShapingError, read_state_file, state_dir, write_state_file

# Root qdiscs the kernel installs by itself; anything else on a device means someone else is shaping it.
DEFAULT_ROOT_KINDS = frozenset({"noqueue", "pfifo_fast", "mq", "fq_codel", "pfifo", "fq", "noop"})


def run(cmd: list[str], check: bool = True, timeout: float = 20.0, stdin: str | None = None) -> str:
    """Run one command; on failure raise ShapingError naming the command and its stderr."""
    if shutil.which(cmd[0]) is None:
        raise ShapingError(f"{cmd[0]} not found on PATH (install it: scripts/install_system_deps.sh)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
    except subprocess.TimeoutExpired:
        raise ShapingError(f"timed out after {timeout}s: {shlex.join(cmd)}") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        raise ShapingError(f"command failed ({proc.returncode}): {shlex.join(cmd)}: {msg}")
    return proc.stdout


def ensure_device(dev: str) -> None:
    if not dev or "/" in dev or len(dev) > 15:
        raise ShapingError(f"invalid interface name {dev!r}")
    if not Path("/sys/class/net", dev).exists():
        raise ShapingError(f"no such network interface {dev!r} in this network namespace")


def qdisc_snapshot(dev: str) -> list[dict[str, Any]]:
    """The device's qdiscs as (kind, handle, parent) — the part `clear` must restore, without counters."""
    out = run(["tc", "-j", "qdisc", "show", "dev", dev]).strip() or "[]"
    return [{"kind": q.get("kind"), "handle": q.get("handle"), "parent": q.get("parent", "root") if not q.get("root")
             else "root"} for q in json.loads(out)]


def foreign_qdiscs(snapshot: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Qdiscs that neither the kernel's defaults nor an mq's children account for."""
    return [q for q in snapshot if q["parent"] == "root" and q["kind"] not in DEFAULT_ROOT_KINDS
            or q["kind"] in ("ingress", "clsact")]


def netns_id() -> str:
    """Identity of the current network namespace (inode of /proc/self/ns/net)."""
    try:
        return str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        return "unknown"


def state_path(dev: str) -> Path:
    return state_dir() / f"{netns_id()}-{dev}.json"


def read_state(dev: str) -> dict[str, Any] | None:
    return read_state_file(state_path(dev))


def write_state(dev: str, state: dict[str, Any]) -> None:
    write_state_file(state_path(dev), state)


def drop_state(dev: str) -> None:
    state_path(dev).unlink(missing_ok=True)


def device_exists(dev: str) -> bool:
    return Path("/sys/class/net", dev).exists()
