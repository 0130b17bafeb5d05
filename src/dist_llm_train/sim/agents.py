"""Worker incarnations ("agents") as growable numpy columns, shared by both engines' bookkeeping.

A slot is a worker name; an agent is one life of it between (re)joining and dying or losing its task. A
rejoined worker is a new agent while its old self may still have an update in flight, so the two never share
state. Every field is a timestamp, which lets the vectorised engine apply control-plane events in batches.
"""

from __future__ import annotations

import numpy as np

INF = float("inf")


class Agents:
    def __init__(self, capacity: int) -> None:
        self.n = 0
        size = max(16, capacity)
        self.slot = np.zeros(size, dtype=np.intp)
        self.request = np.full(size, INF)  # when its next pull request reaches the PS
        self.stop = np.full(size, INF)  # no new step starts at or after this (death or task revoked)
        self.death = np.full(size, INF)
        self.current: dict[int, int] = {}  # slot -> its newest agent

    def spawn(self, slot: int, first_request_at: float) -> int:
        if self.n == self.slot.size:
            grow = self.slot.size
            self.slot = np.concatenate([self.slot, np.zeros(grow, dtype=np.intp)])
            for name in ("request", "stop", "death"):
                setattr(self, name, np.concatenate([getattr(self, name), np.full(grow, INF)]))
        a = self.n
        self.n += 1
        self.slot[a] = slot
        self.request[a] = first_request_at
        self.current[slot] = a
        return a

    def kill(self, slot: int, at: float) -> None:
        a = self.current.get(slot)
        if a is not None and self.death[a] == INF:
            self.death[a] = at
            self.stop[a] = min(self.stop[a], at)

    def halt(self, slot: int, at: float) -> None:
        a = self.current.get(slot)
        if a is not None:
            self.stop[a] = min(self.stop[a], at)

    def runnable(self) -> np.ndarray:
        """Agents whose next pull request arrives before they stop."""
        n = self.n
        return np.nonzero(self.request[:n] < self.stop[:n])[0]
