"""The failure detector: a background loop that turns silence into reassignment.

Every `heartbeat_interval_s / 2` (or at once when something changed) it declares workers
silent for `heartbeat_interval_s × heartbeat_miss_limit` dead, frees their tasks, runs a
scheduling pass and pushes the resulting membership to the parameter server. `tick()` is
synchronous and uses the service's clock, so tests drive detection without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from dist_llm_train.controller.membership import MembershipSync, SyncReport
from dist_llm_train.controller.schedulers import Assignment
from dist_llm_train.controller.service import ControllerService

log = logging.getLogger(__name__)


@dataclass
class TickReport:
    dead: list[str] = field(default_factory=list)
    assigned: list[Assignment] = field(default_factory=list)
    membership: SyncReport = field(default_factory=SyncReport)


class FailureDetector:
    def __init__(self, svc: ControllerService, membership: MembershipSync) -> None:
        self.svc = svc
        self.membership = membership
        self.interval_s = svc.cfg.heartbeat_interval_s / 2
        self.ticks = 0
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def tick(self) -> TickReport:
        dead = self.svc.detect_failures()
        assigned = self.svc.schedule()
        report = TickReport([w.worker_id for w in dead], assigned, self.membership.sync())
        self.membership.refresh_worker_stats(self.svc.clock())
        self.ticks += 1
        return report

    def wake(self) -> None:
        """Thread-safe: ask the loop to tick now (called by request handlers on any change)."""
        loop, event = self._loop, self._wake
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop shutting down
                loop.call_soon_threadsafe(event.set)

    def start(self) -> asyncio.Task[None]:
        """Start the loop on the running event loop; `stop()` ends it after the current tick."""
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        return asyncio.create_task(self._run(self._wake), name="failure-detector")

    async def _run(self, wake: asyncio.Event) -> None:
        """Tick until `stop()`; an error in one tick is logged and the next tick still runs."""
        while not self._stopping:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("failure detector tick failed; retrying next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=self.interval_s)
            wake.clear()

    def stop(self) -> None:
        self._stopping = True
        self.wake()
