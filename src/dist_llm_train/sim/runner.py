"""Build a simulation from a `SimConfig`, run it, and summarise it in the run report's vocabulary."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_llm_train.core.strategies import STRATEGIES
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.schema import ProfileError
from dist_llm_train.sim.actor_engine import ActorEngine
from dist_llm_train.sim.config import SimConfig, SimConfigError
from dist_llm_train.sim.control import ControlPlane, ControlStats, availability_summary
from dist_llm_train.sim.dataplane import NoDataPlane
from dist_llm_train.sim.draws import ComputeTime, VersionDraws, slot_factors
from dist_llm_train.sim.engine import Engine, Numerics
from dist_llm_train.sim.events import EventQueue, VirtualClock
from dist_llm_train.sim.metrics import DataStats, Sizes, TelemetryLog, Throughput, message_sizes
from dist_llm_train.sim.network import Topology
from dist_llm_train.sim.steps import StepModel
from dist_llm_train.sim.sync_engine import SyncRoundEngine

UNSHAPED = "none"
"""Profile name meaning perfect links (no delay, loss or rate limit), like an unshaped loopback run."""


@dataclass
class SimResult:
    config: SimConfig
    engine: str
    outcome: str  # completed | stalled | time_limit
    virtual_s: float
    version: int
    stats: DataStats
    control: ControlStats
    controller_counters: dict[str, int]
    sizes: Sizes | None
    link: dict[str, Any]
    bound_terms: list[tuple[float, ...]]
    links: list[dict[str, Any]]
    alive_at_end: int
    events: int
    wall_s: float
    telemetry: TelemetryLog | None = None
    trained: Any = None
    """`training.Trained` when the run trained the real model (real numerics), else None."""

    @property
    def round_times(self) -> np.ndarray:
        pub = np.array(self.stats.publish_times)
        return np.diff(np.concatenate([[0.0], pub])) if pub.size else pub


def choose_engine(cfg: SimConfig, real_numerics: bool = False) -> str:
    rounds = cfg.strategy.rounds
    if cfg.strategy.overlap_steps > 0:  # compute overlapping a sync: per worker, per event
        if cfg.engine == "vectorised":
            raise SimConfigError(f"engine: vectorised cannot overlap compute with syncs ({cfg.mode}); use exact")
        return "exact"
    if real_numerics:
        if cfg.engine == "vectorised":
            raise SimConfigError("engine: vectorised cannot train (its rounds are computed whole); use exact")
        return "exact"
    if cfg.engine == "vectorised" and not rounds:
        round_based = sorted(name for name, cls in STRATEGIES.items() if cls.rounds)
        raise SimConfigError(
            f"engine: vectorised runs round-based strategies only ({', '.join(round_based)}); "
            f"{cfg.mode} is simulated per event (exact)"
        )
    if cfg.engine == "exact" or not rounds:
        return "exact"
    return "vectorised"


@contextlib.contextmanager
def _quiet_controller() -> Iterator[None]:
    """The reused controller logs every death and assignment; at 10⁴ virtual workers that is noise."""
    log = logging.getLogger("dist_llm_train.controller")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def simulate(cfg: SimConfig, telemetry: bool = False, numerics: Numerics | None = None) -> SimResult:
    """Run one simulation to completion (or stall, or the virtual time limit). Bad config raises first.

    `telemetry` keeps one row per update (for a `metrics.csv` like a real run's); leave it off at scale.
    `numerics` makes the updates (default: a one-parameter job whose maths is free; `training.RealNumerics`
    trains the model, on the per-event engine)."""
    with _quiet_controller():
        return _simulate(cfg, TelemetryLog() if telemetry else None, numerics)


def _simulate(cfg: SimConfig, log: TelemetryLog | None, numerics: Numerics | None) -> SimResult:
    started = time.perf_counter()
    engine_name = choose_engine(cfg, real_numerics=numerics is not None)
    try:
        profile = load_profile(cfg.profile) if cfg.profile not in (None, "", UNSHAPED) else None
    except ProfileError as err:
        raise SimConfigError(f"profile: {err}") from None
    topo = Topology(profile, cfg.capacity, cfg.workers, cfg.transport.rto_min_s)
    clock = VirtualClock()
    queue = EventQueue(clock)
    control = ControlPlane(cfg, topo, queue)
    stats = DataStats()
    sizes: Sizes | None = None
    factors = slot_factors(cfg.seed, cfg.capacity, cfg.compute, topo.compute_slowdown)
    try:
        if cfg.rounds == 0:
            control.start(NoDataPlane())
            horizon = cfg.min_duration_s
            while queue.peek_time() <= horizon:
                _, kind, _, data = queue.pop()
                control.handle(kind, data)
            clock.advance(max(clock.now, horizon))
            outcome, end, version = "completed", clock.now, 0
        else:
            sizes = message_sizes(cfg)
            steps = StepModel(cfg, topo, sizes, ComputeTime(cfg.compute, factors, cfg.steps_per_push))
            draws = VersionDraws(cfg.seed, cfg.capacity)
            thr = Throughput(cfg.capacity, cfg.telemetry_alpha, cfg.batch_size, cfg.scheduler == "capability")
            cls: type[Engine] = SyncRoundEngine if engine_name == "vectorised" else ActorEngine
            engine = cls(cfg, queue, control, steps, draws, stats, thr, log, numerics)
            control.start(engine)
            engine.run()
            outcome = engine.outcome
            end = engine.end if engine.end is not None else clock.now
            version = len(stats.publish_times)
        control.finish(end)
        return SimResult(
            config=cfg,
            engine=engine_name,
            outcome=outcome,
            virtual_s=end,
            version=version,
            stats=stats,
            control=control.stats,
            controller_counters=control.counters(),
            sizes=sizes,
            link=topo.describe(),
            links=topo.configured_links(),
            bound_terms=bound_terms(cfg, topo, sizes, factors) if sizes is not None else [],
            alive_at_end=control.alive_count(),
            events=queue.processed,
            wall_s=time.perf_counter() - started,
            telemetry=log,
        )
    finally:
        control.close()


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if x.size == 0:
        return {"mean": None, "p50": None, "p95": None, "min": None, "max": None}
    return {
        "mean": float(x.mean()),
        "p50": float(np.percentile(x, 50)),
        "p95": float(np.percentile(x, 95)),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _counter_stats(c: dict[int, int]) -> dict[str, float | None]:
    if not c:
        return {"mean": None, "p50": None, "p95": None, "min": None, "max": None}
    values = np.repeat(np.array(list(c.keys()), dtype=float), np.array(list(c.values())))
    return _stats(values)


def bound_terms(cfg: SimConfig, topo: Topology, sizes: Sizes, factors: np.ndarray) -> list[tuple[float, ...]]:
    """Per kind of initial worker (node group): (mean compute, pull, push, RTT) on segment 0's links."""
    out: list[tuple[float, ...]] = []
    groups = topo.group[: cfg.workers]
    for g in sorted(set(groups.tolist())):
        members = np.nonzero(groups == g)[0]
        compute = cfg.compute.mean_s * cfg.steps_per_push * float(factors[members].mean())
        pull = 8.0 * sizes.pull_bytes / min(float(topo.ps_rate[0]), float(topo.down.rate[g, 0]))
        push = 8.0 * sizes.push_bytes / float(topo.up.rate[g, 0])
        out.append((compute, pull, push, float(topo.rtt[g, 0])))
    return out


def physics_bound(r: SimResult) -> dict[str, float | None]:
    """The link-physics lower bound of a round: compute + bytes / rate + RTT (docs/simulation.md).

    `single` is the slowest kind of worker alone on its links; `shared` has its pull wait for every member's
    pull through the PS's egress queue (or its own ingress, whichever is slower), the bound that applies when
    that egress is shaped (the default)."""
    if r.sizes is None or not r.config.strategy.rounds or not r.bound_terms:
        return {"single_s": None, "shared_s": None, "measured_over_bound": None}
    single = max(sum(t) for t in r.bound_terms)
    queue = r.config.workers * 8.0 * r.sizes.pull_bytes / float(r.link["ps_rate_bps"])
    shared = single
    if r.config.transport.shared_ps_egress:
        shared = max(compute + max(pull, queue) + push + rtt for compute, pull, push, rtt in r.bound_terms)
    rt = r.round_times
    bound = shared if math.isfinite(shared) else None
    ratio = float(rt.mean()) / bound if rt.size and bound else None
    return {"single_s": single, "shared_s": shared, "measured_over_bound": ratio}


def summary(r: SimResult, run_id: str = "", run_dir: str = "") -> dict[str, Any]:
    """The real run's `summary.json` keys (losses are null: nothing is trained) plus a `simulation` block."""
    st, cs, cfg = r.stats, r.control, r.config
    outcomes = dict(sorted(st.outcomes.items()))
    applied = st.outcomes.get("APPLIED", 0) + st.outcomes.get("BUFFERED", 0)
    rejected = st.outcomes.get("STALE_REJECTED", 0)
    heartbeats = int(cs.alive_seconds / cfg.heartbeat_interval_s)
    sim = {
        "engine": r.engine,
        "profile": cfg.profile,
        "shaper": cfg.transport.shaper,
        "ps_egress": "shared" if cfg.transport.shared_ps_egress else "per-worker",
        "virtual_seconds": r.virtual_s,
        "round_time_s": _stats(r.round_times),
        "updates_per_round": _stats(np.array(st.updates_per_version, dtype=float)),
        "timed_out_rounds": st.timed_out_rounds,
        "push_outcomes": outcomes,
        "acceptance_rate": applied / (applied + rejected) if applied + rejected else None,
        "staleness_applied": _counter_stats(dict(st.staleness_applied)),
        "staleness_rejected": _counter_stats(dict(st.staleness_rejected)),
        "step_time_mean_s": st.step_time_sum_s / st.steps if st.steps else None,
        "compute_utilisation": st.compute_s / (r.virtual_s * cfg.workers) if r.virtual_s > 0 else None,
        "crashes": cs.crashes,
        "rejoins": cs.rejoins,
        "joins": cs.joins,
        "heartbeat_stalls": cs.stalls,
        "false_suspicions": cs.false_suspicions,
        "declared_dead": int(r.controller_counters.get("worker_deaths", 0)),
        "detection_latency_s": _stats(np.array(cs.detection_latency_s)),
        "detector_ticks": cs.ticks,
        "alive_at_end": r.alive_at_end,
        "pulls": st.pulls,
        "pushes_sent": st.pushes_sent,
        "pull_bytes_each": r.sizes.pull_bytes if r.sizes else None,
        "push_bytes_each": r.sizes.push_bytes if r.sizes else None,
        "params": r.sizes.params if r.sizes else None,
        "heartbeats": heartbeats,
        "control_bytes": heartbeats * cfg.payload.control_bytes,
        "link": r.link,
        "physics_bound": physics_bound(r),
        "availability": availability_summary(cfg, st, cs),  # churn: goodput, lost updates, short rounds
        "events": r.events,
        "wall_seconds": r.wall_s,
        "seed": cfg.seed,
    }
    trained = r.trained
    sim["numerics"] = "real" if trained is not None else "free"
    strategy: dict[str, Any] = {
        "strategy": cfg.mode,
        "codec": cfg.payload.codec,
        "aggregation": "mean",
        "attack": None,
        "wire_bytes": {
            cfg.strategy.update_kind: st.bytes_sent,
            "params": st.bytes_received,
        },
        "dp": {"enabled": False},
    }
    if trained is not None:  # what really ran: rule, attack, DP, and the PS's own byte counters
        strategy = trained.strategy
    return json_safe(
        {
            "run_id": run_id,
            "run_dir": run_dir,
            "initial_loss": trained.initial_loss if trained is not None else None,
            "final_loss": trained.final_loss if trained is not None else None,
            "loss_floor": trained.loss_floor if trained is not None else None,
            "steps": r.version,
            "workers": cfg.workers,
            "bytes_sent": st.bytes_sent,
            "bytes_received": st.bytes_received,
            "wall_seconds": r.virtual_s,
            "mode": cfg.mode,
            "transport": "sim",
            "model": cfg.model.name,
            "job_state": r.outcome,
            "dead_workers": sorted(set(cs.declared_dead)),
            "reassignments": int(r.controller_counters.get("reassignments", 0)),
            # Same meaning as a real run's: the profile the (virtual) links had, and which shaper's behaviour.
            "profile": cfg.profile if cfg.profile not in (None, "", UNSHAPED) else None,
            "shaping": f"simulated-{cfg.transport.shaper}",
            "strategy": strategy,
            "links": r.links,
            "links_out_of_tolerance": [],  # virtual links keep their timing exactly: no busy host to drift on
            # As a real run's summary: the churn block when an availability trace drove the workers.
            "availability": sim["availability"] if cfg.availability is not None else {},
            # As a real run's summary: supervised restarts of the PS and the controller (the simulator has none).
            "restarts": {},
            "ps_shards": 1,  # the simulated PS is one server (sharding changes no arithmetic, core.sharding)
            "simulation": sim,
        }
    )


def json_safe(x: Any) -> Any:
    """Infinite rates (unshaped links) and NaN become null: JSON has no spelling for them."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
