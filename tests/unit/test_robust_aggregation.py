"""Centered clipping, bucketing and nearest-neighbour mixing against their papers' definitions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config import parse_config
from dist_llm_train.core.aggregation import (
    AggregationConfig,
    CenteredClipping,
    aggregation_health,
    get_aggregator,
    validate_aggregator,
)
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.preaggregation import Bucketing, NearestNeighborMixing
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver.checkpoint import read_checkpoint, write_checkpoint
from dist_llm_train.paramserver.job import JobState, ParameterStore


@st.composite
def updates(draw: st.DrawFn, min_n: int = 1, max_n: int = 12) -> np.ndarray:
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    x = np.random.default_rng(seed).standard_normal((n, d)) * scale
    if draw(st.booleans()) and n > 2:  # ties allowed: duplicate rows
        x[1] = x[0]
    return x.astype(np.float32)


# -- centered clipping ------------------------------------------------------------------------------------
def cc_reference(x: np.ndarray, v0: np.ndarray, tau: float | None, iterations: int) -> np.ndarray:
    """Karimireddy et al. (2021), Algorithm 2 line by line: v <- v + (1/n) sum_i clip(x_i - v, tau)."""
    v = [float(c) for c in v0]
    rows = [[float(c) for c in r] for r in x]
    for _ in range(iterations):
        diffs = [[a - b for a, b in zip(r, v, strict=True)] for r in rows]
        norms = [math.sqrt(sum(c * c for c in z)) for z in diffs]
        radius = tau if tau is not None else float(np.median(norms))
        clipped = [
            [c * min(1.0, radius / nz) if nz > 0 else 0.0 for c in z] for z, nz in zip(diffs, norms, strict=True)
        ]
        v = [vi + sum(z[j] for z in clipped) / len(rows) for j, vi in enumerate(v)]
    return np.array(v)


@settings(max_examples=150, deadline=None)
@given(updates(), st.one_of(st.none(), st.floats(1e-3, 1e3)), st.integers(1, 4), st.booleans())
def test_centered_clipping_matches_the_paper(x: np.ndarray, tau: float | None, iters: int, warm: bool) -> None:
    cc = CenteredClipping(tau=tau, iterations=iters)
    v0 = np.zeros(x.shape[1])
    if warm:  # the previous round's aggregate is the starting centre
        v0 = np.linspace(-1, 1, x.shape[1])
        cc.load_state_dict({"center": v0})
    got = cc.aggregate(x)
    want = cc_reference(x, v0, tau, iters)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(cc.state_dict()["center"], want, rtol=1e-6, atol=1e-6 * (1 + np.abs(x).max()))


@settings(max_examples=60, deadline=None)
@given(updates(min_n=2), st.data())
def test_centered_clipping_ignores_arrival_order(x: np.ndarray, data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(x.shape[0])))
    a = CenteredClipping(tau=None, iterations=3).aggregate(x)
    b = CenteredClipping(tau=None, iterations=3).aggregate(x[list(perm)])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + np.abs(x).max()))


def test_one_huge_update_moves_the_centre_by_at_most_tau_over_n_per_iteration() -> None:
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 0.1, size=(9, 20))
    bad = np.full((1, 20), 1e6)
    x = np.vstack([honest, bad]).astype(np.float32)
    tau, iters = 0.5, 3
    out = CenteredClipping(tau=tau, iterations=iters).aggregate(x)
    clean = CenteredClipping(tau=tau, iterations=iters).aggregate(x[:9])
    assert np.linalg.norm(out) < 2.0  # the mean would be ~1e5 per coordinate
    # each iteration the attacker contributes at most tau/n; honest terms differ by the clip as well
    assert np.linalg.norm(out - clean) <= iters * (tau / 10 + tau / 9 + tau / 10) + 1e-6


def test_centered_clipping_state_survives_a_checkpoint(tmp_path: Path) -> None:
    spec = JobSpec.from_wire(
        WireJobSpec("cc", optimizer="sgd", learning_rate=1.0, momentum=0.0, aggregation="centered_clipping",
                    aggregation_params={"tau": 0.5, "iterations": 2.0})
    )
    store = ParameterStore()
    store.init_job(spec, [TensorSpec("w", (3,), 0)], np.zeros(3, dtype=np.float32), ["a", "b"])
    for w, v in (("a", 1.0), ("b", 3.0)):
        payload = np.full(3, v, dtype=np.float32).tobytes()
        store.push(PushHeader("cc", w, 1, 0, "none", b"", len(payload), 1, 0.0, "gradient"), payload)
    job = store.job_state("cc")
    center = job.aggregator.state_dict()["center"]
    assert np.abs(center).sum() > 0
    path = write_checkpoint(tmp_path, job.snapshot())
    restored = JobState.restore(read_checkpoint(path), job._clock, job._obs)
    np.testing.assert_array_equal(restored.aggregator.state_dict()["center"], center)


def test_centered_clipping_refuses_bad_state_and_parameters() -> None:
    cc = CenteredClipping()
    with pytest.raises(ValueError, match="center"):
        cc.load_state_dict({"centre_typo": np.zeros(2)})
    with pytest.raises(ValueError, match="finite"):
        cc.load_state_dict({"center": np.array([np.nan])})
    for bad in ({"tau": 0.0}, {"tau": float("inf")}, {"iterations": 0}, {"iterations": 1.5}):
        with pytest.raises(ValueError):
            get_aggregator("centered_clipping", **bad)
    with pytest.raises(ValueError, match="keeps no state"):
        get_aggregator("median").load_state_dict({"center": np.zeros(2)})


# -- bucketing --------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(updates(min_n=3), st.integers(2, 4), st.sampled_from(["mean", "median", "trimmed_mean"]), st.data())
def test_bucketing_matches_the_paper(x: np.ndarray, s: int, inner: str, data: st.DataObject) -> None:
    """Karimireddy et al. (2022), Algorithm 1: permute, average buckets of s, inner rule on the bucket means."""
    wrapped = get_aggregator(inner, bucket_size=s, bucket_seed=7)
    assert isinstance(wrapped, Bucketing)
    perm = wrapped.permutation(x)
    assert sorted(perm.tolist()) == list(range(x.shape[0]))
    buckets = [perm[i : i + s] for i in range(0, len(perm), s)]
    assert len(buckets) == math.ceil(x.shape[0] / s)
    means = np.array([[float(np.mean([x[r, j] for r in b])) for j in range(x.shape[1])] for b in buckets])
    want = get_aggregator(inner).aggregate(means.astype(np.float32))
    np.testing.assert_allclose(wrapped.aggregate(x), want, rtol=1e-5, atol=1e-5 * (1 + np.abs(x).max()))
    # Exact invariance to arrival order: the shuffle is a keyed hash of the set of updates.
    order = data.draw(st.permutations(range(x.shape[0])))
    np.testing.assert_array_equal(wrapped.aggregate(x[list(order)]), wrapped.aggregate(x))


def test_bucketing_shuffle_is_uniform_over_rounds_and_secret_by_default() -> None:
    """Across rounds (new content) each update lands in every position about equally often."""
    rng = np.random.default_rng(1)
    wrapped = get_aggregator("mean", bucket_size=2, bucket_seed=3)
    assert isinstance(wrapped, Bucketing)
    n, rounds = 6, 3000
    first_bucket = np.zeros(n)
    for _ in range(rounds):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        perm = wrapped.permutation(x)
        first_bucket[perm[:2]] += 1
    expected = rounds * 2 / n
    chi2 = float(((first_bucket - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 5 dof: p = 0.001
    x = rng.standard_normal((n, 4)).astype(np.float32)
    keyed = [Bucketing(get_aggregator("mean"), 2).permutation(x).tolist() for _ in range(8)]
    assert len({tuple(p) for p in keyed}) > 1  # unseeded: a fresh secret key per rule


# -- nearest-neighbour mixing --------------------------------------------------------------------------------
def nnm_reference(x: np.ndarray, f: int) -> np.ndarray:
    """Allouah et al. (2023), Algorithm 1: y_i = mean of the n - f updates closest to x_i (x_i included)."""
    n = len(x)
    out = []
    for i in range(n):
        dist = [float(np.linalg.norm(x[i].astype(np.float64) - x[j])) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: (dist[j], x[j].tobytes()))[: n - f]
        out.append(np.mean([x[j].astype(np.float64) for j in nearest], axis=0))
    return np.array(out)


@settings(max_examples=100, deadline=None)
@given(updates(min_n=5), st.integers(0, 2), st.sampled_from(["mean", "median", "krum", "centered_clipping"]))
def test_nnm_matches_the_paper(x: np.ndarray, f: int, inner: str) -> None:
    params: dict[str, Any] = {"f": f} if inner == "krum" else {}
    n = x.shape[0]
    if inner == "krum" and n < 2 * f + 3:
        return
    wrapped = get_aggregator(inner, nnm_f=f, **params)
    assert isinstance(wrapped, NearestNeighborMixing)
    mixed = wrapped._mix(x)
    np.testing.assert_allclose(mixed, nnm_reference(x, f), rtol=1e-5, atol=1e-5 * (1 + np.abs(x).max()))
    want = get_aggregator(inner, **params).aggregate(mixed)
    np.testing.assert_allclose(wrapped.aggregate(x), want, rtol=1e-5, atol=1e-5 * (1 + np.abs(x).max()))


@settings(max_examples=60, deadline=None)
@given(updates(min_n=5), st.data())
def test_nnm_ignores_arrival_order(x: np.ndarray, data: st.DataObject) -> None:
    perm = list(data.draw(st.permutations(range(x.shape[0]))))
    agg = get_aggregator("krum", f=1, nnm_f=1)
    np.testing.assert_allclose(agg.aggregate(x), agg.aggregate(x[perm]), rtol=1e-6, atol=1e-6)


def test_wrappers_pull_outliers_towards_the_honest_cluster() -> None:
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(0, 0.1, (9, 8)), np.full((2, 8), 50.0)]).astype(np.float32)
    for params in ({"nnm_f": 2}, {"bucket_size": 2, "bucket_seed": 0}):
        assert np.abs(get_aggregator("median", **params).aggregate(x)).max() < 10


# -- preconditions at config time, with the rule and the numbers --------------------------------------------
@pytest.mark.parametrize(
    "name,params,n,message",
    [
        ("krum", {"f": 2, "bucket_size": 2}, 11, r"krum\+bucketing.*n >= 13: ceil\(n/2\) buckets must meet krum's "
         r"n >= 2f\+3 = 7 \(f=2\).*n=11"),
        ("bulyan", {"f": 2, "bucket_size": 2}, 15, r"n >= 21.*4f\+3 = 11"),
        ("mean", {"nnm_f": 3}, 6, r"mean\+nnm.*NNM's n >= 2f\+1 = 7 \(f=3\).*n=6"),
        ("krum", {"f": 2, "nnm_f": 2}, 6, r"n >= 7"),
        ("trimmed_mean", {"f": 2}, 4, r"n >= 2f\+1 = 5 \(f=2\).*n=4"),
    ],
)
def test_wrapped_preconditions_name_the_rule_and_numbers(
    name: str, params: dict[str, Any], n: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_aggregator(name, n, **params)


def test_wrapped_preconditions_hold_at_the_boundary() -> None:
    validate_aggregator("krum", 13, f=2, bucket_size=2)
    validate_aggregator("median", 11, bucket_size=2, nnm_f=2)
    validate_aggregator("trimmed_mean", 5, f=2)
    validate_aggregator("mean", 7, nnm_f=3)


def test_config_carries_wrappers_and_refuses_what_cannot_work() -> None:
    cfg = AggregationConfig(rule="krum", f=2, nnm=True, bucketing=2, bucket_seed=5)
    assert cfg.params(13) == {"f": 2.0, "nnm_f": 2.0, "bucket_size": 2.0, "bucket_seed": 5.0}
    assert cfg.label == "krum+nnm+bucketing2"
    agg = get_aggregator(cfg.rule, **cfg.params(13))
    assert agg.describe() == "bucketing(s=2) -> nnm(f=2) -> krum"
    with pytest.raises(ValueError, match="needs aggregation.f"):
        AggregationConfig(rule="median", nnm=True)
    with pytest.raises(ValueError, match="centered_clipping's"):
        AggregationConfig(rule="median", tau=1.0)
    with pytest.raises(ValueError, match=r"krum\+bucketing.*n >= 13.*n=11 \(n = training.num_workers\)"):
        parse_config({"training": {"num_workers": 11, "aggregation": {"rule": "krum", "f": 2, "bucketing": 2}}})
    with pytest.raises(ValueError, match="central DP"):
        parse_config({"training": {"num_workers": 5, "aggregation": {"rule": "mean", "f": 1, "nnm": True},
                                   "dp": {"mode": "central", "noise_multiplier": 1.0}}})
    with pytest.raises(ValueError, match="worker_momentum smooths gradients"):
        parse_config({"training": {"num_workers": 4, "strategy": {"name": "diloco"},
                                   "aggregation": {"worker_momentum": 0.9}}})


# -- a round the rule was not configured for: recorded and handled by a documented fallback ---------------------
def _store_with(aggregation: str, params: dict[str, float], members: list[str]) -> tuple[ParameterStore, list[float]]:
    now = [0.0]
    store = ParameterStore(clock=lambda: now[0])
    spec = JobSpec.from_wire(WireJobSpec("j", optimizer="sgd", learning_rate=1.0, momentum=0.0,
                                         aggregation=aggregation, aggregation_params=params, straggler_timeout_s=1.0))
    store.init_job(spec, [TensorSpec("w", (2,), 0)], np.zeros(2, dtype=np.float32), members)
    return store, now


def _push(store: ParameterStore, worker: str, value: float) -> None:
    payload = np.full(2, value, dtype=np.float32).tobytes()
    store.push(PushHeader("j", worker, 1, 0, "none", b"", len(payload), 1, 0.0, "gradient"), payload)


def test_trimmed_mean_by_count_still_cuts_f_in_a_short_round() -> None:
    members = [f"w{i}" for i in range(7)]
    store, now = _store_with("trimmed_mean", {"f": 2.0}, members)
    for w, v in zip(members[:5], (1.0, 2.0, 3.0, 1e6, -1e6), strict=True):  # two stragglers never push
        _push(store, w, v)
    now[0] += 2
    assert store.expire_rounds() == 1
    np.testing.assert_array_equal(store.pull("j", "w0").params, [-2.0, -2.0])  # 1e6 and -1e6 cut: f = 2 per side
    health = aggregation_health(store.stats("j")[0].counters)
    assert health["short_rounds"] == 1 and health["last_short_version"] == 1 and health["last_short_updates"] == 5
    assert health["fallback_rounds"] == 0 and not health["degraded"]


def test_a_round_below_the_precondition_falls_back_and_says_so() -> None:
    members = [f"w{i}" for i in range(7)]
    store, now = _store_with("trimmed_mean", {"f": 2.0}, members)
    for w, v in zip(members[:4], (1.0, 2.0, 3.0, 1e6), strict=True):  # 4 < 2f+1 = 5
        _push(store, w, v)
    now[0] += 2
    assert store.expire_rounds() == 1
    np.testing.assert_array_equal(store.pull("j", "w0").params, [-2.5, -2.5])  # the median of the four
    health = aggregation_health(store.stats("j")[0].counters)
    assert health == {
        "short_rounds": 1, "last_short_version": 1, "last_short_updates": 4,
        "fallback_rounds": 1, "fallback_rule": "median", "last_fallback_version": 1, "last_fallback_updates": 4,
        "degraded": True,
    }


def test_a_full_round_records_nothing() -> None:
    members = ["a", "b", "c"]
    store, _ = _store_with("median", {"nnm_f": 1.0}, members)
    for w, v in zip(members, (1.0, 2.0, 30.0), strict=True):
        _push(store, w, v)
    health = aggregation_health(store.stats("j")[0].counters)
    assert health["short_rounds"] == 0 and health["fallback_rounds"] == 0


# -- worker momentum (the worker side of centered clipping) -----------------------------------------------------
class ScriptedTrainer:
    """Hands out a fixed sequence of gradients."""

    learning_rate = 0.1

    def __init__(self, grads: list[np.ndarray]) -> None:
        self.grads = list(grads)

    def compute_gradient(self) -> tuple[np.ndarray, float, int]:
        return self.grads.pop(0), 1.0, 4


def test_worker_momentum_sends_the_running_average_of_gradients() -> None:
    cfg = parse_config({"training": {"num_workers": 3, "aggregation": {"rule": "centered_clipping",
                                                                        "worker_momentum": 0.9}}})
    pipeline = cfg.training.worker_update(worker_name="w0", shard_ids=[0], num_shards=3)
    grads = [np.full(3, g, dtype=np.float32) for g in (1.0, 0.0, 2.0)]
    trainer = ScriptedTrainer(grads)
    sent = [pipeline.compute(trainer).vec for _ in range(3)]  # type: ignore[arg-type]
    m = grads[0].astype(np.float64)  # the first update is the first gradient (no zero-start bias)
    np.testing.assert_allclose(sent[0], m)
    for got, g in zip(sent[1:], grads[1:], strict=True):
        m = 0.1 * g + 0.9 * m
        np.testing.assert_allclose(got, m, rtol=1e-6)
    plain = parse_config({"training": {"num_workers": 3}}).training.worker_update(worker_name="w0", shard_ids=[0])
    np.testing.assert_array_equal(plain.compute(ScriptedTrainer(grads)).vec, grads[0])  # type: ignore[arg-type]


def test_the_run_report_shows_short_rounds_and_fallbacks() -> None:
    from dist_llm_train.core.types import JobStats
    from dist_llm_train.embedded.report import strategy_markdown, strategy_summary

    t = parse_config({"training": {"num_workers": 5, "aggregation": {"rule": "krum", "f": 1}}}).training
    counters = {"aggregation_rounds_short": 3, "aggregation_fallback_median": 2, "aggregation_last_fallback_version": 8}
    stats = JobStats(job_id="j", version=10, mode="sync", members=[], counters=counters, last_loss=0.0,
                     complete=False, num_params=4, workers=[])
    summary = strategy_summary(t, stats, [])
    assert summary["aggregation_health"]["fallback_rounds"] == 2 and summary["aggregation_health"]["degraded"]
    text = "\n".join(strategy_markdown(summary))
    assert "| short rounds (fewer updates than members) | 3 |" in text
    assert "| rounds the rule's precondition failed (median used) | 2 |" in text
