"""Supervised restarts in an embedded run: a dead parameter server or controller is started again.

One thread watches the supervised children (the PS and the controller). When one exits while the run is not
stopping — `kill -9`, an OOM kill, a crash — it waits a backoff (doubling per restart of that service), starts
the same command again (same ports, same checkpoint folder, same SQLite file, same log) and waits until it
answers. A service that dies more than `max_restarts` times is given up on: the run then fails with that
reason instead of a traceback.

What a restart costs (docs/operations.md):
- the PS resumes from its newest checkpoint, written every `paramserver.checkpoint_every` versions, so the
  versions published after it (fewer than one interval, plus any published while that checkpoint was being
  written) are trained again; updates buffered in the open round are sent again by their workers, and updates
  based on a lost version are refused with ABORTED and recomputed — no task attempt is spent on either;
- the controller loses nothing it committed (SQLite): workers retry their calls until it answers, and the
  workers it knew get one full heartbeat timeout to reach the new process.

`RestartEvent` is what the run's summary reports for each restart.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from dist_llm_train.embedded.processes import Child, ProcessGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """How often, and how soon, a dead service is started again."""

    max_restarts: int = 3  # per service; 0 turns supervision off (a death fails the run)
    first_backoff_s: float = 0.5  # wait before the first restart of a service; doubles for each further one
    max_backoff_s: float = 8.0
    ready_timeout_s: float = 60.0  # a restarted service that does not answer within this fails the run


@dataclass
class RestartEvent:
    """One restart of one service, as the summary reports it (times in seconds since the run started)."""

    service: str
    restart: int  # 1 for the service's first restart
    exit_code: int | None  # negative: killed by that signal (-9: SIGKILL)
    died_s: float  # when the supervisor saw it gone (within its poll interval of the death)
    ready_s: float | None = None  # when the new process answered; None: it did not
    downtime_s: float | None = None
    # The PS only: the newest version seen before the death (by the launcher or in a worker's telemetry; a lower
    # bound of the version at the death), the version the restarted server resumed at (its newest checkpoint),
    # and their difference.
    version_seen_before: int | None = None
    version_resumed: int | None = None
    versions_lost: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Supervised:
    """One supervised service: its child, and `revive(child)` that starts it again and waits until it answers."""

    child: Child
    revive: Callable[[Child], None]
    restarts: int = 0
    restarting: bool = False


@dataclass
class Supervisor:
    """Watches `services` every `poll_s`; restarts the dead ones by `policy`. `failure` is set once it gives up."""

    procs: ProcessGroup
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    poll_s: float = 0.1
    on_death: Callable[[RestartEvent], None] | None = None  # e.g. note the version seen before it
    on_ready: Callable[[RestartEvent], None] | None = None  # e.g. read the version the PS resumed at
    services: dict[str, Supervised] = field(default_factory=dict)
    events: list[RestartEvent] = field(default_factory=list)
    failure: str | None = None
    _t0: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch(self, child: Child, revive: Callable[[Child], None]) -> None:
        self.services[child.name] = Supervised(child, revive)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.policy.ready_timeout_s + 5)

    def down(self) -> list[str]:
        """Services not serving now (dead or being restarted): callers wait for them instead of failing."""
        return [name for name, s in self.services.items() if s.restarting or not s.child.alive()]

    def restarts(self, service: str) -> int:
        return self.services[service].restarts if service in self.services else 0

    def now_s(self) -> float:
        return time.monotonic() - self._t0

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.procs.stopping or self.failure is not None:
                return
            for s in self.services.values():
                if not s.child.alive() and not self._stop.is_set() and not self.procs.stopping:
                    self._restart(s)
                    if self.failure is not None:
                        return

    def _restart(self, s: Supervised) -> None:
        child = s.child
        exit_code = child.proc.returncode if child.proc is not None else None
        event = RestartEvent(child.name, s.restarts + 1, exit_code, round(self.now_s(), 3))
        log.warning("%s exited (code %s); %d restart(s) so far", child.name, exit_code, s.restarts)
        if s.restarts >= self.policy.max_restarts:
            self.failure = (f"{child.name} exited (code {exit_code}) after {s.restarts} restart(s); the limit is "
                            f"{self.policy.max_restarts} (--max-restarts). Its log: {child.log_path}\n{child.tail()}")
            return
        s.restarting = True
        try:
            if self.on_death is not None:
                self.on_death(event)
            backoff = min(self.policy.first_backoff_s * 2**s.restarts, self.policy.max_backoff_s)
            if self._stop.wait(backoff) or self.procs.stopping:
                return
            s.restarts += 1
            self.events.append(event)
            s.revive(child)
            event.ready_s = round(self.now_s(), 3)
            event.downtime_s = round(event.ready_s - event.died_s, 3)
            if self.on_ready is not None:
                self.on_ready(event)
            log.warning("%s is back after %.1fs (restart %d of at most %d)", child.name, event.downtime_s,
                        s.restarts, self.policy.max_restarts)
        except Exception as err:  # the restarted process did not come up: nothing more to try
            event.error = f"{type(err).__name__}: {err}"
            if not self.procs.stopping:
                self.failure = f"restarting {child.name} failed: {event.error}"
        finally:
            s.restarting = False

    def report(self, checkpoint_every: int) -> dict[str, Any]:
        """The summary's `restarts` block."""
        ps_lost = [e.versions_lost for e in self.events if e.versions_lost is not None]
        return {
            "policy": asdict(self.policy),
            "checkpoint_every": checkpoint_every,
            "counts": {name: s.restarts for name, s in self.services.items()},
            "max_versions_lost": max(ps_lost) if ps_lost else 0,
            "events": [e.to_json() for e in self.events],
        }
