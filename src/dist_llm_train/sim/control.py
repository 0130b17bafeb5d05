"""The control plane in virtual time: workers live, die, rejoin and heartbeat; the real controller reacts.

Heartbeats are not simulated one by one (10⁴ workers × 10⁶ virtual seconds would be 10¹⁰ events). A live
worker's heartbeats arrive every interval, so the controller's view of it is refreshed in bulk before each
detector tick; only the heartbeats that matter are computed exactly: the last one a crashing worker gets out,
and one that stalls in TCP retransmission backoff long enough to look like a death (`false_suspicion`). The
detector itself (`FailureDetector.tick`, via adapters) runs only at the ticks that can change something: the
grid tick right after a silent worker's timeout, and a tick at once after any change (the real loop is woken
the same way). Skipped grid ticks are exactly the ones that would have found nothing.

An availability trace (`SimConfig.availability`, docs/simulation.md "Churn of transient workers") drives
transient workers: one absent at time 0 registers at its first session's join; a leave stops its process at
that virtual time exactly like a crash (the controller learns it from heartbeat silence); the next session's
join is a new life under the same name. Trace events ride on the DEATH and JOIN kinds (payload tagged with
the trace's "leave" / "join"), so both engines already hand them here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_llm_train.core.availability import JOIN, LEAVE
from dist_llm_train.sim import adapters
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.dataplane import DataPlane, NoDataPlane
from dist_llm_train.sim.draws import control_rng
from dist_llm_train.sim.events import EventQueue, Kind
from dist_llm_train.sim.linkmath import propagation_1, small_penalty_1
from dist_llm_train.sim.metrics import DataStats
from dist_llm_train.sim.network import Topology, worker_name

P_PHASE, P_LIFE, P_JOINS, P_LASTHB, P_STALL, P_LEARN, P_START = 1, 2, 3, 4, 5, 6, 7


@dataclass
class ControlStats:
    crashes: int = 0
    rejoins: int = 0
    joins: int = 0
    stalls: int = 0
    false_suspicions: int = 0
    ticks: int = 0
    alive_seconds: float = 0.0
    detection_latency_s: list[float] = field(default_factory=list)
    death_times: dict[int, float] = field(default_factory=dict)
    last_heartbeat: dict[int, float] = field(default_factory=dict)  # at the controller, per crashed slot
    declared_dead: list[str] = field(default_factory=list)
    leaves: int = 0  # live workers stopped by an availability trace's leave
    trace_joins: int = 0  # workers started by a trace's join (first arrival or return)
    availability_log: list[tuple[float, int, str]] = field(default_factory=list)  # (time, slot, join | leave)
    leave_times: set[tuple[int, float]] = field(default_factory=set)  # (slot, time): which deaths were leaves
    offered_worker_s: float = 0.0  # worker-seconds the pool offered (set by `finish`)


class ControlPlane:
    def __init__(self, cfg: SimConfig, topo: Topology, queue: EventQueue) -> None:
        self.cfg, self.topo, self.queue = cfg, topo, queue
        self.clock = queue.clock
        self.h = cfg.heartbeat_interval_s
        self.poll = cfg.simulation.scheduling_interval
        self.ctl = adapters.SimController(
            cfg.scheduler,
            self.h,
            cfg.heartbeat_miss_limit,
            cfg.telemetry_alpha,
            self.clock,
            self._deliver_members,
        )
        self.ctl.set_on_change(self._wake)
        self.half = self.ctl.tick_interval_s
        self.timeout = self.ctl.timeout_s
        n = cfg.capacity
        phases = control_rng(cfg.seed, P_PHASE).random((n, 2))
        self.hb_phase = (phases[:, 0] * self.h).tolist()
        self.poll_phase = (phases[:, 1] * self.poll).tolist()
        self.alive = [False] * n
        self.trace = cfg.availability_trace()
        self.available = [True] * n  # per the availability trace (always, without one)
        self.alive_s = [0.0] * n
        self._trace_join_times: list[float] = []
        self.incarnation = [0] * n
        self.started = [0.0] * n
        self.worker_id: list[str | None] = [None] * n
        self.slot_of: dict[str, int] = {}
        self.silent: dict[int, float] = {}  # slot -> arrival of its last heartbeat, while it is silent
        self.declared: set[int] = set()
        self.holding: dict[int, int] = {}
        self.stats = ControlStats()
        self.data: DataPlane = NoDataPlane()
        self._last_tick = 0.0
        self._tick_gen = 0
        self._wake_pending = False
        self._learn_batches = 0
        self._p_stall, self._j_star = self._stall_model()

    # -- setup ----------------------------------------------------------------------------------------------
    def start(self, data: DataPlane) -> None:
        """Register the initial workers, submit the job, schedule failures and joins, and tick once."""
        self.data = data
        self._wake_pending = True  # the setup's own changes are covered by the tick below
        n = self.cfg.workers
        rng = control_rng(self.cfg.seed, P_START)  # one stream for the first life of every initial worker
        mtbf = self.cfg.failures.mtbf_s
        lives = rng.exponential(mtbf, n).tolist() if mtbf is not None else [None] * n
        p = self._p_stall[self.topo.group[:n]]
        stalls = np.where(p > 0, rng.geometric(np.where(p > 0, p, 1.0)), 0).tolist()
        with self.ctl.registering():  # one transaction for all of them (nothing is pending yet)
            for slot in range(n):
                if self.trace is None or self.trace.present_at_start(slot):
                    self._come_alive(slot, lives[slot], int(stalls[slot]))
                else:  # a transient worker whose first session starts later is not there yet
                    self.available[slot] = False
        self.ctl.submit(self.cfg.num_tasks, {"training": {"strategy": self.cfg.mode, "steps": self.cfg.rounds}})
        for kill in self.cfg.failures.kills:
            self.queue.at(kill.at_s, Kind.DEATH, (kill.worker, None))
        churn = self.cfg.churn
        if churn.max_joins:
            gaps = control_rng(self.cfg.seed, P_JOINS).exponential(
                1.0 / churn.join_rate_per_s, churn.max_joins
            )
            for j, t in enumerate(np.cumsum(gaps).tolist()):
                if t < self.cfg.max_virtual_s:
                    self.queue.at(t, Kind.JOIN, self.cfg.workers + j)
        for t, slot, what in self.trace.events() if self.trace is not None else []:
            if t < self.cfg.max_virtual_s:
                # DEATH sorts before JOIN at one instant, so a session that ends as the next begins is a new life.
                if what == LEAVE:
                    self.queue.at(t, Kind.DEATH, (slot, None, LEAVE))
                else:
                    self.queue.at(t, Kind.JOIN, (slot, JOIN))
        self.queue.at(self.clock(), Kind.TICK, None)

    def _come_alive(self, slot: int, life: float | None = None, stall_after: int | None = None) -> None:
        """(Re-)register `slot` now and schedule its crash and heartbeat stall, if the models produce them.

        `life` and `stall_after` (heartbeats until a stall; 0: never) are drawn here unless given."""
        now = self.clock()
        self.alive[slot] = True
        self.started[slot] = now
        self.silent.pop(slot, None)
        self.declared.discard(slot)
        wid = self.ctl.register(
            worker_name(slot), float(self.topo.compute_slowdown[slot]), self._bandwidth(slot)
        )
        self.worker_id[slot] = wid
        self.slot_of[wid] = slot
        inc = self.incarnation[slot]
        mtbf = self.cfg.failures.mtbf_s
        if mtbf is not None:
            if life is None:
                life = float(control_rng(self.cfg.seed, P_LIFE, slot, inc).exponential(mtbf))
            if now + life < self.cfg.max_virtual_s:
                self.queue.at(now + life, Kind.DEATH, (slot, inc))
        self._schedule_stall(slot, now, stall_after)

    def _bandwidth(self, slot: int) -> float:
        rate = float(self.topo.up.rate[self.topo.group_of(slot), 0])
        return min(rate / 1e6, 1e9) if math.isfinite(rate) else 1e5

    # -- heartbeat stalls (false suspicion) ------------------------------------------------------------------
    def _stall_model(self) -> tuple[np.ndarray, np.ndarray]:
        """Per group: chance that one heartbeat stalls past the timeout, and the retries that takes.

        A heartbeat exchange fails if its request or reply is lost (p = 1 − (1 − p₁)²); its j-th retry
        waits RTO·(2^j − 1) in total, and the controller declares death once that exceeds (miss_limit − 1)
        intervals."""
        hb = self.topo.hb
        weights = np.array([s for s in self._segment_weights()])
        p1 = (hb.loss * weights).sum(axis=1)
        rto = (self.topo.hb_rto * weights).sum(axis=1)
        p = 1.0 - (1.0 - p1) ** 2
        budget = (self.cfg.heartbeat_miss_limit - 1) * self.h
        j_star = np.maximum(1, np.floor(np.log2(budget / np.maximum(rto, 1e-9) + 1.0)) + 1).astype(np.int64)
        j_star = np.minimum(j_star, self.cfg.transport.max_retries)
        p_stall = np.where(p > 0, p**j_star, 0.0) if self.cfg.failures.false_suspicion else np.zeros_like(p)
        return p_stall, j_star

    def _segment_weights(self) -> list[float]:
        tl = self.topo.timeline
        if tl.single:
            return [1.0]
        ends = tl.starts[1:] + [tl.period]
        return [(e - s) / tl.period for s, e in zip(tl.starts, ends, strict=True)]

    def _schedule_stall(self, slot: int, since: float, k: int | None = None) -> None:
        g = self.topo.group_of(slot)
        p = float(self._p_stall[g])
        if p <= 0 or k == 0:
            return
        if k is None:
            k = int(
                control_rng(self.cfg.seed, P_STALL, slot, self.incarnation[slot], int(since * 1e3)).geometric(
                    p
                )
            )
        t = self._next_send(slot, since) + (k - 1) * self.h
        if t < self.cfg.max_virtual_s:
            self.queue.at(t, Kind.HB_STALL, (slot, self.incarnation[slot]))

    def _next_send(self, slot: int, after: float) -> float:
        first = self.started[slot] + self.hb_phase[slot]
        k = max(0, math.ceil((after - first) / self.h))
        return first + k * self.h

    def _hb_arrival(self, slot: int, sent: float, rng: np.random.Generator) -> float:
        g, seg = self.topo.group_of(slot), self.topo.timeline.index_1(sent)
        hb = self.topo.hb
        z, u, ul = rng.standard_normal(), rng.random(), rng.random()
        prop = propagation_1(hb.delay[g, seg], hb.jitter[g, seg], int(hb.dist[g, seg]), z, u)
        pen = small_penalty_1(
            float(hb.loss[g, seg]), 1, float(self.topo.hb_rto[g, seg]), ul, self.cfg.transport.max_retries
        )
        return sent + prop + pen

    # -- events ---------------------------------------------------------------------------------------------
    def handle(self, kind: Kind, data: Any) -> None:
        if kind is Kind.TICK:
            self._tick(data)
        elif kind is Kind.DEATH:
            self._death(*data)
        elif kind is Kind.REJOIN:
            self._rejoin(*data)
        elif kind is Kind.JOIN:
            if isinstance(data, tuple):
                self._trace_join(data[0])
            else:
                self._join(data)
        elif kind is Kind.HB_STALL:
            self._stall(*data)
        elif kind is Kind.HB_RESUME:
            self._resume(*data)
        elif kind is Kind.LEARN:
            self._learn(*data)
        else:
            raise ValueError(f"not a control-plane event: {kind.name}")

    def _death(self, slot: int, inc: int | None, cause: str | None = None) -> None:
        """A crash, or with `cause` "leave" an availability trace's leave: the process stops either way."""
        leave = cause == LEAVE
        if leave:
            self.available[slot] = False
            self.stats.availability_log.append((self.clock(), slot, LEAVE))
        if not self.alive[slot] or (inc is not None and inc != self.incarnation[slot]):
            return
        now = self.clock()
        self.alive[slot] = False
        if leave:  # counted by `finish`, from the times (up to the run's end)
            self.stats.leave_times.add((slot, now))
        else:
            self.stats.crashes += 1
        self.stats.alive_seconds += now - self.started[slot]
        self.alive_s[slot] += now - self.started[slot]
        self.stats.death_times[slot] = now
        self.data.on_death(slot)
        if slot not in self.silent:
            first = self.started[slot] + self.hb_phase[slot]
            if now < first:
                last = self.started[slot]  # registration counts as a heartbeat
            else:
                sent = first + math.floor((now - first) / self.h) * self.h
                last = self._hb_arrival(
                    slot, sent, control_rng(self.cfg.seed, P_LASTHB, slot, self.incarnation[slot])
                )
            self.silent[slot] = last
        self.stats.last_heartbeat[slot] = self.silent[slot]
        self._plan_detection(self.silent[slot])
        rejoin = self.cfg.failures.rejoin_after_s
        if rejoin is not None and not leave:  # a worker that left comes back at its next session, not before
            self.queue.at(now + rejoin, Kind.REJOIN, (slot, self.incarnation[slot]))

    def _rejoin(self, slot: int, inc: int) -> None:
        if self.alive[slot] or inc != self.incarnation[slot] or not self.available[slot]:
            return
        self.incarnation[slot] += 1
        self.stats.rejoins += 1
        self._come_alive(slot)
        if self.holding.get(slot, 0) > 0:  # back before it was declared dead: its tasks are still its own
            self._plan_learn([slot], self.clock())
        self._wake()

    def _join(self, slot: int) -> None:
        self.stats.joins += 1
        self._come_alive(slot)
        self._wake()

    def _trace_join(self, slot: int) -> None:
        """A session of the availability trace starts: the worker's process starts (again) under its name."""
        now = self.clock()
        self.available[slot] = True
        self.stats.availability_log.append((now, slot, JOIN))
        if self.alive[slot]:
            return  # sessions of one worker never overlap; nothing to start
        self._trace_join_times.append(now)  # counted by `finish`, up to the run's end
        if self.worker_id[slot] is not None:  # it was here before: a new life, as a failure rejoin is
            self.incarnation[slot] += 1
            self._come_alive(slot)
            if self.holding.get(slot, 0) > 0:  # back before it was declared dead: its tasks are still its own
                self._plan_learn([slot], now)
        else:
            self._come_alive(slot)
        self._wake()

    def _stall(self, slot: int, inc: int) -> None:
        if not self.alive[slot] or inc != self.incarnation[slot] or slot in self.silent:
            return
        now = self.clock()
        rng = control_rng(self.cfg.seed, P_STALL, slot, inc, int(now * 1e3), 1)
        g = self.topo.group_of(slot)
        p = float(self._p_stall[g]) ** (1.0 / float(self._j_star[g]))
        retries = min(int(self._j_star[g]) + int(rng.geometric(1.0 - p)) - 1, self.cfg.transport.max_retries)
        prev = (
            self._hb_arrival(slot, now - self.h, rng)
            if now - self.h >= self.started[slot]
            else self.started[slot]
        )
        seg = self.topo.timeline.index_1(now)
        resume = self._hb_arrival(slot, now, rng) + float(self.topo.hb_rto[g, seg]) * (2.0**retries - 1.0)
        self.stats.stalls += 1
        self.silent[slot] = prev
        self._plan_detection(prev)
        self.queue.at(resume, Kind.HB_RESUME, (slot, inc))

    def _resume(self, slot: int, inc: int) -> None:
        if not self.alive[slot] or inc != self.incarnation[slot]:
            return
        self.silent.pop(slot, None)
        self.declared.discard(slot)
        wid = self.worker_id[slot]
        assert wid is not None
        self.ctl.heartbeat(wid)
        self._schedule_stall(slot, self.clock())
        self._wake()

    def _learn(self, slot: int, inc: int, z: float, u: float) -> None:
        """The worker saw its task: its first pull request reaches the PS one request later."""
        if not self.alive[slot] or inc != self.incarnation[slot] or self.holding.get(slot, 0) == 0:
            return
        now = self.clock()
        g, seg = self.topo.group_of(slot), self.topo.timeline.index_1(now)
        up = self.topo.up
        req = propagation_1(up.delay[g, seg], up.jitter[g, seg], int(up.dist[g, seg]), z, u)
        self.data.activate(slot, now + req)

    def _plan_learn(self, slots: list[int], assigned_at: float) -> None:
        """Each worker sees its new task at its next assignment poll, one task-class round trip later."""
        self._learn_batches += 1
        rng = control_rng(self.cfg.seed, P_LEARN, self._learn_batches)
        z, u = rng.standard_normal((len(slots), 2)).tolist(), rng.random((len(slots), 2)).tolist()
        t = self.topo.task
        for i, slot in enumerate(slots):
            first = self.started[slot] + self.poll_phase[slot]
            k = max(0, math.ceil((assigned_at - first) / self.poll))
            poll_at = first + k * self.poll
            g, seg = self.topo.group_of(slot), self.topo.timeline.index_1(poll_at)
            rtt = 2.0 * propagation_1(
                t.delay[g, seg], t.jitter[g, seg], int(t.dist[g, seg]), z[i][0], u[i][0]
            )
            self.queue.at(poll_at + rtt, Kind.LEARN, (slot, self.incarnation[slot], z[i][1], u[i][1]))

    # -- the detector ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self.queue.at(self.clock(), Kind.TICK, None)

    def _plan_detection(self, last_heartbeat: float) -> None:
        """Schedule the first grid tick at which a worker last heard at `last_heartbeat` is stale."""
        k = math.floor((last_heartbeat + self.timeout - self._last_tick) / self.half) + 1
        t = max(self.clock(), self._last_tick + max(k, 1) * self.half)
        self.queue.at(t, Kind.TICK, self._tick_gen)

    def _tick(self, gen: int | None) -> None:
        if gen is None:
            self._wake_pending = False
        elif gen != self._tick_gen:
            return  # a tick ran since this one was planned and re-planned the grid
        now = self.clock()
        if self.cfg.scheduler == "capability":
            updates = self.data.telemetry()
            if updates:
                self.ctl.set_throughput({self.worker_id[s] or "": v for s, v in updates.items()})
        silent = {self.worker_id[s] or "": last for s, last in self.silent.items() if s not in self.declared}
        self.ctl.heartbeats_until(now, silent)
        report = self.ctl.tick()
        self.stats.ticks += 1
        for wid in report.dead:
            slot = self.slot_of[wid]
            self.declared.add(slot)
            self.stats.declared_dead.append(worker_name(slot))
            if self.alive[slot]:
                self.stats.false_suspicions += 1
            elif slot in self.stats.death_times:
                self.stats.detection_latency_s.append(now - self.stats.death_times[slot])
        self._sync_holdings(now)
        self._last_tick = now
        self._tick_gen += 1
        for slot, last in self.silent.items():
            if slot not in self.declared:
                self._plan_detection(last)

    def _sync_holdings(self, now: float) -> None:
        # Only workers whose task count changed since the last tick (the store keeps that list): at 10⁵ workers
        # reading every worker's count at every tick would be most of the run.
        changed = {self.slot_of[w]: n for w, n in self.ctl.load_changes().items()}
        new = [s for s in sorted(changed) if changed[s] > 0 and self.holding.get(s, 0) == 0 and self.alive[s]]
        if new:
            self._plan_learn(new, now)
        for slot, n in changed.items():
            if n == 0 and self.holding.get(slot, 0) > 0 and self.alive[slot]:
                self.data.deactivate(slot)
            if n > 0:
                self.holding[slot] = n
            else:
                self.holding.pop(slot, None)

    def _deliver_members(self, job_id: str, members: list[str]) -> None:
        slots = np.fromiter(map(self.slot_of.__getitem__, members), dtype=np.int64, count=len(members))
        slots.sort()  # 10⁵ members: numpy sorts them in a fraction of `sorted`'s time
        self.data.on_members(slots.tolist())

    # -- results --------------------------------------------------------------------------------------------
    def finish(self, end: float) -> None:
        """Close the books at the end of the run: time alive so far counts for every live worker.

        Offered worker-seconds: with a trace, the time its workers were available (a crash inside a session
        is the system's loss, not the pool's) plus the time churn's newcomers were up; without one, the time
        every worker was up."""
        for s, alive in enumerate(self.alive):
            if alive:
                self.stats.alive_seconds += max(0.0, end - self.started[s])
                self.alive_s[s] += max(0.0, end - self.started[s])
        # The vectorised engine may have run the control plane a little past the last publish (it drains events
        # up to a round's tentative close); what happened after the end did not happen in this run.
        st = self.stats
        st.availability_log = [e for e in st.availability_log if e[0] <= end]
        st.leaves = sum(1 for _, t in st.leave_times if t <= end)
        st.trace_joins = sum(1 for t in self._trace_join_times if t <= end)
        if self.trace is None:
            self.stats.offered_worker_s = self.stats.alive_seconds
        else:
            newcomers = sum(self.alive_s[self.cfg.workers :])
            self.stats.offered_worker_s = self.trace.offered_s(end) + newcomers

    def counters(self) -> dict[str, int]:
        return self.ctl.counters()

    def alive_count(self) -> int:
        return sum(self.alive)

    def close(self) -> None:
        self.ctl.close()


def availability_summary(cfg: SimConfig, data: DataStats, control: ControlStats) -> dict[str, Any]:
    """The summary's churn figures (docs/simulation.md, "Churn of transient workers").

    goodput = compute seconds behind the updates the PS took / worker-seconds the pool offered; lost updates
    had the parameters and computed, then died with their worker (by cause: a trace's leave or a crash);
    `rounds_closed_by_departure` are rounds a membership shrink closed with fewer updates than they waited
    for (the departed member was declared dead and removed)."""
    trace = cfg.availability_trace()
    offered = control.offered_worker_s
    return {
        "trace": trace.describe() if trace is not None else None,
        "offered_worker_s": offered,
        "accepted_compute_s": data.accepted_compute_s,
        "goodput": data.accepted_compute_s / offered if offered > 0 else None,
        "updates_accepted": data.outcomes.get("APPLIED", 0) + data.outcomes.get("BUFFERED", 0),
        "updates_lost_to_leaves": data.lost_updates.get("leave", 0),
        "updates_lost_to_crashes": data.lost_updates.get("crash", 0),
        "lost_compute_s": data.lost_compute_s,
        "leaves": control.leaves,
        "trace_joins": control.trace_joins,
        "rounds_closed_by_departure": data.closed_by_departure,
    }
