"""PS side of the strategies: adaptive bounds, DiLoCo jobs, central DP, bytes per class, stats on the wire."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.core.aggregation import Bulyan, krum_order
from dist_llm_train.core.codecs import get_codec
from dist_llm_train.core.job import WireJobSpec
from dist_llm_train.core.strategies import WorkerLedger, build_strategy
from dist_llm_train.core.strategies.asynchronous import step_scale
from dist_llm_train.core.types import (
    PSError,
    PushHeader,
    PushOutcome,
    TensorSpec,
    WorkerStats,
)
from dist_llm_train.paramserver.job import NULL_OBSERVER, ParameterStore
from dist_llm_train.paramserver.metrics import PSMetrics
from dist_llm_train.paramserver.transport import wire

D = 8
LAYOUT = [TensorSpec("w", (D,), 0)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(
    mode: str = "sync", clock: Clock | None = None, observer: PSMetrics | None = None, **kw: object
) -> ParameterStore:
    store = ParameterStore(clock=clock or Clock(), observer=observer or NULL_OBSERVER)
    fields: dict[str, object] = {"optimizer": "sgd", "learning_rate": 1.0, "momentum": 0.0, "total_steps": 10_000}
    spec_wire = WireJobSpec("j", mode=mode, **{**fields, **kw})  # type: ignore[arg-type]
    spec = wire.spec_from_dict(dataclasses.asdict(spec_wire))  # parsed where a transport parses it
    store.init_job(spec, LAYOUT, np.zeros(D, np.float32), [])
    return store


def push(
    store: ParameterStore,
    worker: str,
    step: int,
    base: int,
    vec: np.ndarray,
    kind: str = "gradient",
    codec: str = "none",
) -> PushOutcome:
    enc = get_codec(codec, ratio=0.25, index="delta").encode(vec)
    header = PushHeader(
        "j", worker, step, base, codec, msgpack.packb(enc.meta), len(enc.payload), 1, 0.0, kind
    )
    return store.push(header, enc.payload).outcome


def test_update_kind_must_match_the_strategy() -> None:
    diloco = make("diloco")
    with pytest.raises(PSError, match="pseudo_gradient"):
        push(diloco, "a", 0, 0, np.ones(D, np.float32))
    stats = diloco.stats("j")[0]
    assert stats.version == 0 and stats.counters["rejected_invalid_argument"] == 1  # refused, changed nothing
    assert push(diloco, "a", 1, 0, np.ones(D, np.float32), kind="pseudo_gradient") is PushOutcome.APPLIED
    with pytest.raises(PSError, match="takes gradient updates"):
        push(make("sync"), "a", 0, 0, np.ones(D, np.float32), kind="pseudo_gradient")


def test_unknown_or_bad_options_are_refused_at_init() -> None:
    for options in ({"staleness_scalng": "inverse"}, {"min_staleness": "-1"}, {"dp_noise_multiplier": "0"}):
        with pytest.raises(PSError, match="options"):
            make("async", options=options)
    with pytest.raises(PSError, match="central DP"):
        make("sync", aggregation="median", options={"dp_noise_multiplier": "1", "dp_clip": "1"})


def test_adaptive_bounds_follow_measured_speed() -> None:
    """Three workers push every second, one every four: the slow one gets the looser bound and is accepted."""
    clock = Clock()
    store = make(
        "adaptive", clock, max_staleness=2, options={"min_staleness": "2", "max_staleness_multiplier": "10"}
    )
    period = {"f0": 1.0, "f1": 1.0, "f2": 1.0, "slow": 4.0}
    next_at = dict(period)
    base = dict.fromkeys(period, 0)
    steps = dict.fromkeys(period, 0)
    outcomes: dict[str, list[PushOutcome]] = {w: [] for w in period}
    for _ in range(80):  # bounded event loop
        worker = min(next_at, key=lambda w: (next_at[w], w))
        clock.t = next_at[worker]
        outcomes[worker].append(
            push(store, worker, steps[worker], base[worker], np.full(D, 0.01, np.float32))
        )
        steps[worker] += 1
        base[worker] = store.stats("j")[0].version
        next_at[worker] += period[worker]
    stats = {w.worker_id: w for w in store.stats("j")[0].workers}
    assert stats["slow"].staleness_bound > stats["f0"].staleness_bound >= 2
    assert stats["slow"].push_interval_s == pytest.approx(4.0)
    assert stats["slow"].mean_staleness > 3 * stats["f0"].mean_staleness
    assert stats["slow"].acceptance_rate >= 0.75  # a static bound of 2 would refuse every one of its updates
    static = build_strategy({"name": "async", "max_staleness": 2})
    assert static.staleness_bound("slow", WorkerLedger(), None) == 2


def test_async_bound_rejects_and_counts_per_worker() -> None:
    store = make("async", max_staleness=1)
    for step in range(3):
        push(store, "fast", step, step, np.ones(D, np.float32))
    assert push(store, "slow", 0, 0, np.ones(D, np.float32)) is PushOutcome.STALE_REJECTED
    slow = next(w for w in store.stats("j")[0].workers if w.worker_id == "slow")
    assert (slow.pushes, slow.accepted, slow.rejected, slow.acceptance_rate) == (1, 0, 1, 0.0)


def test_step_scaling_options() -> None:
    assert step_scale("none", 3) == 1.0
    assert step_scale("inverse", 3) == pytest.approx(0.25)
    assert step_scale("inverse_sqrt", 3) == pytest.approx(0.5)
    store = make("async", options={"staleness_scaling": "inverse_sqrt"})
    push(store, "a", 0, 0, np.ones(D, np.float32))
    push(store, "b", 0, 0, np.ones(D, np.float32))  # staleness 1: lr * 1/sqrt(2)
    params = store.pull("j", "x").params
    assert params == pytest.approx(np.full(D, -1.0 - 1 / np.sqrt(2)), rel=1e-6)


def test_wire_bytes_per_class_and_metrics() -> None:
    metrics = PSMetrics()
    store = make("sync", observer=metrics)
    store.set_members("j", ["a", "b"])
    push(store, "a", 0, 0, np.arange(D, dtype=np.float32), codec="topk")
    push(store, "b", 0, 0, np.arange(D, dtype=np.float32), codec="none")
    store.pull("j", "a")
    c = store.stats("j")[0].counters
    assert (
        c["bytes_received_gradient"] == (2 + 4) * 2 + 4 * D
    )  # topk keeps 2 of 8: uint16 gap + f32 value each
    assert c["raw_bytes_gradient"] == 2 * 4 * D
    assert c["params_bytes_sent"] == 4 * D
    reg = metrics.registry
    assert reg.get_sample_value("dlt_ps_update_bytes_total", {"kind": "gradient", "codec": "topk"}) == 12
    assert (
        reg.get_sample_value("dlt_ps_worker_pushes_total", {"job": "j", "worker": "a", "outcome": "BUFFERED"})
        == 1
    )
    # a round takes only updates computed on the current version: the bound sync workers are held to is 0
    assert reg.get_sample_value("dlt_ps_staleness_bound", {"job": "j", "worker": "b"}) == 0


def test_central_dp_clips_every_update_and_adds_noise_to_the_sum() -> None:
    store = make("sync", options={"dp_noise_multiplier": "1e-9", "dp_clip": "1.0", "dp_seed": "3"})
    store.set_members("j", ["a", "b"])
    push(store, "a", 0, 0, np.full(D, 10.0, np.float32))  # norm 28.3: clipped to 1
    push(store, "b", 0, 0, np.zeros(D, np.float32))
    params = store.pull("j", "x").params
    assert np.linalg.norm(params) == pytest.approx(0.5, rel=1e-4)  # -(clip(a) + 0) / 2, noise negligible
    c = store.stats("j")[0].counters
    assert (c["dp_releases"], c["dp_clipped_updates"]) == (1, 1)
    # Seeded: with OS entropy the std of 8 draws falls outside the band about once in 1,700 runs.
    noisy = make("sync", options={"dp_noise_multiplier": "2.0", "dp_clip": "1.0", "dp_seed": "11"})
    noisy.set_members("j", ["a"])
    push(noisy, "a", 0, 0, np.zeros(D, np.float32))
    assert 0.5 < float(np.std(noisy.pull("j", "x").params)) < 4.0  # sigma = z * C = 2 on a sum of one


def test_worker_stats_survive_both_wire_formats() -> None:
    store = make("async")
    push(store, "a", 0, 0, np.ones(D, np.float32))
    stats = store.stats("j")[0]
    assert stats.workers and isinstance(stats.workers[0], WorkerStats)
    assert wire.stats_from_pb(wire.stats_to_pb(stats)) == stats
    assert wire.stats_from_dict(msgpack.unpackb(msgpack.packb(wire.stats_to_dict(stats)))) == stats


def _reference_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    """The textbook loop (recompute Krum on the shrinking set each time): the optimised rule must match it."""
    n = x.shape[0]
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        pick = remaining[krum_order(x[remaining], f)[0]]
        selected.append(pick)
        remaining.remove(pick)
    s = x[selected].astype(np.float64)
    beta = n - 4 * f
    med = np.median(s, axis=0)
    closest = np.lexsort((s, np.abs(s - med)), axis=0)[:beta]
    return np.take_along_axis(s, closest, axis=0).mean(axis=0)


@given(
    seed=st.integers(0, 2**31),
    f=st.integers(0, 2),
    extra=st.integers(0, 4),
    d=st.integers(1, 20),
    ties=st.booleans(),
)
@settings(max_examples=80, deadline=None)
def test_bulyan_with_one_distance_matrix_matches_the_textbook_loop(
    seed: int, f: int, extra: int, d: int, ties: bool
) -> None:
    x = np.random.default_rng(seed).normal(size=(4 * f + 3 + extra, d)).astype(np.float32)
    if ties:  # few distinct values: equal distances to the median everywhere
        x = np.round(x)
    assert np.allclose(Bulyan(f).aggregate(x), _reference_bulyan(x, f), atol=1e-6)
