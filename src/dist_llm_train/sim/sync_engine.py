"""Synchronous training, one round at a time, every worker of the round at once (numpy).

A round is computed in closed form from the publish time of its version and each worker's next pull
request: serve times, the PS egress queue, delivery, compute, push arrival (see `steps`), then the close
time by the PS's barrier rule (see `barrier`). Control-plane events (crashes, detector ticks, membership
changes, new workers learning their task) are processed exactly, in time order, whenever they fall before
the round's tentative close; their effects are timestamps, so the round is then recomputed with them and
the loop repeats until no event precedes the close. A round with no event costs a few dozen vector
operations, which is what makes 10⁴ workers × 10³ rounds fit in seconds.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dist_llm_train.sim.agents import INF
from dist_llm_train.sim.barrier import MembershipChange, close_time
from dist_llm_train.sim.engine import Engine, Outcome
from dist_llm_train.sim.linkmath import fifo_completion
from dist_llm_train.sim.steps import SlotLegs


@dataclass
class _Round:
    agents: np.ndarray
    start: np.ndarray
    egress_done: np.ndarray
    delivered: np.ndarray
    compute: np.ndarray
    send: np.ndarray
    arrival: np.ndarray
    close: float
    how: str
    died_waiting: np.ndarray


_Memo = tuple[tuple[int, float, float], np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]
"""(version, its publish time, egress free at) and the runnable agents, their starts and deaths; the timeline."""


class SyncRoundEngine(Engine):
    def _set_up(self) -> None:
        self.member = np.zeros(self.cfg.capacity, dtype=bool)
        self.changes: list[MembershipChange] = []  # after the current round's start
        self.history: list[MembershipChange] = [(-INF, self.member.copy())]
        self.closes: list[float] = []
        self.pending: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # after their round closed
        self._timeline: _Memo | None = None  # the last round timeline computed, and from what (see `_compute`)
        self._slot_legs: tuple[int, SlotLegs | None] | None = None

    # -- DataPlane ------------------------------------------------------------------------------------------
    def on_members(self, slots: list[int]) -> None:
        mask = np.zeros(self.cfg.capacity, dtype=bool)
        mask[slots] = True
        change = (self.queue.clock.now, mask)
        self.changes.append(change)
        self.history.append(change)

    # -- driving --------------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Registrations and membership at time zero are the first round's starting point."""
        self._drain(0.0)
        self._adopt_changes()

    def _advance(self) -> Outcome | None:
        """Play one round to its publish, unless no round can close or it published past the time limit."""
        rnd = self._settle()
        if rnd is None:
            return "stalled"
        self._finish(rnd)
        if self.published_at > self.cfg.max_virtual_s:
            return "time_limit"
        return None

    def _wind_up(self) -> float:
        """The run ends at the last publish; count what was deferred up to then and drop the rest."""
        end = self.published_at
        self._drain(end)
        self._resolve(end, final=True)
        return end

    def _drain(self, until: float, stop_at_membership_change: bool = False) -> None:
        """Process control events up to `until`; optionally stop right after one that changed the membership.

        A round waiting for a departed member has its tentative close at the straggler timeout, which may be
        10⁶ s away; the member's removal closes it far sooner. Draining on to the timeout would run (and count:
        crashes, rejoins, trace leaves and joins) the control plane long past the run's end."""
        changes = len(self.changes)
        while self.queue.peek_time() <= until:
            _, kind, _, data = self.queue.pop()
            self.control.handle(kind, data)
            if stop_at_membership_change and len(self.changes) != changes:
                return

    def _adopt_changes(self) -> None:
        """Membership changes before the round starts become its starting membership."""
        start = self.published_at
        while self.changes and self.changes[0][0] <= start:
            self.member = self.changes.pop(0)[1]

    def _settle(self) -> _Round | None:
        """Compute the round, process the control events up to its close, repeat until none precedes it."""
        while True:
            rnd = self._compute()
            t_next = self.queue.peek_time()
            if t_next == INF and rnd.close == INF:
                return None
            if t_next > rnd.close:
                return rnd
            horizon = rnd.close if rnd.close < INF else t_next
            self._drain(horizon, stop_at_membership_change=True)

    def _compute(self) -> _Round:
        a = self.agents.runnable()
        start = np.maximum(self.published_at, self.agents.request[a])
        death = self.agents.death[a]
        key = (self.published, self.published_at, self.egress_free)
        memo = self._timeline
        if (
            memo is not None
            and memo[0] == key
            and np.array_equal(memo[1], a)
            and np.array_equal(memo[2], start)
            and np.array_equal(memo[3], death)
        ):
            # Control events that changed nothing a step's timeline depends on (a membership change, a
            # tick): only the close is recomputed. At 10⁵ workers the timeline is a tenth of a second.
            a, start, egress_done, delivered, compute, send, arrival, died_waiting = memo[4]
        else:
            inputs = (a, start, death)
            slots = self.agents.slot[a]
            alive_at_start = start < death
            died_waiting = a[~alive_at_start]
            a, slots, start = a[alive_at_start], slots[alive_at_start], start[alive_at_start]
            order = self._patched_order(key, a, start) if memo is not None and memo[0] == key else None
            if order is None:
                order = np.lexsort((slots, start))
            a, slots, start = a[order], slots[order], start[order]
            legs = self._legs()
            if legs is not None:  # the version's legs for every slot, worked out once (same sums, same numbers)
                service = np.full(start.size, legs.service)
                egress_done = fifo_completion(start, service, self.egress_free)
                ready = egress_done if self.steps.shared else start + service
                done = np.maximum(ready, start + legs.ser_in[slots])
                delivered = done + legs.pull_prop[slots] + legs.pull_pen[slots]
                compute = legs.compute[slots]
                send = delivered + compute
                arrival = send + legs.push_ser[slots] + legs.push_prop[slots] + legs.push_pen[slots]
            else:
                z_all, u_all = self.draws.table(self.published)
                z, u = z_all[slots], u_all[slots]
                service = self.steps.pull_service(start)
                egress_done = fifo_completion(start, service, self.egress_free)
                delivered = self.steps.pull_delivered(slots, start, egress_done, service, z, u)
                compute = self.steps.compute_time(slots, z, u)
                send = delivered + compute
                arrival = self.steps.push_arrival(slots, send, z, u)
            timeline = (a, start, egress_done, delivered, compute, send, arrival, died_waiting)
            self._timeline = (key, *inputs, timeline)
        slots = self.agents.slot[a]
        ok = arrival < self.agents.death[a]
        close, how = close_time(
            arrival[ok], slots[ok], self.member, self.changes, self.cfg.straggler_timeout_s
        )
        return _Round(a, start, egress_done, delivered, compute, send, arrival, close, how, died_waiting)

    def _patched_order(self, key: tuple[int, float, float], a: np.ndarray, start: np.ndarray) -> np.ndarray | None:
        """`np.lexsort((slots, start))` of this round's agents, from the order the round was last computed in.

        Within a round an agent's start does not move; control events only take agents out (deaths, revoked
        tasks) or add new ones (a worker learning its task). So the last order minus the agents gone, with the
        new ones put where (start, slot, agent) places them, is the sorted order (lexsort keeps equal keys in
        agent order, as this does) at a fraction of a sort of 10⁵ agents. None if an agent's start moved."""
        assert self._timeline is not None and self._timeline[0] == key
        prev = self._timeline[4][0]  # the agents of the last computation, sorted
        n = self.agents.n
        where = np.full(n, -1, dtype=np.intp)
        where[a] = np.arange(a.size)
        kept = prev[where[prev] >= 0]
        if not np.array_equal(start[where[kept]], self._timeline[4][1][where[prev] >= 0]):
            return None
        was = np.zeros(n, dtype=bool)
        was[prev] = True
        new = np.nonzero(~was[a])[0]  # positions in `a` of the agents added since
        order = where[kept]
        if new.size:
            slots = self.agents.slot
            kept_start, kept_slot = start[order], slots[kept]
            new = new[np.lexsort((a[new], slots[a[new]], start[new]))]
            at = []
            for i in new.tolist():
                st, sl, ag = start[i], slots[a[i]], a[i]
                lo, hi = np.searchsorted(kept_start, st, "left"), np.searchsorted(kept_start, st, "right")
                same_start = kept_slot[lo:hi]
                lo, hi = lo + np.searchsorted(same_start, sl, "left"), lo + np.searchsorted(same_start, sl, "right")
                at.append(lo + int(np.searchsorted(kept[lo:hi], ag)))
            order = np.insert(order, at, new)
        return order

    def _legs(self) -> SlotLegs | None:
        """The current version's `SlotLegs` (built once per version: a round is recomputed after every control
        event before its close, hundreds of times at 10⁵ workers)."""
        version = self.published
        if self._slot_legs is None or self._slot_legs[0] != version:
            self._slot_legs = (version, self.steps.slot_legs(*self.draws.table(version)))
        return self._slot_legs[1]

    # -- closing a round ----------------------------------------------------------------------------------
    def _finish(self, rnd: _Round) -> None:
        """Account the round. What happens after its close (late deliveries and updates) is counted once
        its time is known to fall before the end of the run, exactly as the per-event engine stops there."""
        self._resolve(rnd.close, final=False)
        ag, st = self.agents, self.stats
        ag.request[rnd.died_waiting] = INF  # died before being served: retired
        took_part = rnd.start < rnd.close
        a = rnd.agents[took_part]
        slots = ag.slot[a]
        death = ag.death[a]
        start, delivered, compute, send, arrival = (
            x[took_part] for x in (rnd.start, rnd.delivered, rnd.compute, rnd.send, rnd.arrival)
        )
        if took_part.any():
            self.egress_free = float(rnd.egress_done[took_part].max())
        # Deaths up to the close are known now; later ones are checked when a deferred item is counted.
        self._count_or_defer("pull", a, delivered, delivered, rnd.close)
        self._count_or_defer("send", a, send, compute, rnd.close)
        arrived = arrival < death
        on_time = arrived & (arrival <= rnd.close)
        member_then = self._member_at(slots[on_time], arrival[on_time])
        accepted = _distinct(slots[on_time][member_then], self.member.size)
        taken = on_time.nonzero()[0][member_then]
        self._count_accepted_first(slots[taken], arrival[taken], compute[taken], distinct=accepted)
        if accepted:
            closing = 1 if rnd.how == "push" else 0
            _add(st.outcomes, "APPLIED", closing)
            _add(st.outcomes, "BUFFERED", accepted - closing)
            st.staleness_applied[0] += accepted
        _add(st.outcomes, "DUPLICATE", int(member_then.sum()) - accepted)
        _add(st.outcomes, "PERMISSION_DENIED", int((~member_then).sum()))
        # Columns: step time, compute, base version (what `_observe` reads), and the send time (for losses).
        steps_info = np.column_stack([arrival - start, compute, np.full(a.size, float(self.published)), send])
        self._observe(slots[on_time], arrival[on_time], steps_info[on_time])
        late = arrival > rnd.close
        on_wire = ~arrived & ~late & (send < death)  # died with its update on the wire, before the close
        self._count_lost(a[on_wire], compute[on_wire])
        self._count_or_defer("arrive", a[late], arrival[late], steps_info[late], rnd.close)
        nxt = np.full(a.size, INF)
        if arrived.any():
            s_ok = slots[arrived]
            legs = self._legs()
            if legs is not None:  # `next_request`'s sums, on the version's legs
                nxt[arrived] = arrival[arrived] + legs.reply[s_ok] + legs.request[s_ok]
            else:
                z_all, u_all = self.draws.table(self.published)
                nxt[arrived] = self.steps.next_request(s_ok, arrival[arrived], z_all[s_ok], u_all[s_ok])
        ag.request[a] = nxt
        st.timed_out_rounds += rnd.how == "timeout"
        st.closed_by_departure += rnd.how == "members"
        self._record_close(accepted, int(np.count_nonzero(self._mask_at(rnd.close))))
        self.closes.append(rnd.close)
        publish_at = rnd.close + self.cfg.aggregation_base_s + self.cfg.aggregation_per_update_s * accepted
        self._record_publish(self.published + 1, publish_at)
        while self.changes and self.changes[0][0] <= rnd.close:
            self.member = self.changes.pop(0)[1]
        self._adopt_changes()
        self._prune_history()

    def _observe(self, slots: np.ndarray, arrival: np.ndarray, info: np.ndarray) -> None:
        """Updates that reached the PS; `info` columns: step time, compute time, base version."""
        self._observe_updates(slots, arrival, info[:, 0], info[:, 1], info[:, 2])

    def _count_or_defer(
        self, kind: str, agents: np.ndarray, times: np.ndarray, values: np.ndarray, close: float
    ) -> None:
        now = times <= close
        if now.any():
            self._count(kind, agents[now], times[now], values[now])
        if (~now).any():
            self.pending.append((kind, agents[~now], times[~now], values[~now]))

    def _count(self, kind: str, agents: np.ndarray, times: np.ndarray, values: np.ndarray) -> None:
        """Count what agents did at `times`, except what they did not live to do."""
        alive = times < self.agents.death[agents]
        if not alive.all():
            self._count_lost_dropped(kind, agents[~alive], times[~alive], values[~alive])
        agents, times, values = agents[alive], times[alive], values[alive]
        slots = self.agents.slot[agents]
        st = self.stats
        if kind == "pull":
            self._count_pulls(int(slots.size))
        elif kind == "send":
            self._count_pushes(int(slots.size), float(values.sum()))
        else:  # an update that arrives after its round closed
            member = self._member_at(slots, times)
            complete = times >= self.closes[-1] if self.outcome == "completed" else np.zeros(times.size, bool)
            _add(st.outcomes, "JOB_COMPLETE", int((member & complete).sum()))
            _add(st.outcomes, "LATE_DROPPED", int((member & ~complete).sum()))
            _add(st.outcomes, "PERMISSION_DENIED", int((~member).sum()))
            self._observe(slots, times, values)

    def _count_lost_dropped(self, kind: str, agents: np.ndarray, times: np.ndarray, values: np.ndarray) -> None:
        """Of what agents did not live to do, the updates that died with them: a send whose compute had
        started before the death, an arrival whose send had left before it (as the per-event engine sees them)."""
        death = self.agents.death[agents]
        if kind == "send":  # values: compute time; the parameters arrived at send - compute
            started = times - values
            lost = started < death
            self._count_lost(agents[lost], (death - started)[lost])
        elif kind == "arrive":  # values: step time, compute, version, send time
            lost = values[:, 3] < death
            self._count_lost(agents[lost], values[lost, 1])

    def _resolve(self, upto: float, final: bool) -> None:
        """Count deferred happenings up to `upto`; at the end of the run drop what comes later."""
        due: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            "pull": [],
            "send": [],
            "arrive": [],
        }
        keep = []
        for kind, agents, times, values in self.pending:
            now = times <= upto
            due[kind].append((agents[now], times[now], values[now]))
            if not final and (~now).any():
                keep.append((kind, agents[~now], times[~now], values[~now]))
        self.pending = keep
        for kind, parts in due.items():
            if not parts:
                continue
            agents, times, values = (np.concatenate(x) for x in zip(*parts, strict=True))
            order = np.argsort(times, kind="stable")
            agents, times, values = agents[order], times[order], values[order]
            slots = self.agents.slot[agents]
            twice = kind == "arrive" and _distinct(slots, self.member.size) < slots.size
            if twice and not self.throughput.enabled and self.log is None:
                # One worker twice, but no EWMA or telemetry row to feed in order: count them together (10⁵ late
                # updates a round at 10⁵ workers), the step-time sum added one by one as the loop below adds it.
                step_time_s = self.stats.step_time_sum_s
                lived = values[times < self.agents.death[agents], 0].tolist()
                self._count(kind, agents, times, values)
                for x in lived:
                    step_time_s += x
                self.stats.step_time_sum_s = step_time_s
            elif twice:
                for i in range(slots.size):  # one worker twice: its throughput EWMA must see them in order
                    self._count(kind, agents[i : i + 1], times[i : i + 1], values[i : i + 1])
            elif agents.size:
                self._count(kind, agents, times, values)

    def _prune_history(self) -> None:
        oldest = min((float(t.min()) for _, _, t, _ in self.pending), default=INF)
        while len(self.history) > 1 and self.history[1][0] <= min(oldest, self.published_at):
            self.history.pop(0)

    def _mask_at(self, t: float) -> np.ndarray:
        """The membership in force at time `t` (changes at `t` included, as the PS sees them first)."""
        idx = bisect.bisect_right([c for c, _ in self.history], t) - 1
        return self.history[max(idx, 0)][1]

    def _member_at(self, slots: np.ndarray, times: np.ndarray) -> np.ndarray:
        if slots.size == 0:
            return np.zeros(0, dtype=bool)
        change_times = np.array([t for t, _ in self.history])
        idx = np.searchsorted(change_times, times, side="right") - 1
        # Each membership in force reads its own mask (stacking every mask of the history would cost
        # changes × workers, and a 10⁵-worker run keeps hundreds of changes in it).
        first = int(idx[0])
        if (idx == first).all():
            return self.history[first][1][slots]
        out = np.empty(slots.size, dtype=bool)
        for k in np.unique(idx).tolist():
            sel = idx == k
            out[sel] = self.history[k][1][slots[sel]]
        return out


def _add(counter: Counter[str], key: str, n: int) -> None:
    """Count only what happened, so outcome tables list no zeros (as the per-event engine's do not)."""
    if n:
        counter[key] += n


def _distinct(slots: np.ndarray, capacity: int) -> int:
    """How many different workers: a mask beats hashing for 10⁴ small integers."""
    seen = np.zeros(capacity, dtype=bool)
    seen[slots] = True
    return int(np.count_nonzero(seen))
