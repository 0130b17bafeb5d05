"""One training step's timeline for a worker, as both engines compute it.

pull request reaches the PS at Q → served at S (sync: once the version it needs is published) → the PS's
egress sends the parameters (a FIFO shared by all pulls, or one per worker) → delivered at D → compute K →
update sent at T = D + K → arrives at the PS at A → the reply returns and the next pull request reaches the
PS at Q' = A + reply + request; with a round barrier and `transport.early_pull` the pull request left with the
push, so Q' = A (the reply and request legs cost nothing). Every method exists twice, vectorised over a
round's workers and scalar for one event, over the same variates (see `draws`). Under
`transport.shaper: userspace` a message's propagation and loss recovery are the relay's (`relaymodel`: one
lookup at the leg's jitter uniform) instead of the kernel path's (`linkmath`: a delay draw plus a
retransmission penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_llm_train.core.strategies import STRATEGIES
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.draws import (
    COL_COMPUTE,
    LEG_PULL,
    LEG_PUSH,
    LEG_REPLY,
    LEG_REQUEST,
    ComputeTime,
    jitter_col,
    loss_col,
)
from dist_llm_train.sim.linkmath import LossModel, loss_penalty, loss_penalty_1, propagation, propagation_1
from dist_llm_train.sim.metrics import Sizes
from dist_llm_train.sim.network import PathTable, Topology
from dist_llm_train.sim.relaymodel import Path, RelayDelivery

Row = tuple[list[float], list[float]]  # (normals, uniforms) of one slot for one version


@dataclass(frozen=True)
class FixedLegs:
    """One version's step costs for every slot, valid when the links do not change over time: the per-event
    engine then looks numbers up instead of evaluating the delay model per message."""

    ser_in: list[float]  # pull serialisation at the worker's ingress
    pull_extra: list[float]  # pull propagation + retransmission penalty
    compute: list[float]
    push_total: list[float]  # push serialisation + propagation + penalty
    after_push: list[float]  # reply to the push + the next pull request


@dataclass(frozen=True)
class _FixedPath:
    """One message's link, per slot: what `propagation` and the loss model read of it."""

    delay: np.ndarray
    jitter: np.ndarray
    dist: np.ndarray
    loss: LossModel


@dataclass(frozen=True)
class _FixedPlan:
    n: int
    pull: _FixedPath
    push: _FixedPath
    push_ser: np.ndarray
    reply: _FixedPath
    request: _FixedPath


@dataclass(frozen=True)
class SlotLegs:
    """One version's step costs for every slot, as the round-at-a-time engine adds them up (`pull_delivered`,
    `compute_time`, `push_arrival` keep propagation and loss penalty apart, so these do too); valid when the
    links do not change over time and messages take the kernel path. A round gathers its members' rows."""

    ser_in: np.ndarray  # pull serialisation at the worker's ingress
    service: float  # the PS egress's time for one pull
    pull_prop: np.ndarray
    pull_pen: np.ndarray
    compute: np.ndarray
    push_ser: np.ndarray
    push_prop: np.ndarray
    push_pen: np.ndarray
    reply: np.ndarray  # the reply to the push, then the next pull request (each propagation + penalty)
    request: np.ndarray


class StepModel:
    def __init__(self, cfg: SimConfig, topo: Topology, sizes: Sizes, compute: ComputeTime) -> None:
        self.topo, self.sizes, self.compute = topo, sizes, compute
        self.shared = cfg.transport.shared_ps_egress
        self.mss = cfg.transport.mss_bytes
        self.retries = cfg.transport.max_retries
        self.early_pull = cfg.transport.early_pull and STRATEGIES[cfg.mode].rounds
        self.pull_bits = 8.0 * sizes.pull_bytes
        self.push_bits = 8.0 * sizes.push_bytes
        self._ps_rate = topo.ps_rate.tolist()
        self._group = topo.group.tolist()
        self._rtt = topo.rtt.tolist()
        self._rto = topo.rto.tolist()
        self._up = _rows(topo.up)
        self._down = _rows(topo.down)
        self.relay = RelayDelivery(topo, self.mss) if cfg.transport.shaper == "userspace" else None
        self._plan: _FixedPlan | None = None

    # -- vectorised ------------------------------------------------------------------------------------------
    def pull_service(self, start: np.ndarray) -> np.ndarray:
        """Seconds the PS's egress is busy with one pull started at `start` (only used when shared)."""
        return self.pull_bits / self.topo.ps_rate[self.topo.timeline.index(start)]

    def pull_delivered(
        self,
        slots: np.ndarray,
        start: np.ndarray,
        egress_done: np.ndarray,
        service: np.ndarray,
        z: np.ndarray,
        u: np.ndarray,
    ) -> np.ndarray:
        t, d = self.topo, self.topo.down
        g, seg = t.group[slots], t.timeline.index(start)
        ser_in = self.pull_bits / d.rate[g, seg]
        if not self.shared:
            service = self.pull_bits / t.ps_rate[seg]
            egress_done = start + service
        done = np.maximum(egress_done, start + ser_in)
        if self.relay is not None:
            return done + self.relay.extra("down", self.sizes.pull_bytes, g, seg, u[:, jitter_col(LEG_PULL)])
        prop = propagation(
            d.delay[g, seg],
            d.jitter[g, seg],
            d.dist[g, seg],
            z[:, jitter_col(LEG_PULL)],
            u[:, jitter_col(LEG_PULL)],
        )
        pen = loss_penalty(
            d.loss[g, seg],
            self.sizes.pull_bytes,
            self.mss,
            t.rtt[g, seg],
            t.rto[g, seg],
            np.maximum(service, ser_in),
            u[:, loss_col(LEG_PULL)],
            z[:, loss_col(LEG_PULL)],
            self.retries,
        )
        return done + prop + pen

    def compute_time(self, slots: np.ndarray, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self.compute.sample(slots, z[:, COL_COMPUTE], u[:, COL_COMPUTE])

    def push_arrival(self, slots: np.ndarray, send: np.ndarray, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        t, p = self.topo, self.topo.up
        g, seg = t.group[slots], t.timeline.index(send)
        ser = self.push_bits / p.rate[g, seg]
        if self.relay is not None:
            return send + ser + self.relay.extra("up", self.sizes.push_bytes, g, seg, u[:, jitter_col(LEG_PUSH)])
        prop = propagation(
            p.delay[g, seg],
            p.jitter[g, seg],
            p.dist[g, seg],
            z[:, jitter_col(LEG_PUSH)],
            u[:, jitter_col(LEG_PUSH)],
        )
        pen = loss_penalty(
            p.loss[g, seg],
            self.sizes.push_bytes,
            self.mss,
            t.rtt[g, seg],
            t.rto[g, seg],
            ser,
            u[:, loss_col(LEG_PUSH)],
            z[:, loss_col(LEG_PUSH)],
            self.retries,
        )
        return send + ser + prop + pen

    def next_request(
        self, slots: np.ndarray, arrival: np.ndarray, z: np.ndarray, u: np.ndarray
    ) -> np.ndarray:
        if self.early_pull:
            return arrival + 0.0  # a new array, as the legs' sum would be
        reply_at = arrival + self._small("down", slots, arrival, z, u, LEG_REPLY)
        return reply_at + self._small("up", slots, reply_at, z, u, LEG_REQUEST)

    def _small(
        self, kind: Path, slots: np.ndarray, at: np.ndarray, z: np.ndarray, u: np.ndarray, leg: int
    ) -> np.ndarray:
        t = self.topo
        path = t.up if kind == "up" else t.down
        g, seg = t.group[slots], t.timeline.index(at)
        if self.relay is not None:
            return self.relay.extra(kind, self.sizes.small_bytes, g, seg, u[:, jitter_col(leg)])
        prop = propagation(
            path.delay[g, seg],
            path.jitter[g, seg],
            path.dist[g, seg],
            z[:, jitter_col(leg)],
            u[:, jitter_col(leg)],
        )
        pen = loss_penalty(
            path.loss[g, seg],
            self.sizes.small_bytes,
            self.mss,
            t.rtt[g, seg],
            t.rto[g, seg],
            np.zeros_like(at),
            u[:, loss_col(leg)],
            z[:, loss_col(leg)],
            self.retries,
        )
        return prop + pen

    def slot_legs(self, z: np.ndarray, u: np.ndarray) -> SlotLegs | None:
        """Every slot's `SlotLegs` for one version's variates; None when a schedule or relay semantics apply."""
        t = self.topo
        if not t.timeline.single or self.relay is not None:
            return None
        slots = np.arange(z.shape[0])
        g = t.group[slots]
        ser_in = self.pull_bits / t.down.rate[g, 0]
        service = float(self.pull_bits / t.ps_rate[0])
        plan = self._fixed_plan(slots.size, g, ser_in if self.shared else np.maximum(ser_in, service), service)

        def prop(path: _FixedPath, which: int) -> np.ndarray:
            return propagation(path.delay, path.jitter, path.dist, z[:, jitter_col(which)], u[:, jitter_col(which)])

        def pen(path: _FixedPath, which: int) -> np.ndarray:
            return path.loss.penalty(u[:, loss_col(which)], z[:, loss_col(which)])

        return SlotLegs(
            ser_in=ser_in,
            service=service,
            pull_prop=prop(plan.pull, LEG_PULL),
            pull_pen=pen(plan.pull, LEG_PULL),
            compute=self.compute_time(slots, z, u),
            push_ser=plan.push_ser,
            push_prop=prop(plan.push, LEG_PUSH),
            push_pen=pen(plan.push, LEG_PUSH),
            reply=self._after_push_leg(prop(plan.reply, LEG_REPLY) + pen(plan.reply, LEG_REPLY)),
            request=self._after_push_leg(prop(plan.request, LEG_REQUEST) + pen(plan.request, LEG_REQUEST)),
        )

    def _after_push_leg(self, cost: np.ndarray) -> np.ndarray:
        """A leg between the push's arrival and the next pull request: free when the pull left with the push."""
        return np.zeros_like(cost) if self.early_pull else cost

    def fixed_legs(self, z: np.ndarray, u: np.ndarray) -> FixedLegs | None:
        """Every slot's leg costs for one version's variates; None when a schedule makes them vary in time."""
        t = self.topo
        if not t.timeline.single:
            return None
        slots = np.arange(z.shape[0])
        g = t.group[slots]
        d, p = t.down, t.up
        ser_in = self.pull_bits / d.rate[g, 0]
        service = self.pull_bits / t.ps_rate[0]
        if not self.shared:
            ser_in = np.maximum(ser_in, service)
        if self.relay is not None:
            seg0 = np.zeros_like(g)
            ser = self.push_bits / p.rate[g, 0]
            zero = np.zeros(slots.size)
            return FixedLegs(
                ser_in.tolist(),
                self.relay.extra("down", self.sizes.pull_bytes, g, seg0, u[:, jitter_col(LEG_PULL)]).tolist(),
                self.compute_time(slots, z, u).tolist(),
                (ser + self.relay.extra("up", self.sizes.push_bytes, g, seg0, u[:, jitter_col(LEG_PUSH)])).tolist(),
                self._after_push_leg(self._small("down", slots, zero, z, u, LEG_REPLY)
                                     + self._small("up", slots, zero, z, u, LEG_REQUEST)).tolist(),
            )
        plan = self._fixed_plan(slots.size, g, ser_in, service)

        def prop(path: _FixedPath, which: int) -> np.ndarray:
            return propagation(path.delay, path.jitter, path.dist, z[:, jitter_col(which)], u[:, jitter_col(which)])

        def pen(path: _FixedPath, which: int) -> np.ndarray:
            return path.loss.penalty(u[:, loss_col(which)], z[:, loss_col(which)])

        # Summed in the order the scalar and round-at-a-time paths sum them (the same numbers to the last bit).
        pull_extra = prop(plan.pull, LEG_PULL) + pen(plan.pull, LEG_PULL)
        push_total = plan.push_ser + prop(plan.push, LEG_PUSH) + pen(plan.push, LEG_PUSH)
        after = self._after_push_leg((prop(plan.reply, LEG_REPLY) + pen(plan.reply, LEG_REPLY)) + (
            prop(plan.request, LEG_REQUEST) + pen(plan.request, LEG_REQUEST)
        ))
        return FixedLegs(
            ser_in.tolist(),
            pull_extra.tolist(),
            self.compute_time(slots, z, u).tolist(),
            push_total.tolist(),
            after.tolist(),
        )

    def _fixed_plan(self, n: int, g: np.ndarray, ser_in: np.ndarray, service: float) -> _FixedPlan:
        """What `fixed_legs` needs of the links alone (per slot, the first and only segment), built once:
        every version's legs then cost only the arithmetic on its variates (the per-event engine builds
        them for each of its 10³ versions)."""
        if self._plan is None or self._plan.n != n:
            t, d, p = self.topo, self.topo.down, self.topo.up
            rtt, rto = t.rtt[g, 0], t.rto[g, 0]
            push_ser = self.push_bits / p.rate[g, 0]
            zero = np.zeros(n)

            def path(table: PathTable, nbytes: int, transfer_s: np.ndarray) -> _FixedPath:
                loss = LossModel(table.loss[g, 0], nbytes, self.mss, rtt, rto, transfer_s, self.retries)
                return _FixedPath(table.delay[g, 0], table.jitter[g, 0], table.dist[g, 0], loss)

            self._plan = _FixedPlan(
                n=n,
                pull=path(d, self.sizes.pull_bytes, np.maximum(service, ser_in)),
                push=path(p, self.sizes.push_bytes, push_ser),
                push_ser=push_ser,
                reply=path(d, self.sizes.small_bytes, zero),
                request=path(p, self.sizes.small_bytes, zero),
            )
        return self._plan

    # -- scalar ----------------------------------------------------------------------------------------------
    def pull_service_1(self, start: float) -> float:
        return self.pull_bits / self._ps_rate[self.topo.timeline.index_1(start)]

    def pull_delivered_1(
        self, slot: int, start: float, egress_done: float, service: float, row: Row
    ) -> float:
        z, u = row
        g, seg = self._group[slot], self.topo.timeline.index_1(start)
        delay, jitter, dist, loss, rate = self._down[g][seg]
        ser_in = self.pull_bits / rate
        if not self.shared:
            service = self.pull_bits / self._ps_rate[seg]
            egress_done = start + service
        done = max(egress_done, start + ser_in)
        if self.relay is not None:
            return done + self.relay.extra_1("down", self.sizes.pull_bytes, g, seg, u[jitter_col(LEG_PULL)])
        prop = propagation_1(delay, jitter, dist, z[jitter_col(LEG_PULL)], u[jitter_col(LEG_PULL)])
        pen = loss_penalty_1(
            loss,
            self.sizes.pull_bytes,
            self.mss,
            self._rtt[g][seg],
            self._rto[g][seg],
            max(service, ser_in),
            u[loss_col(LEG_PULL)],
            z[loss_col(LEG_PULL)],
            self.retries,
        )
        return done + prop + pen

    def compute_time_1(self, slot: int, row: Row) -> float:
        return self.compute.sample_1(slot, row[0][COL_COMPUTE], row[1][COL_COMPUTE])

    def push_arrival_1(self, slot: int, send: float, row: Row) -> float:
        z, u = row
        g, seg = self._group[slot], self.topo.timeline.index_1(send)
        delay, jitter, dist, loss, rate = self._up[g][seg]
        ser = self.push_bits / rate
        if self.relay is not None:
            return send + ser + self.relay.extra_1("up", self.sizes.push_bytes, g, seg, u[jitter_col(LEG_PUSH)])
        prop = propagation_1(delay, jitter, dist, z[jitter_col(LEG_PUSH)], u[jitter_col(LEG_PUSH)])
        pen = loss_penalty_1(
            loss,
            self.sizes.push_bytes,
            self.mss,
            self._rtt[g][seg],
            self._rto[g][seg],
            ser,
            u[loss_col(LEG_PUSH)],
            z[loss_col(LEG_PUSH)],
            self.retries,
        )
        return send + ser + prop + pen

    def next_request_1(self, slot: int, arrival: float, row: Row) -> float:
        if self.early_pull:
            return arrival
        reply_at = arrival + self._small_1("down", slot, arrival, row, LEG_REPLY)
        return reply_at + self._small_1("up", slot, reply_at, row, LEG_REQUEST)

    def _small_1(self, kind: Path, slot: int, at: float, row: Row, leg: int) -> float:
        z, u = row
        g, seg = self._group[slot], self.topo.timeline.index_1(at)
        if self.relay is not None:
            return self.relay.extra_1(kind, self.sizes.small_bytes, g, seg, u[jitter_col(leg)])
        rows = self._up if kind == "up" else self._down
        delay, jitter, dist, loss, _ = rows[g][seg]
        prop = propagation_1(delay, jitter, dist, z[jitter_col(leg)], u[jitter_col(leg)])
        pen = loss_penalty_1(
            loss,
            self.sizes.small_bytes,
            self.mss,
            self._rtt[g][seg],
            self._rto[g][seg],
            0.0,
            u[loss_col(leg)],
            z[loss_col(leg)],
            self.retries,
        )
        return prop + pen


def _rows(path: PathTable) -> list[list[tuple[float, float, int, float, float]]]:
    return [[(h.delay, h.jitter, h.dist, h.loss, h.rate) for h in row] for row in path.hops]
