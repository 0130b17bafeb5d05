"""Churn of transient workers in the simulator: an availability trace's joins and leaves happen at exactly
their virtual times, in both engines, and the summary reports goodput, lost updates and short rounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.sim import adapters
from dist_llm_train.sim.config import SimConfig, SimConfigError, build_sim_config
from dist_llm_train.sim.runner import SimResult, simulate, summary

# worker 1: there at 0, leaves at 3.25, back at 9.5 for good; worker 2: absent until 2.0, leaves at 12.75;
# workers 0 and 3 have no rows: there the whole run.
SESSIONS = [
    {"worker": 1, "join_s": 0, "leave_s": 3.25},
    {"worker": "worker-1", "join_s": 9.5},
    {"worker": 2, "join_s": 2.0, "leave_s": 12.75},
]
EXPECTED_LOG = [(2.0, 2, "join"), (3.25, 1, "leave"), (9.5, 1, "join"), (12.75, 2, "leave")]


def _run(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[SimResult, list[tuple[float, str]]]:
    """Simulate, recording when the real controller saw each registration (virtual time, worker name)."""
    registered: list[tuple[float, str]] = []
    original = adapters.SimController.register

    def spy(self: adapters.SimController, name: str, *args: Any) -> str:
        registered.append((self.svc.clock(), name))
        return original(self, name, *args)

    monkeypatch.setattr(adapters.SimController, "register", spy)
    base: dict[str, Any] = {
        "workers": 4,
        "rounds": 150,
        "profile": "good",
        "seed": 2,
        "compute": {"kind": "lognormal", "mean_s": 0.1, "sigma": 0.3},
        "payload": {"params": 20_000},
        "availability": {"sessions": SESSIONS},
    }
    return simulate(build_sim_config({**base, **kw}), telemetry=True), registered


def _arrivals(r: SimResult, worker: str) -> np.ndarray:
    assert r.sizes is not None and r.telemetry is not None
    rows = r.telemetry.rows(r.sizes, lambda s: f"worker-{s}")
    return np.array([float(str(row["wall_time"])) for row in rows if row["worker"] == worker])


@pytest.mark.parametrize(("mode", "engine"), [("sync", "vectorised"), ("sync", "exact"), ("async", "exact")])
def test_joins_and_leaves_happen_at_exactly_the_listed_virtual_times(
    monkeypatch: pytest.MonkeyPatch, mode: str, engine: str
) -> None:
    r, registered = _run(monkeypatch, mode=mode, engine=engine, rounds=150 if mode == "sync" else 1500)
    assert r.outcome == "completed" and r.engine == engine
    assert r.control.availability_log == EXPECTED_LOG
    # the controller saw worker-2 first at 2.0 (absent before its first session), worker-1 again at 9.5
    assert [(t, n) for t, n in registered if t > 0] == [(2.0, "worker-2"), (9.5, "worker-1")]
    assert {n for t, n in registered if t == 0} == {"worker-0", "worker-1", "worker-3"}
    # no update of a worker reaches the PS while it is away (one sent before the leave dies with it)
    w1, w2 = _arrivals(r, "worker-1"), _arrivals(r, "worker-2")
    assert w1.size and not ((w1 >= 3.25) & (w1 < 9.5)).any()
    assert w2.size and (w2 > 2.0).all() and (w2 < 12.75).all()
    # a leave is a silent stop, not a crash: the controller declares worker-1 dead after its heartbeat timeout
    cs = r.control
    assert (cs.leaves, cs.trace_joins, cs.crashes) == (2, 2, 0)
    assert "worker-1" in cs.declared_dead and cs.false_suspicions == 0
    assert 3.0 - 1.0 < cs.detection_latency_s[0] <= 3.0 + 0.5 + 1e-9  # (timeout - interval, timeout + half]
    av = summary(r)["simulation"]["availability"]
    assert av["leaves"] == 2 and av["trace_joins"] == 2 and av["trace"]["sessions"] == 3
    assert summary(r)["availability"] == av  # the real run's summary key


def test_both_engines_agree_under_a_trace_with_crashes_and_joins() -> None:
    base = {
        "workers": 8,
        "rounds": 60,
        "mode": "sync",
        "profile": "straggler",
        "seed": 3,
        "straggler_timeout_s": 1.5,
        "compute": {"kind": "lognormal", "mean_s": 0.2, "sigma": 0.5},
        "failures": {"mtbf_s": 20.0, "rejoin_after_s": 5.0, "kills": [{"worker": 2, "at_s": 3.0}]},
        "churn": {"join_rate_per_s": 0.2, "max_joins": 3},
        "availability": {"generator": {"kind": "exponential", "mean_up_s": 6, "mean_down_s": 3, "horizon_s": 300}},
    }
    vec = simulate(build_sim_config({**base, "engine": "vectorised"}))
    ex = simulate(build_sim_config({**base, "engine": "exact"}))
    assert vec.control.leaves > 20 and vec.control.crashes > 3
    np.testing.assert_allclose(vec.stats.publish_times, ex.stats.publish_times, rtol=1e-12)
    assert vec.stats.outcomes == ex.stats.outcomes
    assert vec.control.availability_log == ex.control.availability_log
    a, b = summary(vec)["simulation"]["availability"], summary(ex)["simulation"]["availability"]
    assert a["updates_lost_to_leaves"] == b["updates_lost_to_leaves"] > 0
    assert a["updates_lost_to_crashes"] == b["updates_lost_to_crashes"]
    assert a["rounds_closed_by_departure"] == b["rounds_closed_by_departure"]
    for key in ("offered_worker_s", "accepted_compute_s", "goodput", "lost_compute_s"):
        assert a[key] == pytest.approx(b[key], rel=1e-9), key


@pytest.mark.parametrize("engine", ["vectorised", "exact"])
def test_goodput_lost_update_and_short_round_of_one_leave(engine: str) -> None:
    """Perfect links, constant 0.1 s compute: worker 2 leaves for good at 5.05 s, in the middle of a step."""
    r = simulate(
        build_sim_config(
            {
                "workers": 3,
                "rounds": 100,
                "profile": "none",
                "engine": engine,
                "compute": {"kind": "constant", "mean_s": 0.1},
                "payload": {"params": 1000},
                "availability": {"sessions": [{"worker": 2, "join_s": 0, "leave_s": 5.05}]},
            }
        )
    )
    assert r.outcome == "completed"
    av = summary(r)["simulation"]["availability"]
    assert av["updates_lost_to_leaves"] == 1 and av["updates_lost_to_crashes"] == 0
    assert 0 < av["lost_compute_s"] < 0.1
    # the round worker 2 never finished waits for its detection, then closes short when it is removed
    assert av["rounds_closed_by_departure"] == 1
    assert r.stats.members_per_version[0] == 3 and r.stats.members_per_version[-1] == 2
    assert av["accepted_compute_s"] == pytest.approx(0.1 * av["updates_accepted"])
    assert av["offered_worker_s"] == pytest.approx(3 * r.virtual_s - (r.virtual_s - 5.05))
    assert av["goodput"] == pytest.approx(av["accepted_compute_s"] / av["offered_worker_s"])
    assert 0.5 < av["goodput"] < 1.0


def test_a_crash_rejoin_waits_for_the_next_session() -> None:
    """Crash recovery brings a worker back only while the trace says it is available."""
    r = simulate(
        build_sim_config(
            {
                "workers": 3,
                "rounds": 400,
                "profile": "none",
                "engine": "exact",
                "compute": {"kind": "constant", "mean_s": 0.05},
                "payload": {"params": 1000},
                "failures": {"kills": [{"worker": 1, "at_s": 1.0}], "rejoin_after_s": 10.0},
                "availability": {"sessions": [{"worker": 1, "join_s": 0, "leave_s": 5.0},
                                              {"worker": 1, "join_s": 20.0}]},
            }
        )
    )
    cs = r.control
    assert cs.crashes == 1 and cs.rejoins == 0  # the rejoin due at 11 s fell while worker 1 was away
    assert cs.leaves == 0  # it had crashed already: the leave at 5 s stopped no process
    assert cs.trace_joins == 1 and cs.availability_log == [(5.0, 1, "leave"), (20.0, 1, "join")]


def test_run_config_section_reaches_the_simulation_and_flags_replace_it(tmp_path) -> None:
    cfg = parse_config(
        {
            "training": {"num_workers": 5, "steps": 10},
            "availability": {"generator": {"kind": "preemption", "fraction": 0.4, "down_s": 5, "at_s": [2]}},
        }
    )
    s = SimConfig.from_config(cfg)
    trace = s.availability_trace()
    assert trace is not None and trace.workers == 5 and sum(e[2] == "leave" for e in trace.events()) == 2
    csv = tmp_path / "t.csv"
    csv.write_text("0,0,1\n")
    s = SimConfig.from_config(cfg, availability={"trace": str(csv)})
    trace = s.availability_trace()
    assert trace is not None and trace.to_rows() == [(0, 0.0, 1.0)]
    with pytest.raises(SimConfigError, match="availability: line 1: worker 7 does not exist"):
        csv.write_text("7,0,1\n")
        SimConfig.from_config(cfg, availability={"trace": str(csv)})


def test_everyone_away_at_first_waits_for_the_first_join() -> None:
    r = simulate(
        build_sim_config(
            {
                "workers": 2,
                "rounds": 40,
                "profile": "none",
                "compute": {"kind": "constant", "mean_s": 0.05},
                "payload": {"params": 1000},
                "availability": {"sessions": [{"worker": 0, "join_s": 4.0}, {"worker": 1, "join_s": 4.5}]},
            }
        )
    )
    assert r.outcome == "completed" and r.stats.publish_times[0] > 4.0 and r.virtual_s > 4.5
    av = summary(r)["simulation"]["availability"]
    assert av["offered_worker_s"] == pytest.approx((r.virtual_s - 4.0) + (r.virtual_s - 4.5))
    # The controller does not rebalance: the first worker took both shards, the later one finds none pending
    # and stays idle, which is what the goodput shows.
    assert set(r.stats.members_per_version) == {1}
    assert av["goodput"] == pytest.approx(av["accepted_compute_s"] / av["offered_worker_s"])
    assert av["goodput"] < 0.55
