"""Running `tc` / `ip` / `iptables` and keeping per-device state, with errors that quote the failing command."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from dist_llm_train.netem.backends.base import ShapingError

STATE_ENV = "DLT_NETEM_STATE_DIR"
DEFAULT_STATE_DIR = "/run/dist-llm-train/netem"
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


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV, DEFAULT_STATE_DIR))


def state_path(dev: str) -> Path:
    return state_dir() / f"{netns_id()}-{dev}.json"


def read_state_file(p: Path) -> dict[str, Any] | None:
    """A JSON state file, or None when absent; a corrupt one is an error that names it."""
    if not p.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except json.JSONDecodeError:
        raise ShapingError(f"corrupt state file {p}; inspect it and delete it") from None
    return data


def write_state_file(p: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a state file."""
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, p)


def read_state(dev: str) -> dict[str, Any] | None:
    return read_state_file(state_path(dev))


def write_state(dev: str, state: dict[str, Any]) -> None:
    write_state_file(state_path(dev), state)


def drop_state(dev: str) -> None:
    state_path(dev).unlink(missing_ok=True)


def ensure_device_exists(dev: str) -> bool:
    return Path("/sys/class/net", dev).exists()
