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
    PULL_DONE = 8  # parameters delivered to the worker (the exact engine applies it at the push's arrival)
    COMPUTE_DONE = 9  # worker finished its step and sends the update (likewise; their places in this order stay)
    PUSH_ARRIVE = 10  # update reaches the PS
    EXPIRE = 11  # a sync round's straggler deadline
    PUBLISH = 12  # a new version becomes readable (after aggregation time)


Event = tuple[float, Kind, int, Any]
"""(time, kind, sequence number, payload): what `EventQueue.pop` returns."""
_Entry = tuple[Kind, Any, Any, float]
"""(kind, sequence number or given order, payload, time): one pending event, filed under its time."""


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
    """Events in (time, kind, sequence) order.

    Kept as a heap of the distinct pending times, each with its event (or, rarely, several): a heap of plain
    floats costs a third of one of (time, kind, seq, payload) tuples to keep ordered, and an engine moves
    millions of events through it. Events at one instant come out by kind, then sequence, as from the tuples.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._times: list[float] = []  # heap of the distinct times with an event pending
        self._at: dict[float, _Entry | list[_Entry]] = {}  # time -> its event, or its events when several
        self._seq = 0
        self._n = 0
        self.processed = 0

    def __len__(self) -> int:
        return self._n

    def at(self, t: float, kind: Kind, data: Any = None, order: Any = None) -> None:
        """Schedule `kind` at absolute virtual time `t` (not before now).

        Events of one kind at one instant run in the order scheduled, or by `order` when given: an engine that
        schedules an event ahead of the event that used to schedule it passes the order it would have had.
        A kind's events either all give an order (mutually comparable) or none does."""
        if t < self.clock.now:
            raise ValueError(f"cannot schedule {kind.name} in the past ({t} < {self.clock.now})")
        self._seq += 1
        entry = (kind, self._seq if order is None else order, data, t)
        pending = self._at.get(t)
        if pending is None:
            self._at[t] = entry
            heapq.heappush(self._times, t)
        elif type(pending) is tuple:
            self._at[t] = [pending, entry]
        else:
            pending.append(entry)  # type: ignore[union-attr]
        self._n += 1

    def peek_time(self) -> float:
        return self._times[0] if self._times else float("inf")

    def pop(self) -> Event:
        """The next event; the clock moves to its time."""
        kind, seq, data, t = self._take()
        return t, kind, seq, data

    def pending(self, kind: Kind) -> list[tuple[float, Any, Any]]:
        """(time, order, payload) of every pending event of `kind`, in no particular order; the order is the one
        `at` was given, else the sequence number."""
        out = []
        for pending in self._at.values():
            entries: list[_Entry] = [pending] if isinstance(pending, tuple) else pending
            out += [(entry[3], entry[1], entry[2]) for entry in entries if entry[0] == kind]
        return out

    def pop_until(self, limit: float) -> tuple[Kind, Any] | None:
        """(kind, payload) of the next event if there is one no later than `limit` (the clock moves to it),
        else None: `peek_time` and `pop` in one call, for an engine's inner loop."""
        times = self._times
        if not times or times[0] > limit:
            return None
        kind, _, data, _ = self._take()
        return kind, data

    def _take(self) -> _Entry:
        times, pending_at = self._times, self._at
        t = times[0]
        pending = pending_at[t]
        if type(pending) is tuple:
            heapq.heappop(times)
            del pending_at[t]
            entry: _Entry = pending
        else:
            events: list[_Entry] = pending  # type: ignore[assignment]
            i = min(range(len(events)), key=lambda j: (events[j][0], events[j][1]))
            entry = events.pop(i)
            if len(events) == 1:
                pending_at[t] = events[0]
        self.clock.advance(entry[3])
        self.processed += 1
        self._n -= 1
        return entry
