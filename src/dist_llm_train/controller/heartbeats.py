"""Heartbeats in memory: the controller's hot path, and the interval it tells a growing fleet.

A heartbeat from a worker this process already knows alive only updates `HeartbeatBook` (a dict under a
short lock, no SQLite, no thread hop); the failure detector writes the beats that arrived since its last tick
to SQLite in one statement (`take_dirty`) and reads the book for the newest times. Measured on 2 cores with
1,000 workers at 1 Hz (benchmarks/controller_load.py): one SQLite transaction per heartbeat on FastAPI's thread
pool took 0.95 cores and a p99 of 855 ms; the book is what makes the same load cheap.

`interval_for` is the adaptive interval: a fleet larger than `max_rate × base interval` is told a longer
interval (a whole multiple of the base, so it only changes when the fleet crosses a step), keeping the
controller's heartbeat rate under `max_rate`. Each worker's death timeout is `miss_limit ×` the interval it was
last told, so a worker that has not yet heard of a shorter interval is never declared dead early.

`LoopLoad` covers the other way a controller falls behind: too little CPU (the machine is shared). Its event loop's
lateness is added to every timeout and, while large, doubles the interval told.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


def interval_for(fleet: int, base_s: float, max_rate: float | None, cap_s: float = 300.0) -> float:
    """The interval that keeps `fleet` workers under `max_rate` heartbeats/s: `base_s`, or a whole multiple of it.

    `max_rate=None`: always `base_s` (a fixed interval, as the simulator models it)."""
    if max_rate is None or fleet <= max_rate * base_s:
        return base_s
    return min(cap_s, math.ceil(fleet / (max_rate * base_s)) * base_s)


@dataclass
class Beat:
    at: float
    """When the newest heartbeat arrived (the service's clock)."""
    told_s: float
    """The interval this worker was last told; its death timeout is miss_limit × this."""
    activity: str | None
    """Its last reported activity, None if it never sent one."""


class HeartbeatBook:
    """The last heartbeat of every worker this process knows alive; SQLite receives them in batches.

    Only workers admitted here (at registration, or at a heartbeat that went the slow way through SQLite)
    take the fast path: an unknown or dead worker's heartbeat must reach the store, which decides."""

    def __init__(self) -> None:
        self._beats: dict[str, Beat] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._beats)

    def admit(self, worker_id: str, at: float, told_s: float, activity: str | None = None) -> None:
        """The store already holds this beat (registration, slow-path heartbeat): known alive, nothing to flush."""
        with self._lock:
            self._beats[worker_id] = Beat(at, told_s, activity)
            self._dirty.discard(worker_id)

    def beat(self, worker_id: str, at: float, told_s: float, activity: str | None) -> bool:
        """Record a heartbeat of a known-alive worker; False (nothing recorded) for any other."""
        with self._lock:
            old = self._beats.get(worker_id)
            if old is None:
                return False
            self._beats[worker_id] = Beat(max(at, old.at), told_s, activity or old.activity)
            self._dirty.add(worker_id)
            return True

    def get(self, worker_id: str) -> Beat | None:
        return self._beats.get(worker_id)

    def forget_if_silent(
        self, worker_id: str, stored_at: float, now: float, miss_limit: int, timeout_s: float, grace_s: float = 0.0
    ) -> bool:
        """Drop a worker silent past its timeout (True: it is dead); False if it was heard in time after all.

        Its last beat is the newer of the book's and `stored_at` (the store's row); its timeout is miss_limit ×
        the interval it was last told, or `timeout_s` for a worker this process has not heard yet, plus `grace_s`
        (the controller's own recent lateness)."""
        with self._lock:
            beat = self._beats.get(worker_id)
            last = stored_at if beat is None else max(stored_at, beat.at)
            if now - last <= (timeout_s if beat is None else miss_limit * beat.told_s) + grace_s:
                return False
            self._beats.pop(worker_id, None)
            self._dirty.discard(worker_id)
            return True

    def take_dirty(self) -> list[tuple[str, float, str | None]]:
        """(worker_id, at, activity) of every beat recorded since the last call, for one batched write."""
        with self._lock:
            ids, self._dirty = self._dirty, set()
            return [(w, self._beats[w].at, self._beats[w].activity) for w in ids if w in self._beats]


class LoopLoad:
    """How late the controller's own event loop runs, and the interval multiplier that follows from it.

    A controller short of CPU reads heartbeats late, and would then declare workers dead for its own slowness
    (measured: 1,000 workers at 1 Hz on a machine whose other load left the controller a third of a core, 2,073
    deaths in 20 s before this guard). So the failure detector adds the loop's recent lateness to every timeout,
    and the interval told to workers doubles while the loop lags by more than a quarter of it (halving again once
    the lag has stayed under a twentieth of it for `calm_s`), which brings the load down to what the CPU can serve.
    The grace is the worst lag of the window; raising the interval takes a sustained one (its 90th percentile over
    at least `min_samples`), so one stall — a collection, a large /status — does not slow the whole fleet.
    A mass failure of workers does not look like this: fewer heartbeats make the loop *less* late."""

    def __init__(
        self, window_s: float = 5.0, calm_s: float = 10.0, max_factor: int = 16, min_samples: int = 20
    ) -> None:
        self.window_s, self.calm_s, self.max_factor, self.min_samples = window_s, calm_s, max_factor, min_samples
        self.factor = 1
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag)
        self._calm_since: float | None = None
        self._raised_at = -math.inf
        self._lock = threading.Lock()

    def lag_s(self) -> float:
        """The worst lateness seen in the last `window_s` (0 with no samples: nothing measures, e.g. in tests)."""
        with self._lock:
            return max((lag for _, lag in self._samples), default=0.0)

    def observe(self, lag_s: float, now: float, interval_s: float) -> None:
        """One lateness sample at `now`; `interval_s` is the interval told now (with the current factor)."""
        with self._lock:
            self._samples.append((now, max(0.0, lag_s)))
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()
            lags = sorted(lag for _, lag in self._samples)
            worst, sustained = lags[-1], lags[int(0.9 * (len(lags) - 1))]
            if sustained > interval_s / 4 and len(lags) >= self.min_samples:
                # Raised at most once per window: the workers need a beat to hear it, and the lag samples of
                # before stay (they are the grace the detector gives while it takes effect).
                if self.factor < self.max_factor and now - self._raised_at >= self.window_s:
                    self.factor *= 2
                    self._raised_at = now
                self._calm_since = None
            elif worst < interval_s / 20 and self.factor > 1:
                self._calm_since = now if self._calm_since is None else self._calm_since
                if now - self._calm_since >= self.calm_s:
                    self.factor //= 2
                    self._calm_since = None
            else:
                self._calm_since = None


async def watch_loop(load: LoopLoad, interval_s: Callable[[], float], clock: Callable[[], float],
                     period_s: float = 0.1) -> None:
    """Feed `load` with how late a `period_s` sleep wakes on this event loop, until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        load.observe(loop.time() - start - period_s, clock(), interval_s())
