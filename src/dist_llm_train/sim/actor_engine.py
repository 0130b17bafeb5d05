"""Every message an event: each worker runs pull → compute → push against the real `JobState`.

This is the exact engine. Async training always runs here (each update's fate depends on every update
before it, and ~10⁶ pushes are affordable); sync runs here with `engine: exact`, which the tests use to
hold the vectorised engine to identical results. Pulls wait as the PS's do: a sync worker's pull needs
the version after the one it pushed for, and any pull waits while a round's aggregation runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dist_llm_train.sim import adapters
from dist_llm_train.sim.engine import Engine, Outcome
from dist_llm_train.sim.events import Kind
from dist_llm_train.sim.steps import FixedLegs, Row

Step = Row | tuple[FixedLegs, int]
"""What a step carries between its events: the slot's raw variates, or its precomputed legs."""

_CONTROL = {Kind.DEATH, Kind.REJOIN, Kind.JOIN, Kind.HB_STALL, Kind.HB_RESUME, Kind.TICK, Kind.LEARN}


class ActorEngine(Engine):
    def _set_up(self) -> None:
        self.sync = self.cfg.strategy.rounds  # a barrier per version: pulls wait for the next one
        if self.numerics is None:
            self.numerics = adapters.FreeNumerics(self.cfg)
        self.maths = self.numerics
        self.js = self.maths.job_state(self.queue.clock)
        self.min_version: dict[int, int] = {}
        self.steps_done: dict[int, int] = {}
        self.waiting: list[int] = []
        self.aggregated = 0
        self.expiry_for: int | None = None
        self._fixed: dict[int, FixedLegs | None] = {}
        self._handlers: dict[Kind, Callable[[Any], None]] = {
            Kind.PULL_REQUEST: self._pull_request,
            Kind.PULL_DONE: self._pull_done,
            Kind.COMPUTE_DONE: self._compute_done,
            Kind.PUSH_ARRIVE: self._push_arrive,
            Kind.EXPIRE: self._expire,
            Kind.PUBLISH: self._publish,
        }

    # -- DataPlane ------------------------------------------------------------------------------------------
    def on_members(self, slots: list[int]) -> None:
        ids = [self.control.worker_id[s] or "" for s in slots]
        before = self.js.version
        adapters.set_members(self.js, ids)
        if self.js.version != before:
            self._closed()

    def activate(self, slot: int, first_request_at: float) -> None:
        """Each life of a worker is an actor, set going by its first pull request."""
        a = self.agents.spawn(slot, first_request_at)
        self.maths.begin_life(a, slot)
        self.min_version[a] = 0
        self.queue.at(first_request_at, Kind.PULL_REQUEST, a)

    # -- driving --------------------------------------------------------------------------------------------
    def _advance(self) -> Outcome | None:
        """Handle the next event, unless there is none or it falls past the virtual time limit."""
        q = self.queue
        if not len(q):
            return "stalled"
        if q.peek_time() > self.cfg.max_virtual_s:
            return "time_limit"
        _, kind, _, data = q.pop()
        if kind in _CONTROL:
            self.control.handle(kind, data)
        else:
            self._handlers[kind](data)
        return None

    def _wind_up(self) -> float:
        """Nothing is held back, so the run ends at its last publish (or where the events stopped)."""
        return self.stats.publish_times[-1] if self.stats.publish_times else self.queue.clock.now

    # -- a worker's step ------------------------------------------------------------------------------------
    def _pull_request(self, a: int) -> None:
        now = self.queue.clock.now
        if now >= self.agents.stop[a]:
            self.maths.end_life(a)
            return
        aggregating = self.js.version > self.published
        if self.sync and (aggregating or self.published < self.min_version[a]):
            self.waiting.append(a)
            return
        self._serve(a, now)

    def _legs(self, v: int) -> FixedLegs | None:
        legs = self._fixed.get(v)
        if legs is None and v not in self._fixed:
            legs = self.steps.fixed_legs(*self.draws.table(v))
            self._fixed[v] = legs
            while len(self._fixed) > 4:
                self._fixed.pop(next(iter(self._fixed)))
        return legs

    def _serve(self, a: int, start: float) -> None:
        if start >= self.agents.death[a]:
            self.maths.end_life(a)
            return
        slot = int(self.agents.slot[a])
        v = self.published
        service = self.steps.pull_service_1(start)
        done = max(start, self.egress_free) + service
        if self.steps.shared:
            self.egress_free = done
        legs = self._legs(v)
        if legs is not None:
            row: Step = (legs, slot)
            delivered = max(done, start + legs.ser_in[slot]) + legs.pull_extra[slot]
        else:
            row = self.draws.row(v, slot)
            delivered = self.steps.pull_delivered_1(slot, start, done, service, row)
        # The update depends only on the parameters served now; computing it here rather than at delivery
        # gives the same numbers (each worker's state is its own) with one less thing to hold in flight.
        self.maths.pulled(self.js, a, v)
        self.queue.at(delivered, Kind.PULL_DONE, (a, v, start, row))

    def _pull_done(self, data: tuple[int, int, float, Step]) -> None:
        a, v, start, row = data
        now = self.queue.clock.now
        if now >= self.agents.death[a]:
            self.maths.end_life(a)
            return
        self._count_pulls(1)
        if isinstance(row[0], FixedLegs):
            compute = row[0].compute[row[1]]
        else:
            compute = self.steps.compute_time_1(int(self.agents.slot[a]), row)
        self.queue.at(now + compute, Kind.COMPUTE_DONE, (a, v, start, row, compute))

    def _compute_done(self, data: tuple[int, int, float, Step, float]) -> None:
        a, v, start, row, compute = data
        now = self.queue.clock.now
        if now >= self.agents.death[a]:
            self.maths.end_life(a)
            return
        self._count_pushes(1, compute)
        if isinstance(row[0], FixedLegs):
            arrival = now + row[0].push_total[row[1]]
        else:
            arrival = self.steps.push_arrival_1(int(self.agents.slot[a]), now, row)
        self.queue.at(arrival, Kind.PUSH_ARRIVE, (a, v, start, row, compute))

    def _push_arrive(self, data: tuple[int, int, float, Step, float]) -> None:
        a, v, start, row, compute = data
        now = self.queue.clock.now
        if now >= self.agents.death[a]:
            self.maths.end_life(a)
            return
        slot = int(self.agents.slot[a])
        step = self.steps_done.get(a, 0) + 1
        self.steps_done[a] = step
        before = self.js.version
        outcome, staleness = self.maths.push(
            self.js, self.control.worker_id[slot] or "", a * 1_000_000 + step, a, v
        )
        self.stats.add_outcome(outcome, staleness)
        self._observe_update(slot, now, now - start, compute, v, self.maths.loss(a))
        if self.js.version != before:
            self._closed()
        elif self.sync and outcome == "BUFFERED":
            self._arm_expiry()
        self.min_version[a] = v + 1
        if isinstance(row[0], FixedLegs):
            nxt = now + row[0].after_push[row[1]]
        else:
            nxt = self.steps.next_request_1(slot, now, row)
        self.queue.at(nxt, Kind.PULL_REQUEST, a)

    # -- the PS ---------------------------------------------------------------------------------------------
    def _arm_expiry(self) -> None:
        deadline = adapters.round_deadline(self.js)
        if deadline is not None and self.expiry_for != self.js.version:
            self.expiry_for = self.js.version
            self.queue.at(deadline, Kind.EXPIRE, self.js.version)

    def _expire(self, version: int) -> None:
        if version == self.js.version and adapters.expire(self.js, self.queue.clock.now):
            self.stats.timed_out_rounds += 1
            self._closed()

    def _closed(self) -> None:
        """The PS's version moved: sync rounds publish after aggregation time, async updates at once."""
        total = adapters.updates_aggregated(self.js)
        updates, self.aggregated = total - self.aggregated, total
        now = self.queue.clock.now
        self._record_close(updates, len(self.js.members))
        if self.sync:
            agg = self.cfg.aggregation_base_s + self.cfg.aggregation_per_update_s * updates
            self.queue.at(now + agg, Kind.PUBLISH, self.js.version)
        else:
            self._publish(self.js.version)

    def _publish(self, version: Any) -> None:
        self._record_publish(int(version), self.queue.clock.now)
        if not self.waiting:
            return
        ready = sorted(self.waiting, key=lambda a: (int(self.agents.slot[a]), a))
        self.waiting = []
        now = self.queue.clock.now
        for a in ready:
            if self.published >= self.min_version[a] and self.published >= self.js.version:
                self._serve(a, now)
            else:
                self.waiting.append(a)
