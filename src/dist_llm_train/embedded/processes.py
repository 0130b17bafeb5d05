"""Child-process management for embedded mode: start, wait until ready, stop without orphans.

Children run in their own session (so a terminal's Ctrl-C reaches only the launcher, which
then stops them in order) and set PR_SET_PDEATHSIG on themselves at start-up, so even a
`kill -9` of the launcher takes them down with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


PARENT_ENV = "DLT_DIE_WITH_PARENT"


def die_with_parent_if_asked() -> None:
    """Called first thing in a child: ask the kernel for SIGTERM when the launcher dies.

    The child does this itself (not a `preexec_fn`), because a `preexec_fn` makes Python run
    every at-fork handler in the parent — grpcio's among them, which can hang a launcher
    that already holds gRPC channels.
    """
    parent = os.environ.pop(PARENT_ENV, None)  # popped: grandchildren must not inherit it
    if parent is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the launcher died before we asked
        os._exit(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cli_command(*args: str) -> list[str]:
    """The same `dist-llm-train serve ...` entry point the containers use, via this interpreter."""
    return [sys.executable, "-m", "dist_llm_train", *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0  # 1 after the first start; each supervised restart adds one
    # What `start` added to the group's environment for this child (its credential): a restart passes it again.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ProcessGroup:
    """Owns every child of one run; `stop_all` is safe to call many times."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.env = {**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())}
        self.stopping = False  # set by stop_all: from then on a supervisor must not restart anyone
        self._lock = threading.Lock()  # start/restart (a supervisor thread) against stop_all

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """Start `argv` as child `name`; `env` adds to the group's environment for this child only."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(name=name, argv=list(argv), log_path=self.log_dir / f"{name}.log", env=dict(env or {}))
        with self._lock:
            self._spawn(child)
            self.children.append(child)
        log.debug("started %s pid=%d: %s", name, child.pid, " ".join(child.argv))
        return child

    def _spawn(self, child: Child) -> None:
        if self.stopping:
            raise RuntimeError(f"not starting {child.name}: the run is stopping")
        if child._log_file is None:
            child._log_file = open(child.log_path, "ab")  # noqa: SIM115 - closed in stop_all
        child.proc = subprocess.Popen(
            child.argv,
            stdout=child._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.env, **child.env} if child.env else self.env,
            start_new_session=True,
        )
        child.starts += 1

    def restart(self, child: Child) -> Child:
        """Start a dead child again: same command, same log file (appended to), same `Child`."""
        if child.alive():
            raise RuntimeError(f"{child.name} is still running (pid {child.pid})")
        assert child.proc is not None
        with contextlib.suppress(ProcessLookupError):  # whatever it started in its session goes with it
            os.killpg(child.proc.pid, signal.SIGKILL)
        with self._lock:
            self._spawn(child)
        log.info("restarted %s (start %d) pid=%d", child.name, child.starts, child.pid)
        return child

    def wait_ready(self, child: Child, probe: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited during start-up:\n{child.tail()}")
            with contextlib.suppress(Exception):
                if probe():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{child.name} not ready after {timeout_s:.0f}s:\n{child.tail()}")

    def stop_all(self, grace_s: float = 10.0) -> None:
        with self._lock:
            self.stopping = True
        # Workers first (they give their tasks back), then the controller, then the PS (it checkpoints).
        for child in reversed(self.children):
            if child.alive():
                assert child.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(timeout=5)
            if child._log_file is not None:
                child._log_file.close()
                child._log_file = None
