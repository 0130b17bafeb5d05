"""The discrete-event core: a virtual clock and a heap of timed events.

Everything the simulator reuses from the real system (the controller service, its failure detector, the
parameter server's `JobState`) takes a `clock` callable; handing them `VirtualClock` makes them live in
simulated time. Events at the same instant run by kind (control plane first), then in the order they were
scheduled, which keeps runs deterministic.
"""

from __future__ import annotations

import heapq
from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    """Every event type either engine schedules. Control-plane events come first: at equal times a death or a
    detector tick is seen before a message that arrives at the same instant."""

    DEATH = 0
    REJOIN = 1
    JOIN = 2
    HB_STALL = 3  # a live worker's heartbeat stalls in retransmission backoff
    HB_RESUME = 4  # ... and finally arrives
    TICK = 5  # failure-detector tick (detect, schedule, sync membership)
    LEARN = 6  # a worker's assignment poll shows it a new task
    PULL_REQUEST = 7  # a pull request reaches the PS
    PULL_DONE = 8  # parameters delivered to the worker
    COMPUTE_DONE = 9  # worker finished its step and sends the update
    PUSH_ARRIVE = 10  # update reaches the PS
    EXPIRE = 11  # a sync round's straggler deadline
    PUBLISH = 12  # a new version becomes readable (after aggregation time)


Event = tuple[float, Kind, int, Any]
"""(time, kind, sequence number, payload): plain tuples, because the heap compares millions of them."""


class VirtualClock:
    """A callable clock the reused components read; only the engine moves it, and never backwards."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, t: float) -> None:
        if t < self.now:
            raise RuntimeError(f"virtual time cannot go back: {t} < {self.now}")
        self.now = t


class EventQueue:
    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[Event] = []
        self._seq = 0
        self.processed = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, t: float, kind: Kind, data: Any = None) -> None:
        """Schedule `kind` at absolute virtual time `t` (not before now)."""
        if t < self.clock.now:
            raise ValueError(f"cannot schedule {kind.name} in the past ({t} < {self.clock.now})")
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, data))

    def peek_time(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def pop(self) -> Event:
        """The next event; the clock moves to its time."""
        ev = heapq.heappop(self._heap)
        self.clock.advance(ev[0])
        self.processed += 1
        return ev
