"""The simulator's behaviour: round physics, staleness, failure detection, churn, determinism, and the two
engines agreeing with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dist_llm_train.sim.config import SimConfig, build_sim_config
from dist_llm_train.sim.runner import SimResult, simulate, summary

FLAT = {
    "name": "flat",
    "figures": "one_way",
    "link": {"delay_ms": 5, "rate_mbit": 100},
    "nodes": {"$last_worker": {"compute_slowdown": 4}},
}


def profile_file(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(**kw: Any) -> SimResult:
    return simulate(build_sim_config(kw))


# -- round physics -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["vectorised", "exact"])
@pytest.mark.parametrize("shared", [False, True])
def test_sync_round_is_the_slowest_member_plus_aggregation(tmp_path, engine, shared):
    """Constant compute, no jitter or loss: after the first round every round lasts exactly the slowest
    member's pull + compute + push (its pull last in the PS's queue when the egress is shared) + the
    aggregation time."""
    n, k, d, rate = 5, 0.1, 0.005, 100e6
    cfg = build_sim_config(
        {
            "workers": n,
            "rounds": 12,
            "mode": "sync",
            "engine": engine,
            "profile": profile_file(tmp_path, FLAT),
            "compute": {"kind": "constant", "mean_s": k},
            "payload": {"params": 250_000},
            "aggregation_base_s": 0.05,
            "aggregation_per_update_s": 0.001,
            "transport": {"shared_ps_egress": shared},
        }
    )
    r = simulate(cfg)
    assert r.outcome == "completed" and r.version == 12 and r.sizes is not None
    pull = 8 * r.sizes.pull_bytes / rate
    push = 8 * r.sizes.push_bytes / rate
    queue = n * pull if shared else pull
    expected = queue + d + 4 * k + push + d + 0.05 + 0.001 * n
    np.testing.assert_allclose(r.round_times[1:], expected, rtol=1e-9)
    assert r.stats.updates_per_version == [n] * 12
    assert r.stats.outcomes["APPLIED"] == 12 and r.stats.outcomes["BUFFERED"] == 12 * (n - 1)
    bound = summary(r)["simulation"]["physics_bound"]
    assert bound["measured_over_bound"] == pytest.approx(r.round_times.mean() / bound["shared_s"])


def test_async_rejects_the_slow_workers_stale_updates(tmp_path):
    slow = {**FLAT, "name": "slow", "nodes": {"$last_worker": {"compute_slowdown": 20}}}
    r = run(
        workers=4,
        rounds=300,
        mode="async",
        profile=profile_file(tmp_path, slow),
        max_staleness=2,
        compute={"kind": "constant", "mean_s": 0.05},
        payload={"params": 1000},
    )
    rejected, applied = r.stats.staleness_rejected, r.stats.staleness_applied
    assert r.outcome == "completed" and r.version == 300
    assert sum(rejected.values()) > 0 and min(rejected) > 2
    assert max(applied) <= 2 and sum(applied.values()) == 300
    even = run(
        workers=4,
        rounds=300,
        mode="async",
        profile=profile_file(tmp_path, {**FLAT, "nodes": {}}),
        max_staleness=8,
        compute={"kind": "constant", "mean_s": 0.05},
        payload={"params": 1000},
    )
    assert sum(even.stats.staleness_rejected.values()) == 0
    assert summary(r)["simulation"]["acceptance_rate"] < 1.0 == summary(even)["simulation"]["acceptance_rate"]


@pytest.mark.parametrize("engine", ["vectorised", "exact"])
def test_diloco_round_holds_local_steps_and_pushes_pseudo_gradients(tmp_path, engine):
    h, k, d = 8, 0.05, 0.005
    r = run(
        workers=3,
        rounds=6,
        mode="diloco",
        local_steps=h,
        engine=engine,
        profile=profile_file(tmp_path, FLAT),
        compute={"kind": "constant", "mean_s": k},
        payload={"params": 250_000},
        aggregation_base_s=0.05,
        transport={"shared_ps_egress": False},
    )
    assert r.outcome == "completed" and r.stats.updates_per_version == [3] * 6
    assert set(r.stats.outcomes) == {"APPLIED", "BUFFERED"}  # pseudo-gradients taken, nothing refused
    assert r.sizes is not None
    pull, push = 8 * r.sizes.pull_bytes / 100e6, 8 * r.sizes.push_bytes / 100e6
    np.testing.assert_allclose(r.round_times[1:], pull + d + 4 * h * k + push + d + 0.05, rtol=1e-9)


def test_adaptive_bounds_let_the_slow_worker_in(tmp_path):
    slow = profile_file(
        tmp_path, {**FLAT, "name": "slow", "nodes": {"$last_worker": {"compute_slowdown": 20}}}
    )
    common = {
        "workers": 4,
        "rounds": 300,
        "profile": slow,
        "max_staleness": 4,
        "payload": {"params": 1000},
        "compute": {"kind": "constant", "mean_s": 0.05},
    }
    fixed = run(mode="async", **common)
    adaptive = run(mode="adaptive", adaptive_min_staleness=4, adaptive_multiplier=40, **common)
    assert sum(fixed.stats.staleness_rejected.values()) > 0 and max(fixed.stats.staleness_applied) <= 4
    assert sum(adaptive.stats.staleness_rejected.values()) < sum(fixed.stats.staleness_rejected.values())
    assert max(adaptive.stats.staleness_applied) > 4  # the slow worker's stale updates are taken


# -- failures and churn ----------------------------------------------------------------------------
@pytest.mark.parametrize(("interval", "miss_limit"), [(1.0, 3), (0.5, 5), (2.0, 1)])
def test_failure_detection_takes_interval_times_miss_limit_in_virtual_time(interval, miss_limit):
    r = run(
        workers=3,
        rounds=400,
        profile=None,
        heartbeat_miss_limit=miss_limit,
        simulation={"heartbeat_interval": interval},
        compute={"kind": "constant", "mean_s": 0.05},
        payload={"params": 1000},
        failures={"kills": [{"worker": 1, "at_s": 10.3}]},
    )
    cs = r.control
    assert cs.crashes == 1 and len(cs.detection_latency_s) == 1 and cs.false_suspicions == 0
    declared = cs.death_times[1] + cs.detection_latency_s[0]
    silence = declared - cs.last_heartbeat[1]
    timeout = interval * miss_limit
    assert timeout < silence <= timeout + interval / 2 + 1e-9  # first detector tick after the timeout
    assert cs.last_heartbeat[1] <= 10.3 < cs.last_heartbeat[1] + interval
    assert summary(r)["dead_workers"] == ["worker-1"]


def test_churn_reassigns_tasks_through_the_real_scheduler(monkeypatch):
    from dist_llm_train.controller.schedulers import priority

    calls: list[tuple[int, list[str], list[tuple[str, str]]]] = []
    original = priority.PriorityScheduler.assign

    def spy(self, pending, live, telemetry):
        out = original(self, pending, live, telemetry)
        names = {w.worker_id: w.name for w in live}
        calls.append((len(pending), sorted(w.name for w in live), [(t, names[w]) for t, w in out]))
        return out

    monkeypatch.setattr(priority.PriorityScheduler, "assign", spy)
    r = run(
        workers=6,
        rounds=300,
        profile="good",
        compute={"kind": "constant", "mean_s": 0.05},
        payload={"params": 1000},
        churn={"join_rate_per_s": 20.0, "max_joins": 1},
        failures={"kills": [{"worker": 1, "at_s": 4.0}, {"worker": 4, "at_s": 6.0}]},
    )
    assert r.outcome == "completed" and r.control.joins == 1
    reassign = [c for c in calls if c[0] == 1]  # one freed task each time, after the initial placement
    assert len(reassign) == 2
    first_pass, second_pass = reassign
    assert "worker-6" in first_pass[1] and "worker-1" not in first_pass[1]
    assert first_pass[2][0][1] == "worker-6"  # the idle newcomer holds fewest tasks: the load rule picks it
    assert second_pass[2][0][1] not in ("worker-1", "worker-4")
    assert summary(r)["reassignments"] == 2
    members = r.stats.members_per_version
    assert members[0] == 6 and members[-1] == 5  # 4 survivors + the newcomer


def test_vectorised_engine_equals_the_per_event_engine():
    """Same seed, failure-heavy sync run: crashes, rejoins, joins, a straggler and straggler timeouts."""
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
    }
    vec, ex = run(engine="vectorised", **base), run(engine="exact", **base)
    assert vec.engine == "vectorised" and ex.engine == "exact"
    assert vec.control.crashes > 3 and vec.stats.timed_out_rounds > 0
    np.testing.assert_allclose(vec.stats.publish_times, ex.stats.publish_times, rtol=1e-12)
    assert vec.stats.updates_per_version == ex.stats.updates_per_version
    assert vec.stats.members_per_version == ex.stats.members_per_version
    assert vec.stats.outcomes == ex.stats.outcomes
    assert (vec.stats.bytes_sent, vec.stats.bytes_received) == (ex.stats.bytes_sent, ex.stats.bytes_received)
    assert summary(vec)["reassignments"] == summary(ex)["reassignments"] > 0


def test_losing_every_worker_stalls_the_job_instead_of_spinning():
    kills = [{"worker": i, "at_s": 1.0 + i} for i in range(3)]
    for mode in ("sync", "async"):
        r = run(
            workers=3,
            rounds=10_000,
            mode=mode,
            profile="none",
            payload={"params": 1000},
            compute={"kind": "constant", "mean_s": 0.05},
            failures={"kills": kills},
        )
        assert r.outcome == "stalled" and 0 < r.version < 10_000 and r.alive_at_end == 0
        assert summary(r)["dead_workers"] == ["worker-0", "worker-1", "worker-2"]


# -- determinism and the seed's control-plane mode ---------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_same_seed_same_result_other_seed_other_result(mode):
    kw = {
        "workers": 12,
        "rounds": 40,
        "mode": mode,
        "profile": "degraded",
        "failures": {"mtbf_s": 30.0, "rejoin_after_s": 2.0},
        "payload": {"params": 20_000},
    }

    def stripped(seed: int) -> dict[str, Any]:
        s = summary(run(seed=seed, **kw))
        s["simulation"].pop("wall_seconds")
        return s

    assert stripped(7) == stripped(7)
    assert stripped(7) != stripped(8)


def test_rounds_zero_runs_the_seed_control_plane_cycles():
    cfg = build_sim_config(
        {
            "workers": 4,
            "rounds": 0,
            "failures": {"kills": [{"worker": 0, "at_s": 1.0}]},
            "simulation": {
                "heartbeat_cycles": 5,
                "heartbeat_interval": 2.0,
                "scheduling_cycles": 3,
                "scheduling_interval": 2.0,
            },
        }
    )
    r = simulate(cfg)
    assert r.virtual_s == pytest.approx(10.0)  # max(5 × 2 s, 3 × 2 s)
    assert r.version == 0 and r.control.crashes == 1
    assert summary(r)["dead_workers"] == ["worker-0"]  # 2 s × 3 misses after its last heartbeat, before 10 s


def test_default_config_matches_the_run_config():
    from dist_llm_train.config import Config, parse_config

    cfg: Config = parse_config(
        {
            "training": {"num_workers": 7, "steps": 9, "mode": "async", "max_staleness": 3},
            "network": {"profile": "satellite"},
            "controller": {"scheduler": "capability"},
        }
    )
    s = SimConfig.from_config(cfg, **{"compute.mean_s": 0.5})
    assert (s.workers, s.rounds, s.mode, s.max_staleness, s.profile, s.scheduler) == (
        7,
        9,
        "async",
        3,
        "satellite",
        "capability",
    )
    assert s.compute.mean_s == 0.5
    r = simulate(s)
    assert r.outcome == "completed" and r.version == 9


def test_strategy_and_codec_keys_of_the_run_config_reach_the_simulation():
    from dist_llm_train.config import parse_config

    diloco = SimConfig.from_config(
        parse_config(
            {
                "training": {
                    "strategy": "diloco",
                    "diloco_local_steps": 7,
                    "compression": "int8",
                    "int8_chunk": 256,
                }
            }
        )
    )
    assert (diloco.mode, diloco.local_steps, diloco.steps_per_push) == ("diloco", 7, 7)
    assert diloco.payload.codec_params == {"chunk": 256}
    seed_keys = SimConfig.from_config(
        parse_config(
            {
                "training": {"mode": "async"},
                "controller": {"adaptive_staleness": True, "min_staleness": 3, "max_staleness_multiplier": 4},
            }
        )
    )
    assert (seed_keys.mode, seed_keys.adaptive_min_staleness, seed_keys.adaptive_multiplier) == (
        "adaptive",
        3,
        4,
    )


def test_async_on_a_sync_config_keeps_the_async_default_bound():
    """A sync run config has no staleness bound; simulating it as async must not read that as bound 0."""
    from dist_llm_train.config import Config
    from dist_llm_train.core.strategies import parse_strategy_config
    from dist_llm_train.sim.config import SimConfig

    sim = SimConfig.from_config(Config(), mode="async")
    assert sim.max_staleness == parse_strategy_config({"name": "async"}).max_staleness  # type: ignore[union-attr]
    cfg = Config()
    cfg.training.strategy = parse_strategy_config({"name": "async", "max_staleness": 2})
    assert SimConfig.from_config(cfg).max_staleness == 2
