"""One update at a time: each worker runs pull → compute → push, and every push meets the real `JobState`.

This is the exact engine. Async training always runs here (each update's fate depends on every update
before it, and ~10⁶ pushes are affordable); sync runs here with `engine: exact`, which the tests use to
hold the vectorised engine to identical results. Pulls wait as the PS's do: a sync worker's pull needs
the version after the one it pushed for, and any pull waits while a round's aggregation runs. A step's
events are its pull request and its push's arrival; what happens in between is worked out when the pull is
served and applied as if it had been events of its own (see `_serve`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dist_llm_train.sim import adapters
from dist_llm_train.sim.engine import Engine, Outcome
from dist_llm_train.sim.events import Kind
from dist_llm_train.sim.steps import FixedLegs, Row

Step = Row | tuple[FixedLegs, int]
"""What a step carries between its events: the slot's raw variates, or its precomputed legs."""
InFlight = tuple[int, int, float, Step, float, float, int]
"""A step after its pull was served: agent, version, request time, legs, compute time, delivery time, and
which pull served it was (the order of deliveries at one instant)."""

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
        self._served = 0  # pulls served so far: the order of deliveries at one instant
        self._served_at_publish = 0
        self._pulled = self._sent = 0  # pulls delivered and updates sent, counted at the end (`_settle_sums`)
        self._computed: list[float] = []  # (compute's end, delivery, served, compute) per update, flat
        self._lost: list[tuple[float, Kind, tuple[float, ...], int, float]] = []  # (when, as what, order, agent, waste)
        # A pull's service time, when the links do not change over time (the same number every time).
        self._service = self.steps.pull_service_1(0.0) if self.steps.topo.timeline.single else None
        # Compute overlapping a sync (Streaming DiLoCo): a worker starts its next update as soon as it has sent
        # its push, and needs the pull only `overlap` of the way into it (τ of its H/P steps); it stalls when
        # the pull comes later than that. `_sent_at`: when each worker last sent (its compute's end).
        strategy = self.cfg.strategy
        self.overlap = strategy.overlap_steps / strategy.steps_per_update()
        self._sent_at: dict[int, float] = {}
        self._handlers: dict[Kind, Callable[[Any], None]] = {
            Kind.PULL_REQUEST: self._pull_request,
            Kind.PUSH_ARRIVE: self._push_arrive,
            Kind.EXPIRE: self._expire,
            Kind.PUBLISH: self._publish,
        }
        # By kind's number: the engine's handler, or None for the control plane (which refuses what is not its).
        self._by_kind: list[Callable[[Any], None] | None] = [self._handlers.get(kind) for kind in Kind]

    # -- DataPlane ------------------------------------------------------------------------------------------
    def on_members(self, slots: list[int]) -> None:
        ids = [self.control.worker_id[s] or "" for s in slots]
        before = self.js.version
        adapters.set_members(self.js, ids)
        if self.js.version != before:
            self.stats.closed_by_departure += 1  # a shrink left nobody outstanding: the round closed short
            self._closed()

    def activate(self, slot: int, first_request_at: float) -> None:
        """Each life of a worker is an actor, set going by its first pull request."""
        a = self.agents.spawn(slot, first_request_at)
        self.maths.begin_life(a, slot)
        self.min_version[a] = 0
        self.queue.at(first_request_at, Kind.PULL_REQUEST, a)

    # -- driving --------------------------------------------------------------------------------------------
    def _advance(self) -> Outcome | None:
        """Handle events until one publishes a version, unless none is left or the next falls past the virtual
        time limit. (`run` looks at the version after each call; between publishes there is nothing to see, so
        one call handles every event up to the next publish: millions of events, one loop.)"""
        q, limit, published = self.queue, self.cfg.max_virtual_s, self.published
        handlers, control = self._by_kind, self.control
        pop = q.pop_until
        while True:
            event = pop(limit)
            if event is None:
                return "stalled" if not len(q) else "time_limit"
            kind, data = event
            handler = handlers[kind]
            if handler is None:
                control.handle(kind, data)
            else:
                handler(data)
            if self.published != published:
                return None

    def _wind_up(self) -> float:
        """The run ends at its last publish (or where the events stopped). What a step's delivery and the end
        of its compute would have done by then, had they been events, is done now (see `_serve`): pulls and
        updates counted, updates lost with their worker, and the compute-time sums added in their order."""
        limit = self.outcome == "time_limit"
        end, death = self.queue.clock.now, self.agents.death

        def seen(t: float, delivered: float, served: int) -> bool:
            """Whether an event at `t` of a step delivered at `delivered` would have run before the run stopped:
            every one up to the virtual time limit; else those before the last publish, and those at its
            instant whose delivery was served before it (a delivery's and a compute's end sort first)."""
            if limit:
                return t <= self.cfg.max_virtual_s
            return t < end or (t == end and (delivered < end or served <= self._served_at_publish))

        for _, (sent, delivered, served), (a, _, _, _, compute, _, _) in self.queue.pending(Kind.PUSH_ARRIVE):
            died = float(death[a])
            if not seen(delivered, delivered, served) or delivered >= died:
                continue
            self._pulled += 1
            if not seen(sent, delivered, served):
                continue
            if sent >= died:
                self._lost.append((sent, Kind.COMPUTE_DONE, (delivered, served), a, died - (sent - compute)))
            else:
                self._sent += 1
                self._computed += (sent, delivered, served, compute)
        self._settle_sums()
        return self.stats.publish_times[-1] if self.stats.publish_times else self.queue.clock.now

    def _settle_sums(self) -> None:
        """Count the pulls and updates, and add the compute times and the lost updates in the order the ends of
        the computes and the arrivals would have come as events, so the sums are the same to the last bit."""
        self._count_pulls(self._pulled)
        self._count_pushes(self._sent, 0.0)
        self._pulled = self._sent = 0
        if self._computed:  # (compute's end, delivery, served, compute) × n, flat; added one by one, in order
            c = np.array(self._computed).reshape(-1, 4)
            order = np.lexsort((c[:, 2], c[:, 1], c[:, 0]))
            sums = np.add.accumulate(np.concatenate(([self.stats.compute_s], c[order, 3])))
            self.stats.compute_s = float(sums[-1])
        for *_, a, wasted in sorted(self._lost, key=lambda x: (x[0], x[1], x[2])):
            self._count_lost_1(a, wasted)
        self._computed, self._lost = [], []

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
        """The PS serves `a`'s pull: the parameters arrive at `delivered`, the update is sent `compute` later
        and reaches the PS at `arrival`.

        Of a step only its pull request and its push's arrival are events: the delivery and the end of the
        compute in between change nothing anyone else sees. What they do (the pull and the update counted, a
        worker dead by then lost, the compute time summed) is done when the push arrives, and at the end of the
        run for what happened before the run ended; the arrival keeps the place among the events of its
        instant that it had when the end of the compute scheduled it, and the sums are added in that order."""
        if start >= self.agents.death[a]:
            self.maths.end_life(a)
            return
        slot = int(self.agents.slot[a])
        v = self.published
        steps = self.steps
        service = self._service if self._service is not None else steps.pull_service_1(start)
        done = max(start, self.egress_free) + service
        if steps.shared:
            self.egress_free = done
        legs = self._fixed.get(v)
        if legs is None and v not in self._fixed:
            legs = self._legs(v)
        draws: Row | None = None
        if legs is not None:
            row: Step = (legs, slot)
            delivered = max(done, start + legs.ser_in[slot]) + legs.pull_extra[slot]
            compute = legs.compute[slot]
        else:
            row = draws = self.draws.row(v, slot)
            delivered = steps.pull_delivered_1(slot, start, done, service, draws)
            compute = steps.compute_time_1(slot, draws)
        if self.overlap:
            # The update's compute began before this delivery, as far as the overlap allows; from here on
            # `delivered` stands for that start (what churn accounting and the sums read as "had the params").
            prev = self._sent_at.get(a)
            if prev is not None:
                delivered = max(prev, delivered - self.overlap * compute)
            self._sent_at[a] = delivered + compute
        sent = delivered + compute
        if draws is None:
            assert legs is not None
            arrival = sent + legs.push_total[slot]
        else:
            arrival = steps.push_arrival_1(slot, sent, draws)
        # The update depends only on the parameters served now; computing it here rather than at delivery
        # gives the same numbers (each worker's state is its own) with one less thing to hold in flight.
        self.maths.pulled(self.js, a, v)
        self._served += 1
        served = self._served
        self.queue.at(
            arrival, Kind.PUSH_ARRIVE, (a, v, start, row, compute, delivered, served), (sent, delivered, served)
        )

    def _push_arrive(self, data: InFlight) -> None:
        a, v, start, row, compute, delivered, served = data
        now = self.queue.clock.now
        death = self.agents.death[a]
        if now >= death:
            if delivered < death:  # it had the parameters
                self._pulled += 1
                sent = delivered + compute
                if sent >= death:  # died while computing
                    wasted = float(death) - (sent - compute)
                    self._lost.append((sent, Kind.COMPUTE_DONE, (delivered, served), a, wasted))
                else:  # died with its update on the wire
                    self._sent += 1
                    self._computed += (sent, delivered, served, compute)
                    self._lost.append((now, Kind.PUSH_ARRIVE, (sent, delivered, served), a, compute))
            self.maths.end_life(a)
            return
        self._pulled += 1
        self._sent += 1  # counted, with its compute time in order, by `_settle_sums`
        self._computed += (delivered + compute, delivered, served, compute)
        slot = int(self.agents.slot[a])
        step = self.steps_done.get(a, 0) + 1
        self.steps_done[a] = step
        before = self.js.version
        outcome, staleness = self.maths.push(
            self.js, self.control.worker_id[slot] or "", a * 1_000_000 + step, a, v
        )
        self.stats.add_outcome(outcome, staleness)
        if outcome in ("APPLIED", "BUFFERED"):  # taken: its compute counts towards goodput
            self.stats.accepted_compute_s += compute
        self._observe_update(slot, now, now - start, compute, v, self.maths.loss(a))
        if self.js.version != before:
            self._closed()
        elif outcome == "BUFFERED":  # a sync round or a buffered_async buffer waits: its timeout is an event
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
        """The PS's version moved: sync rounds publish after aggregation time; without a barrier (async,
        buffered_async) workers never wait for a version, so it is published at once."""
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
        self._served_at_publish = self._served  # pulls served from here on were not delivered before it
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
