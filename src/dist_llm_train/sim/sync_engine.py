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

from dataclasses import dataclass

import numpy as np

from dist_llm_train.sim.agents import INF, Agents
from dist_llm_train.sim.barrier import MembershipChange, close_time
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.control import ControlPlane
from dist_llm_train.sim.draws import VersionDraws
from dist_llm_train.sim.events import EventQueue
from dist_llm_train.sim.linkmath import fifo_completion
from dist_llm_train.sim.metrics import DataStats, Throughput
from dist_llm_train.sim.steps import StepModel


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
    timed_out: bool
    died_waiting: np.ndarray


class SyncRoundEngine:
    def __init__(self, cfg: SimConfig, queue: EventQueue, control: ControlPlane, steps: StepModel,
                 draws: VersionDraws, stats: DataStats, throughput: Throughput) -> None:
        self.cfg, self.queue, self.control, self.steps = cfg, queue, control, steps
        self.draws, self.stats, self.throughput = draws, stats, throughput
        self.agents = Agents(cfg.capacity)
        self.member = np.zeros(cfg.capacity, dtype=bool)
        self.changes: list[MembershipChange] = []  # after the current round's start
        self.history: list[MembershipChange] = [(-INF, self.member.copy())]
        self.closes: list[float] = []
        self.late: list[tuple[np.ndarray, np.ndarray]] = []  # (slots, arrival) of pushes after their round
        self.version = 0
        self.publish = 0.0
        self.egress_free = 0.0
        self.end: float | None = None
        self.outcome = "running"

    # -- DataPlane ------------------------------------------------------------------------------------------
    def on_members(self, slots: list[int]) -> None:
        mask = np.zeros(self.cfg.capacity, dtype=bool)
        mask[slots] = True
        change = (self.queue.clock.now, mask)
        self.changes.append(change)
        self.history.append(change)

    def on_death(self, slot: int) -> None:
        self.agents.kill(slot, self.queue.clock.now)

    def activate(self, slot: int, first_request_at: float) -> None:
        self.agents.spawn(slot, first_request_at)

    def deactivate(self, slot: int) -> None:
        self.agents.halt(slot, self.queue.clock.now)

    def telemetry(self) -> dict[int, float]:
        return self.throughput.take()

    # -- driving --------------------------------------------------------------------------------------------
    def run(self) -> None:
        self._drain(0.0)
        self._adopt_changes()
        for _ in range(self.cfg.rounds):
            rnd = self._settle()
            if rnd is None:
                self.outcome = "stalled"
                break
            self._finish(rnd)
            if self.publish > self.cfg.max_virtual_s:
                self.outcome = "time_limit"
                break
        else:
            self.outcome = "completed"
        self.end = self.publish
        self._drain(self.end)
        self._resolve_late(self.end, final=True)

    def _drain(self, until: float) -> None:
        while self.queue.peek_time() <= until:
            _, kind, _, data = self.queue.pop()
            self.control.handle(kind, data)

    def _adopt_changes(self) -> None:
        """Membership changes before the round starts become its starting membership."""
        start = self.publish
        while self.changes and self.changes[0][0] <= start:
            self.member = self.changes.pop(0)[1]

    def _settle(self) -> _Round | None:
        """Compute the round, process every control event up to its close, repeat until nothing precedes it."""
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
        start = np.maximum(self.publish, self.agents.request[a])
        alive_at_start = start < self.agents.death[a]
        died_waiting = a[~alive_at_start]
        a, slots, start = a[alive_at_start], slots[alive_at_start], start[alive_at_start]
        order = np.lexsort((slots, start))
        a, slots, start = a[order], slots[order], start[order]
        z_all, u_all = self.draws.table(self.version)
        z, u = z_all[slots], u_all[slots]
        service = self.steps.pull_service(start)
        egress_done = fifo_completion(start, service, self.egress_free)
        delivered = self.steps.pull_delivered(slots, start, egress_done, service, z, u)
        compute = self.steps.compute_time(slots, z, u)
        send = delivered + compute
        arrival = self.steps.push_arrival(slots, send, z, u)
        ok = arrival < self.agents.death[a]
        close, timed_out = close_time(arrival[ok], slots[ok], self.member, self.changes, self.cfg.straggler_timeout_s)
        return _Round(a, start, egress_done, delivered, compute, send, arrival, close, timed_out, died_waiting)

    # -- closing a round --------------------------------------------------------------------------------------
    def _finish(self, rnd: _Round) -> None:
        ag = self.agents
        ag.request[rnd.died_waiting] = INF  # died before being served: retired
        took_part = rnd.start < rnd.close
        a = rnd.agents[took_part]
        slots = ag.slot[a]
        death = ag.death[a]
        start, delivered, send, arrival = (x[took_part] for x in (rnd.start, rnd.delivered, rnd.send, rnd.arrival))
        got, sent, arrived = delivered < death, send < death, arrival < death
        st = self.stats
        st.pulls += int(got.sum())
        st.bytes_received += int(got.sum()) * self.steps.sizes.pull_bytes
        st.pushes_sent += int(sent.sum())
        st.bytes_sent += int(sent.sum()) * self.steps.sizes.push_bytes
        st.compute_s += float(rnd.compute[took_part][sent].sum())
        if took_part.any():
            self.egress_free = float(rnd.egress_done[took_part].max())
        on_time = arrived & (arrival <= rnd.close)
        member_then = self._member_at(slots[on_time], arrival[on_time])
        accepted = int(np.unique(slots[on_time][member_then]).size)
        if accepted:
            st.outcomes["BUFFERED"] += accepted - 1
            st.outcomes["APPLIED"] += 1
            st.staleness_applied[0] += accepted
        st.outcomes["DUPLICATE"] += int(member_then.sum()) - accepted
        st.outcomes["PERMISSION_DENIED"] += int((~member_then).sum())
        late = arrived & (arrival > rnd.close)
        if late.any():
            self.late.append((slots[late], arrival[late]))
        self.throughput.observe(slots[arrived], arrival[arrived] - start[arrived])
        st.step_time_sum_s += float((arrival[arrived] - start[arrived]).sum())
        st.steps += int(arrived.sum())
        nxt = np.full(a.size, INF)
        if arrived.any():
            z_all, u_all = self.draws.table(self.version)
            s_ok = slots[arrived]
            nxt[arrived] = self.steps.next_request(s_ok, arrival[arrived], z_all[s_ok], u_all[s_ok])
        ag.request[a] = nxt
        if rnd.timed_out:
            st.timed_out_rounds += 1
        st.updates_per_version.append(accepted)
        st.members_per_version.append(int(self._member_at(np.arange(self.member.size), np.full(self.member.size,
                                                                                               rnd.close)).sum()))
        self.closes.append(rnd.close)
        self.version += 1
        agg = self.cfg.aggregation_base_s + self.cfg.aggregation_per_update_s * accepted
        self.publish = rnd.close + agg
        st.publish_times.append(self.publish)
        self._resolve_late(rnd.close, final=False)
        while self.changes and self.changes[0][0] <= rnd.close:
            self.member = self.changes.pop(0)[1]
        self._adopt_changes()

    def _member_at(self, slots: np.ndarray, times: np.ndarray) -> np.ndarray:
        if slots.size == 0:
            return np.zeros(0, dtype=bool)
        change_times = np.array([t for t, _ in self.history])
        masks = np.stack([m for _, m in self.history])
        idx = np.searchsorted(change_times, times, side="right") - 1
        return masks[idx, slots]

    def _resolve_late(self, upto: float, final: bool) -> None:
        """Outcomes of updates that arrived after their round closed, once the membership then is known."""
        keep: list[tuple[np.ndarray, np.ndarray]] = []
        last_close = self.closes[-1] if self.closes else INF
        for slots, arrival in self.late:
            due = arrival <= upto
            if due.any():
                s, t = slots[due], arrival[due]
                member = self._member_at(s, t)
                complete = (t >= last_close) if final and self.outcome == "completed" else np.zeros(t.size, bool)
                st = self.stats.outcomes
                st["JOB_COMPLETE"] += int((member & complete).sum())
                st["LATE_DROPPED"] += int((member & ~complete).sum())
                st["PERMISSION_DENIED"] += int((~member).sum())
            if not final and (~due).any():
                keep.append((slots[~due], arrival[~due]))
        self.late = keep
        oldest = min((float(t.min()) for _, t in self.late), default=upto)
        while len(self.history) > 1 and self.history[1][0] <= min(oldest, self.publish):
            self.history.pop(0)
