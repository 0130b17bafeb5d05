"""buffered_async (FedBuff): a version every K accepted updates, staleness-weighted, bounded, with a timeout.

Counted through the PS's own job object (`ParameterStore` → `JobState`), as both transports reach it; the
simulator (free and real numerics) runs the same rule. Convergence against sync is in
`tests/integration/test_buffered_async_convergence.py`."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from dist_llm_train.config import parse_config
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.strategies import BufferedAsync, BufferedAsyncConfig, build_strategy
from dist_llm_train.core.strategies.buffered_async import staleness_weights
from dist_llm_train.core.types import PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.transport import wire
from dist_llm_train.sim.config import SimConfig, SimConfigError, build_sim_config
from dist_llm_train.sim.runner import simulate

D = 4
LAYOUT = [TensorSpec("w", (D,), 0)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(clock: Clock | None = None, aggregation: str = "mean", **options: object) -> ParameterStore:
    """A buffered_async job on plain SGD with lr 1, so a version moves the parameters by minus its update."""
    store = ParameterStore(clock=clock or Clock())
    max_staleness = int(options.pop("max_staleness", 5))  # type: ignore[call-overload]
    timeout = float(options.pop("straggler_timeout_s", 30.0))  # type: ignore[arg-type]
    spec_wire = WireJobSpec(
        "j",
        mode="buffered_async",
        max_staleness=max_staleness,
        straggler_timeout_s=timeout,
        optimizer="sgd",
        learning_rate=1.0,
        momentum=0.0,
        aggregation=aggregation,
        total_steps=1000,
        options={k: str(v) for k, v in options.items()},
    )
    spec = wire.spec_from_dict(dataclasses.asdict(spec_wire))  # parsed where a transport parses it
    store.init_job(spec, LAYOUT, np.zeros(D, np.float32), [])
    return store


def push(store: ParameterStore, worker: str, step: int, base: int, value: float | np.ndarray) -> PushOutcome:
    vec = np.broadcast_to(np.asarray(value, np.float32), (D,)).astype(np.float32)
    header = PushHeader("j", worker, step, base, "none", msgpack.packb({}), vec.nbytes, 1, 0.0, "gradient")
    return store.push(header, vec.tobytes()).outcome


def test_a_version_is_published_every_k_accepted_updates() -> None:
    store = make(buffer_size=3, max_staleness=1)
    job = store.job_state("j")
    outcomes = []
    for step in range(9):
        worker = f"w{step % 2}"  # two workers fill buffers of three: a worker may hold several slots
        outcomes.append(push(store, worker, step, job.version, 1.0))
        assert job.version == (step + 1) // 3
        assert job.counters["updates_aggregated"] == 3 * job.version
        assert job.round_size() == (step + 1) % 3
    assert outcomes == [PushOutcome.BUFFERED, PushOutcome.BUFFERED, PushOutcome.APPLIED] * 3
    # A refused update is not accepted, so it does not count towards K.
    assert push(store, "w0", 100, 0, 1.0) is PushOutcome.STALE_REJECTED
    assert job.round_size() == 0 and job.version == 3
    assert job.counters["rounds_closed"] == 3 and job.counters.get("rounds_timed_out", 0) == 0


def test_staleness_weights_are_fedbuffs_inverse_sqrt_normalised() -> None:
    w = staleness_weights([0, 3, 8], "inverse_sqrt")
    a = np.array([1.0, 1 / 2, 1 / 3])
    np.testing.assert_allclose(w, a / a.sum())
    np.testing.assert_allclose(staleness_weights([0, 1], "inverse"), [2 / 3, 1 / 3])
    np.testing.assert_allclose(staleness_weights([0, 7], "none"), [0.5, 0.5])
    with pytest.raises(ValueError, match="at least one update"):
        staleness_weights([], "inverse_sqrt")


def test_a_buffer_applies_the_weighted_mean_scaled_by_the_server_lr() -> None:
    # Zero updates, then unit ones: exact weights, so the PS's per-update bound (10x the median of the zeros) is off.
    store = make(buffer_size=2, server_lr=0.5, update_bound='{"enabled": false}')
    job = store.job_state("j")
    for step in range(6):  # three versions of zero updates: the parameters stay at 0
        push(store, f"w{step}", step, job.version, 0.0)
    assert job.version == 3 and not job.params.any()
    # Staleness 0 and 3: weights 1 and 1/2, normalised to 2/3 and 1/3.
    assert push(store, "a", 10, 3, 1.0) is PushOutcome.BUFFERED
    assert push(store, "b", 11, 0, 4.0) is PushOutcome.APPLIED
    expected = -0.5 * (2 / 3 * 1.0 + 1 / 3 * 4.0)
    np.testing.assert_allclose(job.params, np.full(D, expected, np.float32), rtol=1e-6)


def test_updates_staler_than_the_bound_are_rejected_and_change_nothing() -> None:
    store = make(buffer_size=2, max_staleness=1)
    job = store.job_state("j")
    for step in range(4):
        push(store, "fast", step, job.version, 1.0)
    assert job.version == 2
    params = job.params.copy()
    assert push(store, "slow", 0, 1, 1.0) is PushOutcome.BUFFERED  # staleness 1: at the bound, taken
    assert push(store, "late", 0, 0, 1.0) is PushOutcome.STALE_REJECTED  # staleness 2
    assert job.round_size() == 1 and job.version == 2
    np.testing.assert_array_equal(job.params, params)
    stats = {w.worker_id: w for w in store.stats("j")[0].workers}
    assert (stats["late"].rejected, stats["late"].accepted, stats["late"].staleness_bound) == (1, 0, 1)
    assert job.counters["pushes_stale_rejected"] == 1


def test_a_buffer_that_does_not_fill_is_published_at_its_timeout() -> None:
    clock = Clock()
    store = make(clock, buffer_size=4, straggler_timeout_s=10.0)
    job = store.job_state("j")
    assert store.next_deadline() is None  # nothing buffered, nothing to wait for
    clock.t = 5.0
    push(store, "only", 0, 0, 2.0)
    clock.t = 8.0
    push(store, "only", 1, 0, 2.0)
    assert store.next_deadline() == 15.0  # the first update's arrival + the timeout
    clock.t = 14.9
    assert store.expire_rounds() == 0 and job.version == 0
    clock.t = 15.0
    assert store.expire_rounds() == 1
    assert job.version == 1 and job.round_size() == 0 and store.next_deadline() is None
    assert job.counters["updates_aggregated"] == 2 and job.counters["rounds_timed_out"] == 1
    np.testing.assert_allclose(job.params, np.full(D, -2.0, np.float32))


def test_robust_aggregation_combines_a_buffer() -> None:
    store = make(aggregation="median", buffer_size=3)
    job = store.job_state("j")
    for step, value in enumerate([1.0, 2.0, 1000.0]):  # one outlier in a buffer of three
        push(store, f"w{step}", step, 0, value)
    assert job.version == 1
    np.testing.assert_allclose(job.params, np.full(D, -2.0, np.float32))


def test_config_validation_names_the_keys() -> None:
    for bad in ({"buffer_size": 0}, {"server_lr": 0}, {"max_staleness": -1}, {"staleness_weighting": "linear"}):
        with pytest.raises(ValidationError):
            BufferedAsyncConfig(**bad)  # type: ignore[arg-type]
    base = {"num_workers": 7, "steps": 100}
    with pytest.raises(ValueError, match=r"krum.*n=3.*strategy.buffer_size"):
        parse_config({"training": {**base, "strategy": {"name": "buffered_async", "buffer_size": 3},
                                   "aggregation": {"rule": "krum", "f": 1}}})
    ok = parse_config({"training": {**base, "strategy": {"name": "buffered_async", "buffer_size": 5},
                                    "aggregation": {"rule": "krum", "f": 1}}})
    assert ok.training.job_spec("j").aggregation == "krum"
    with pytest.raises(ValueError, match="central DP.*dp.mode: local"):
        parse_config({"training": {**base, "strategy": "buffered_async",
                                   "dp": {"noise_multiplier": 1.0, "mode": "central"}}})
    parse_config({"training": {**base, "strategy": "buffered_async", "dp": {"noise_multiplier": 1.0}}})  # local
    with pytest.raises(PSError, match="buffer_size"):  # the PS re-checks what reaches it
        make(buffer_size=0)


def test_the_budget_counts_applied_updates_like_async() -> None:
    strategy = build_strategy({"name": "buffered_async", "buffer_size": 4})
    assert isinstance(strategy, BufferedAsync)
    assert [strategy.versions(s) for s in (1, 4, 5, 800)] == [1, 1, 2, 200]
    assert strategy.steps_for_versions(200) == 800
    # Sync at steps S with N workers applies N*S updates; buffered async at steps N*S applies as many.
    sync = parse_config({"training": {"num_workers": 4, "steps": 200}}).training
    buffered = parse_config({"training": {"num_workers": 4, "steps": 800, "strategy": "buffered_async"}}).training
    assert sync.versions * 4 == buffered.versions * strategy.buffer_size == 800
    assert buffered.describe(0)["strategy_params"]["buffer_size"] == 4
    spec = buffered.job_spec("j")
    assert JobSpec.from_wire(spec.to_wire()) == spec  # its fields travel as options, no proto change


def test_the_simulator_carries_the_strategy_fields_and_runs_the_rule() -> None:
    cfg = parse_config({"training": {"num_workers": 3, "steps": 40,
                                     "strategy": {"name": "buffered_async", "buffer_size": 4, "server_lr": 0.5}}})
    sim = SimConfig.from_config(cfg, profile="none")
    assert sim.rounds == 10 and sim.strategy_options == {
        "buffer_size": 4, "staleness_weighting": "inverse_sqrt", "server_lr": 0.5
    }
    result = simulate(sim)
    assert result.outcome == "completed" and result.version == 10
    assert result.stats.updates_per_version == [4] * 10
    with pytest.raises(SimConfigError, match="buffer_size"):
        build_sim_config({"mode": "sync", "strategy_options": {"buffer_size": 4}})
    with pytest.raises(SimConfigError, match="simulation fields of their own"):
        build_sim_config({"mode": "buffered_async", "strategy_options": {"max_staleness": 4}})


def test_the_simulated_ps_publishes_a_short_buffer_at_its_timeout() -> None:
    """One worker at ~1 s per step and K = 4 with a 1.5 s timeout: every buffer is published short."""
    sim = build_sim_config({
        "workers": 1, "rounds": 5, "mode": "buffered_async", "profile": "none", "straggler_timeout_s": 1.5,
        "strategy_options": {"buffer_size": 4}, "compute": {"kind": "constant", "mean_s": 1.0},
    })
    result = simulate(sim)
    assert result.outcome == "completed" and result.version == 5
    assert result.stats.timed_out_rounds == 5
    assert result.stats.updates_per_version == [2] * 5  # two 1 s steps fit in a 1.5 s buffer
    gaps = np.diff(result.stats.publish_times)
    assert all(math.isclose(g, gaps[0]) for g in gaps)
