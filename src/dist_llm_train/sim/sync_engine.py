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


class SyncRoundEngine(Engine):
    def _set_up(self) -> None:
        self.member = np.zeros(self.cfg.capacity, dtype=bool)
        self.changes: list[MembershipChange] = []  # after the current round's start
        self.history: list[MembershipChange] = [(-INF, self.member.copy())]
        self.closes: list[float] = []
        self.pending: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # after their round closed

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

    def _drain(self, until: float) -> None:
        while self.queue.peek_time() <= until:
            _, kind, _, data = self.queue.pop()
            self.control.handle(kind, data)

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
            self._drain(horizon)

    def _compute(self) -> _Round:
        a = self.agents.runnable()
        slots = self.agents.slot[a]
        start = np.maximum(self.published_at, self.agents.request[a])
        alive_at_start = start < self.agents.death[a]
        died_waiting = a[~alive_at_start]
        a, slots, start = a[alive_at_start], slots[alive_at_start], start[alive_at_start]
        order = np.lexsort((slots, start))
        a, slots, start = a[order], slots[order], start[order]
        z_all, u_all = self.draws.table(self.published)
        z, u = z_all[slots], u_all[slots]
        service = self.steps.pull_service(start)
        egress_done = fifo_completion(start, service, self.egress_free)
        delivered = self.steps.pull_delivered(slots, start, egress_done, service, z, u)
        compute = self.steps.compute_time(slots, z, u)
        send = delivered + compute
        arrival = self.steps.push_arrival(slots, send, z, u)
        ok = arrival < self.agents.death[a]
        close, how = close_time(
            arrival[ok], slots[ok], self.member, self.changes, self.cfg.straggler_timeout_s
        )
        return _Round(a, start, egress_done, delivered, compute, send, arrival, close, how, died_waiting)

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
        if accepted:
            closing = 1 if rnd.how == "push" else 0
            _add(st.outcomes, "APPLIED", closing)
            _add(st.outcomes, "BUFFERED", accepted - closing)
            st.staleness_applied[0] += accepted
        _add(st.outcomes, "DUPLICATE", int(member_then.sum()) - accepted)
        _add(st.outcomes, "PERMISSION_DENIED", int((~member_then).sum()))
        steps_info = np.column_stack([arrival - start, compute, np.full(a.size, float(self.published))])
        self._observe(slots[on_time], arrival[on_time], steps_info[on_time])
        late = arrival > rnd.close
        self._count_or_defer("arrive", a[late], arrival[late], steps_info[late], rnd.close)
        nxt = np.full(a.size, INF)
        if arrived.any():
            z_all, u_all = self.draws.table(self.published)
            s_ok = slots[arrived]
            nxt[arrived] = self.steps.next_request(s_ok, arrival[arrived], z_all[s_ok], u_all[s_ok])
        ag.request[a] = nxt
        st.timed_out_rounds += rnd.how == "timeout"
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
            if kind == "arrive" and np.unique(slots).size < slots.size:
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
        masks = np.stack([m for _, m in self.history])
        idx = np.searchsorted(change_times, times, side="right") - 1
        return masks[idx, slots]


def _add(counter: Counter[str], key: str, n: int) -> None:
    """Count only what happened, so outcome tables list no zeros (as the per-event engine's do not)."""
    if n:
        counter[key] += n


def _distinct(slots: np.ndarray, capacity: int) -> int:
    """How many different workers: a mask beats hashing for 10⁴ small integers."""
    seen = np.zeros(capacity, dtype=bool)
    seen[slots] = True
    return int(np.count_nonzero(seen))
