"""Issue 14, item 2: one finite update must not poison a job (regressions with the issue's exact inputs).

The failure measured: a push of float32-max values was accepted, Adam's second moment became inf, the
parameters never changed again while versions advanced, and the inf state was checkpointed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.config import TrainingConfig
from dist_llm_train.core.aggregation import get_aggregator
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.privacy import CentralDP, DPSettings
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.core.update_bound import UpdateBound, UpdateBoundConfig, l2_norm, scale_to_norm
from dist_llm_train.paramserver import checkpoint as ck
from dist_llm_train.paramserver.job import JobState, ParameterStore

F32_MAX = float(np.finfo(np.float32).max)
N = 64


def adam_store(bound: dict[str, object] | None = None, mode: str = "async", members: list[str] | None = None):
    options = {} if bound is None else {"update_bound": json.dumps(bound)}
    spec = JobSpec.from_wire(
        WireJobSpec("j", mode=mode, optimizer="adam", learning_rate=0.01, total_steps=1000, options=options)
    )
    store = ParameterStore(1 << 20)
    rng = np.random.default_rng(0)
    store.init_job(spec, [TensorSpec("w", (N,), 0)], rng.normal(0, 0.02, N).astype(np.float32), members or [])
    return store


def push(store: ParameterStore, worker: str, step: int, vec: np.ndarray) -> PushOutcome:
    job = store.job_state("j")
    payload = np.asarray(vec, "<f4").tobytes()
    header = PushHeader("j", worker, step, job.version, payload_bytes=len(payload))
    return store.push(header, payload).outcome


def honest(rng: np.random.Generator) -> np.ndarray:
    g = rng.normal(0, 1, N)
    return (g / np.linalg.norm(g) * 0.8).astype(np.float32)  # a clipped gradient: norm <= 1


def test_a_float32_max_push_is_clipped_and_the_job_keeps_learning(tmp_path: Path) -> None:
    store = adam_store()
    job = store.job_state("j")
    rng = np.random.default_rng(1)
    for step in range(6):
        assert push(store, "honest", step, honest(rng)) is PushOutcome.APPLIED
    assert push(store, "evil", 0, np.full(N, F32_MAX, np.float32)) is PushOutcome.APPLIED
    assert job.counters["updates_clipped"] == 1
    arrays, _ = job.optimizer.state_dict()
    assert all(np.isfinite(a).all() for a in arrays.values()), "Adam's moments stay finite"
    # The bound was 10x the median honest norm (0.8): the second moment grew by at most (1-b2) * 8^2 per step.
    assert float(np.max(arrays["exp_avg_sq"])) < 1.0
    before = job.params.copy()
    for step in range(6, 16):
        push(store, "honest", step, honest(rng))
    assert np.abs(job.params - before).max() > 1e-3, "parameters still move: the job is not frozen"
    path = ck.write_checkpoint(tmp_path, job.snapshot())
    back = ck.read_checkpoint(path)
    assert np.isfinite(back.params).all() and all(np.isfinite(a).all() for a in back.optimizer_arrays.values())


def test_the_very_first_push_of_a_job_is_bounded_too() -> None:
    store = adam_store()
    job = store.job_state("j")
    params_norm = l2_norm(job.params)
    assert push(store, "evil", 0, np.full(N, F32_MAX, np.float32)) is PushOutcome.APPLIED
    assert job.counters["updates_clipped"] == 1
    v = job.optimizer.state_dict()[0]["exp_avg_sq"]
    # Warm-up bound: 10 x max(||theta||, 1); v = (1 - b2) g^2 of the clipped update.
    assert float(np.sum(v)) <= 0.001 * (10 * max(params_norm, 1.0)) ** 2 * 1.0001


def test_without_the_bound_an_overflowing_update_is_refused_and_changes_nothing() -> None:
    store = adam_store({"enabled": False})
    job = store.job_state("j")
    rng = np.random.default_rng(2)
    push(store, "honest", 0, honest(rng))
    params, version = job.params.copy(), job.version
    arrays, scalars = job.optimizer.state_dict()
    with pytest.raises(PSError) as refused:
        push(store, "evil", 0, np.full(N, F32_MAX, np.float32))
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert "optimizer exp_avg_sq non-finite" in refused.value.message and "unchanged" in refused.value.message
    assert job.version == version and np.array_equal(job.params, params)
    after, after_scalars = job.optimizer.state_dict()
    assert after_scalars == scalars and all(after[k] is arrays[k] for k in arrays)
    assert job.counters["versions_refused_nonfinite"] == 1 and job.counters["rejected_invalid_argument"] == 1
    assert push(store, "honest", 1, honest(rng)) is PushOutcome.APPLIED  # the job goes on


def test_a_sync_round_whose_aggregate_would_overflow_is_refused_and_dropped() -> None:
    store = adam_store({"enabled": False}, mode="sync", members=["a", "b"])
    job = store.job_state("j")
    assert push(store, "a", 0, np.full(N, F32_MAX, np.float32)) is PushOutcome.BUFFERED
    with pytest.raises(PSError, match="non-finite"):
        push(store, "b", 0, np.full(N, F32_MAX, np.float32))
    assert job.version == 0 and job.round_size() == 0
    assert np.isfinite(job.optimizer.state_dict()[0]["exp_avg_sq"]).all()


def test_a_minority_of_huge_updates_cannot_raise_the_bound() -> None:
    bound = UpdateBound(UpdateBoundConfig(window=9, warmup=1))
    for i in range(9):
        norm = 1e30 if i % 3 == 0 else 1.0  # a third of the accepted updates at the bound every time
        b = bound.bound(params_norm=1.0)
        bound.record(min(norm, b))
    assert bound.bound(params_norm=1.0) == pytest.approx(10.0)


def test_the_bound_adapts_to_honest_norms_and_max_norm_caps_it() -> None:
    bound = UpdateBound(UpdateBoundConfig(warmup=2, max_norm=50.0))
    assert bound.bound(params_norm=0.0) == 10.0  # warm-up on all-zero parameters: 10 x 1
    assert bound.bound(params_norm=3.0) == 30.0
    for norm in (20.0, 20.0, 20.0):
        bound.record(norm)
    assert bound.bound(params_norm=3.0) == 50.0  # 10 x 20 = 200, capped by max_norm
    assert UpdateBound(UpdateBoundConfig(enabled=False)).bound(1.0) == math.inf


@pytest.mark.parametrize("scale", [1.0, 1e3, F32_MAX / 10])  # the last: bound/norm below float32's normal range
def test_a_clipped_update_lands_just_under_the_bound_in_float32(scale: float) -> None:
    vec = (np.random.default_rng(0).standard_normal(100_000) * scale).astype(np.float32)
    norm, bound = l2_norm(vec), 1e-3
    out = scale_to_norm(vec, norm, bound)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert bound * (1 - 1e-5) <= l2_norm(out) <= bound
    expected = vec.astype(np.float64) * (bound / norm * (1 - 1e-6))  # the exact direction, kept
    assert np.allclose(out, expected, rtol=1e-6, atol=0)


def test_l2_norm_does_not_overflow() -> None:
    vec = np.full(1000, F32_MAX, np.float32)
    assert l2_norm(vec) == pytest.approx(F32_MAX * math.sqrt(1000), rel=1e-6)
    assert l2_norm(np.array([3.0, 4.0], np.float32)) == pytest.approx(5.0)
    assert l2_norm(np.array([1.0, np.inf], np.float32)) == math.inf


def test_the_bound_is_a_training_setting_carried_to_the_ps_and_on_by_default() -> None:
    assert TrainingConfig().job_spec("j").update_bound == UpdateBoundConfig()
    assert UpdateBoundConfig().enabled
    custom = TrainingConfig.model_validate({"update_bound": {"factor": 4, "window": 8}}).job_spec("j")
    assert JobSpec.from_wire(custom.to_wire()).update_bound == UpdateBoundConfig(factor=4, window=8)
    with pytest.raises(ValueError, match="update_bound"):
        JobSpec.from_wire(WireJobSpec("j", options={"update_bound": '{"factor": 0.5}'}))
    with pytest.raises(ValueError):
        TrainingConfig.model_validate({"update_bound": {"factor": float("inf")}})


# -- checkpoints ---------------------------------------------------------------------------------------
def test_a_non_finite_state_is_never_checkpointed_and_the_last_good_one_stays(tmp_path: Path) -> None:
    store = adam_store()
    job = store.job_state("j")
    good = ck.write_checkpoint(tmp_path, job.snapshot())
    good_bytes = good.read_bytes()
    snap = job.snapshot()
    snap.optimizer_arrays = {**snap.optimizer_arrays, "exp_avg_sq": np.full(N, np.inf, np.float32)}
    with pytest.raises(ck.CheckpointError, match="optimizer exp_avg_sq not finite"):
        ck.write_checkpoint(tmp_path, snap)
    assert good.read_bytes() == good_bytes
    assert not list(tmp_path.glob(".*.tmp"))
    checkpointer = ck.Checkpointer(tmp_path)
    checkpointer.submit(snap)
    checkpointer.close()
    assert checkpointer.errors == 1 and good.read_bytes() == good_bytes


def test_a_legacy_poisoned_checkpoint_is_refused_on_load(tmp_path: Path) -> None:
    store = adam_store()
    path = ck.write_checkpoint(tmp_path, store.job_state("j").snapshot())
    with np.load(path) as z:
        contents = {k: np.array(z[k]) for k in z.files}
    contents["opt.exp_avg_sq"][:] = np.inf  # what the PS wrote before this check existed
    with open(path, "wb") as f:
        np.savez(f, **contents)
    with pytest.raises(ck.CheckpointError, match="non-finite optimizer exp_avg_sq"):
        ck.load_all(tmp_path)


# -- aggregation and central DP --------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "krum"])
def test_aggregation_refuses_float64_that_overflows_float32(rule: str) -> None:
    params = {"trimmed_mean": {"beta": 0.1}, "krum": {"f": 0}}.get(rule, {})
    agg = get_aggregator(rule, **params)
    x = np.ones((3, 4), np.float64)
    x[1, 2] = 1e39  # finite as float64, +inf as float32
    with pytest.raises(ValueError, match="overflow float32"):
        agg.aggregate(x)
    assert np.isfinite(agg.aggregate(np.ones((3, 4), np.float64))).all()


def test_central_dp_refuses_non_finite_inputs() -> None:
    dp = CentralDP(DPSettings(1.0, 1.0, "central"), seed=0)
    for bad, why in ((np.array([[1.0, np.inf]], np.float32), "NaN or Inf"), (np.array([[1.0, 1e39]]), "overflow")):
        with pytest.raises(ValueError, match=why):
            dp.noisy_mean(bad)
    assert dp.releases == 0
    assert np.isfinite(dp.noisy_mean(np.ones((2, 3), np.float32))).all()


def test_restore_keeps_the_replay_marks_and_the_bound_setting(tmp_path: Path) -> None:
    store = adam_store({"factor": 3.0})
    push(store, "a", 7, np.zeros(N, np.float32))
    path = ck.write_checkpoint(tmp_path, store.job_state("j").snapshot())
    job = JobState.restore(ck.read_checkpoint(path), clock=lambda: 0.0, observer=store.job_state("j")._obs)
    assert job.spec.update_bound.factor == 3.0
    assert job.replayed("a", 7) and job.replayed("a", 3) and not job.replayed("a", 8)
