"""Streaming DiLoCo (arXiv 2501.18512): fragments synced in turn, delayed merge, compute overlapping the sync.

The maths is checked against a hand-written reference on a toy quadratic problem (numpy only, no torch),
the PS side through the real `JobState`, and the overlap through the real worker loop with a PS client
that can only finish a push once an overlap step has started (no sleeps: a sequential loop deadlocks)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.strategies import StreamingDiLoCo, StreamingDiLoCoConfig, build_strategy
from dist_llm_train.core.strategies.base import JobPlan
from dist_llm_train.core.strategies.streaming_diloco import fragment_bounds
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.optim import SGD


class QuadraticTrainer:
    """Local steps of plain gradient descent on ½‖θ − c‖² (the `Trainer` protocol, numpy only)."""

    def __init__(self, target: np.ndarray, lr: float = 0.1) -> None:
        self.target = target.astype(np.float32)
        self.theta = np.zeros_like(self.target)
        self.learning_rate = lr
        self.step_calls: list[int] = []

    def compute_gradient(self) -> tuple[np.ndarray, float, int]:
        return self.theta - self.target, self._loss(), 1

    def local_steps(self, h: int, lr: float) -> tuple[np.ndarray, float, int]:
        self.step_calls.append(h)
        before = self.theta.copy()
        losses = []
        for _ in range(h):
            losses.append(self._loss())
            self.theta = (self.theta - np.float32(lr) * (self.theta - self.target)).astype(np.float32)
        return before - self.theta, float(np.mean(losses)), h

    def params(self) -> np.ndarray:
        return self.theta.copy()

    def set_params(self, vec: np.ndarray) -> None:
        self.theta = np.array(vec, dtype=np.float32)

    def _loss(self) -> float:
        return 0.5 * float(np.sum((self.theta - self.target) ** 2))


def _strategy(**kw: Any) -> StreamingDiLoCo:
    s = build_strategy({"name": "streaming_diloco", **kw})
    assert isinstance(s, StreamingDiLoCo)
    return s


# -- config and schedule -----------------------------------------------------------------------------
def test_the_schedule_must_fit() -> None:
    with pytest.raises(ValidationError, match="multiple of fragments"):
        StreamingDiLoCoConfig(local_steps=10, fragments=4)
    with pytest.raises(ValidationError, match="exceeds H/P"):
        StreamingDiLoCoConfig(local_steps=8, fragments=4, overlap_steps=3)
    StreamingDiLoCoConfig(local_steps=8, fragments=4, overlap_steps=2)  # τ = H/P: merge right before the next sync
    with pytest.raises(ValueError, match="not one round fits"):
        _strategy(local_steps=40, fragments=2).validate(JobPlan(num_workers=2, steps=10, aggregation="mean"))
    s = _strategy(local_steps=20, fragments=4)
    assert s.steps_per_update() == 5 and s.versions(100) == 20  # a version per fragment sync


def test_fragments_are_contiguous_equal_and_cover_the_vector() -> None:
    for size, p in [(10, 3), (1000, 4), (7, 7), (1_000_003, 8)]:
        b = fragment_bounds(size, p)
        assert b[0] == 0 and b[-1] == size and all(0 <= b[i + 1] - b[i] - size // p <= 1 for i in range(p))
    with pytest.raises(ValueError, match="cannot be split"):
        fragment_bounds(3, 4)
    s = _strategy(local_steps=12, fragments=3)
    assert [s.region(v, 9) for v in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(0, 3)]


def test_stepping_every_region_in_turn_equals_one_whole_step() -> None:
    rng = np.random.default_rng(0)
    params = rng.standard_normal(1000).astype(np.float32)
    whole, parts = SGD(1000, 0.7, 0.9, nesterov=True), SGD(1000, 0.7, 0.9, nesterov=True)
    p_whole, p_parts = params, params
    bounds = fragment_bounds(1000, 3)
    for _ in range(3):
        update = rng.standard_normal(1000).astype(np.float32)
        p_whole = whole.step(p_whole, update)
        for i in range(3):
            r = slice(bounds[i], bounds[i + 1])
            p_parts = parts.step_region(p_parts, update[r], r)
    assert p_whole.tobytes() == p_parts.tobytes()
    assert whole.buf is not None and parts.buf is not None and whole.buf.tobytes() == parts.buf.tobytes()


# -- the maths against a hand-written reference ----------------------------------------------------------
def reference(targets: list[np.ndarray], h: int, p: int, tau: int, alpha: float, syncs: int) -> list[np.ndarray]:
    """Streaming DiLoCo by its definition, workers in lockstep: every H/P steps the next fragment's outer
    gradients are averaged and stepped by Nesterov SGD; each worker merges the result τ steps later."""
    d = targets[0].size
    bounds = fragment_bounds(d, p)
    lr_in, lr_out, mom = 0.1, 0.7, 0.9
    local = [np.zeros(d, np.float32) for _ in targets]
    glob = np.zeros(d, np.float32)  # the PS's parameters
    seen = [glob.copy() for _ in targets]  # each worker's θ̃
    buf = np.zeros(d, np.float32)

    def steps(k: int) -> None:
        for w, c in enumerate(targets):
            for _ in range(k):
                local[w] = (local[w] - np.float32(lr_in) * (local[w] - c)).astype(np.float32)

    per = h // p
    steps(per)
    for s in range(syncs):
        r = slice(bounds[s % p], bounds[s % p + 1])
        delta = np.mean(np.stack([seen[w][r] - local[w][r] for w in range(len(targets))]), axis=0)
        buf[r] = np.float32(mom) * buf[r] + delta  # Nesterov: buf = μ·buf + g; step g + μ·buf
        glob[r] = glob[r] - np.float32(lr_out) * (delta + np.float32(mom) * buf[r])
        steps(tau)
        for w in range(len(targets)):
            local[w][r] = np.float32(alpha) * local[w][r] + np.float32(1 - alpha) * glob[r]
            seen[w][r] = glob[r]
        steps(per - tau)
    return local


def _header(worker: str, step: int, base: int, payload: bytes) -> PushHeader:
    return PushHeader(
        job_id="sd", worker_id=worker, step=step, base_version=base, payload_bytes=len(payload), kind="pseudo_gradient"
    )


def test_workers_and_ps_follow_the_papers_update_rule() -> None:
    d, h, p, tau, alpha, syncs = 12, 8, 4, 1, 0.5, 9
    rng = np.random.default_rng(1)
    targets = [rng.standard_normal(d).astype(np.float32) for _ in range(2)]
    kw = {"local_steps": h, "fragments": p, "overlap_steps": tau, "merge_alpha": alpha, "inner_lr": 0.1}
    spec = JobSpec(job_id="sd", strategy=StreamingDiLoCoConfig(**kw), total_steps=100)
    spec = JobSpec(**{**spec.__dict__, "optimizer": _strategy(**kw).server_optimizer(spec.optimizer)})
    store = ParameterStore()
    store.init_job(spec, [TensorSpec("w", (d,), 0)], np.zeros(d, np.float32), ["a", "b"])
    workers = {name: (QuadraticTrainer(c), _strategy(**kw)) for name, c in zip("ab", targets, strict=True)}
    held = {}
    for name, (trainer, strategy) in workers.items():
        got = store.pull("sd", name)
        strategy.receive(trainer, got.params, got.version)
        held[name] = got
    for s in range(syncs):
        for name, (trainer, strategy) in workers.items():
            update = strategy.compute(trainer)
            assert update.vec.size == 3 and update.slot == s % p  # one fragment of the 12 values
            assert update.samples == h // p  # every inner step since the previous push
            store.push(_header(name, s, s, update.vec.tobytes()), update.vec.tobytes())
        for name, (trainer, strategy) in workers.items():
            strategy.overlap(trainer)
            got = store.pull("sd", name, have_epoch=held[name].epoch, have_version=held[name].version)
            assert got.delta is not None and got.delta.nbytes == 4 * 3  # only the synced fragment comes back
            strategy.receive(trainer, got.params, got.version)
            held[name] = got
    expected = reference(targets, h, p, tau, alpha, syncs)
    for w, (trainer, _) in enumerate(workers.values()):
        # Run the compute steps of the next sync too, which the reference ends with.
        trainer.local_steps(h // p - tau, 0.1)
        np.testing.assert_allclose(trainer.theta, expected[w], rtol=0, atol=1e-6)


def test_a_push_of_the_wrong_fragment_size_is_refused() -> None:
    spec = JobSpec(job_id="sd", strategy=StreamingDiLoCoConfig(local_steps=4, fragments=2), total_steps=10)
    store = ParameterStore()
    store.init_job(spec, [TensorSpec("w", (10,), 0)], np.zeros(10, np.float32), ["a"])
    whole = np.ones(10, np.float32).tobytes()
    with pytest.raises(Exception, match="5"):
        store.push(_header("a", 0, 0, whole), whole)
    assert store.stats("sd")[0].version == 0


def test_a_worker_far_behind_takes_the_parameters_whole() -> None:
    s = _strategy(local_steps=4, fragments=2, merge_alpha=0.5)
    t = QuadraticTrainer(np.ones(4, np.float32))
    s.receive(t, np.zeros(4, np.float32), 0)
    t.theta[:] = 5
    s.receive(t, np.full(4, 2, np.float32), 1)  # fragment 0 merged: (5 + 2) / 2
    assert t.theta.tolist() == [3.5, 3.5, 5, 5]
    s.receive(t, np.full(4, 9, np.float32), 3)  # two rounds closed: both fragments moved, taken whole
    assert t.theta.tolist() == [9, 9, 9, 9]


# -- the worker loop overlaps compute with the sync ---------------------------------------------------------
def test_the_worker_keeps_computing_while_its_sync_is_in_flight() -> None:
    """Push k cannot return until overlap k has started on the training thread, and overlap k only starts after
    sync k was handed off: a loop that waited for its sync before computing would stall. Timestamps show each
    overlap starting while its push was still in flight."""
    import time
    import unittest.mock

    from dist_llm_train.config import parse_config
    from dist_llm_train.paramserver.transport.client import PSClient
    from dist_llm_train.training import trainer as trainer_module
    from dist_llm_train.worker.training_loop import TrainingContext, run_training

    cfg = parse_config(
        {
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "training": {
                "num_workers": 1,
                "steps": 12,
                "batch_size": 4,
                "seq_length": 8,
                "num_samples": 400,
                "strategy": {"name": "streaming_diloco", "local_steps": 6, "fragments": 2, "overlap_steps": 1},
            },
        }
    )
    store = ParameterStore()
    progress = threading.Condition()
    overlaps: list[float] = []
    pushes: list[tuple[float, float]] = []
    real_steps = trainer_module.LocalTrainer.local_steps

    def instrumented(self: Any, h: int, lr: float) -> Any:
        if h == 1:  # the overlap: compute runs H/P - τ = 2 steps (3 before the first sync)
            with progress:
                overlaps.append(time.perf_counter())
                progress.notify_all()
        return real_steps(self, h, lr)

    class BlockingClient(PSClient):
        def init_job(self, *a: Any) -> Any:
            return store.init_job(*a)

        def pull(
            self, job_id: str, worker_id: str, min_version: int = 0, wait_timeout_s: float = 0.0, have: Any = None,
            own: Any = None,
        ) -> Any:
            kw = {} if have is None else {"have_epoch": have.epoch, "have_version": have.version}
            return store.pull(job_id, worker_id, min_version, wait_timeout_s, **kw)

        def push(self, header: PushHeader, payload: bytes) -> Any:
            start = time.perf_counter()
            k = len(pushes) + 1
            result = store.push(header, payload)
            with progress:
                assert progress.wait_for(lambda: len(overlaps) >= k, timeout=20), "no overlap ran during push"
            pushes.append((start, time.perf_counter()))
            return result

        def set_members(self, *a: Any) -> Any:
            raise NotImplementedError

        def stats(self, *a: Any) -> Any:
            return store.stats(*a)

        def close(self) -> None:
            pass

    ctx = TrainingContext(
        job_id="stream", worker_id="w0", config=cfg, ps_transport="grpc", ps_address="", shard_ids={0}, num_shards=1
    )
    with unittest.mock.patch.object(trainer_module.LocalTrainer, "local_steps", instrumented):
        out = run_training(ctx, threading.Event(), lambda: {0}, lambda row: None, client=BlockingClient())
    assert out.job_complete and out.steps == 4  # 12 inner steps / (H/P = 3) syncs
    assert len(pushes) == 4 and len(overlaps) >= 4
    previous_end = 0.0
    for (_, end), began in zip(pushes, overlaps, strict=False):
        assert previous_end <= began <= end  # overlap k ran after sync k-1 came back, while push k was in flight
        previous_end = end


# -- the simulator ------------------------------------------------------------------------------------------
def _sim_config(strategy: dict[str, Any], profile: str, steps: int = 256, **overrides: Any) -> Any:
    from dist_llm_train.config import Config
    from dist_llm_train.sim.config import SimConfig

    cfg = Config.model_validate(
        {"training": {"num_workers": 2, "steps": steps, "strategy": strategy, "eval_batches": 8}}
    )
    sim = SimConfig.from_config(cfg, profile=profile, **overrides)
    return cfg, sim


def test_the_simulator_hides_the_sync_behind_compute() -> None:
    """Intercontinental links (250 ms each way): a sync is a push and a pull sent alongside it, one round trip
    plus the transfers, ~0.9 s. With 0.3 s inner steps DiLoCo (H = 16: 4.8 s of compute per round) waits that
    long for every sync; Streaming DiLoCo with τ = H/P = 4 (1.2 s of compute per fragment sync) computes
    through them."""
    from dist_llm_train.sim.runner import simulate, summary

    timing = {"compute.kind": "constant", "compute.mean_s": 0.3}
    _, diloco = _sim_config({"name": "diloco", "local_steps": 16}, "intercontinental", **timing)
    stream = {"name": "streaming_diloco", "local_steps": 16, "fragments": 4, "overlap_steps": 4}
    _, streaming = _sim_config(stream, "intercontinental", **timing)
    assert streaming.strategy_config.fragments == 4  # type: ignore[attr-defined]
    a, b = summary(simulate(diloco))["simulation"], summary(simulate(streaming))["simulation"]
    # Steady state: a DiLoCo round is its compute plus the sync; a streaming one is its compute alone.
    assert a["round_time_s"]["p50"] > 16 * 0.3 + 0.5
    assert abs(b["round_time_s"]["p50"] - 4 * 0.3) < 0.01
    # Over the run (start-up included) utilisation follows.
    assert a["compute_utilisation"] < 0.85 and b["compute_utilisation"] > 0.93, (a, b)
    assert b["virtual_seconds"] < a["virtual_seconds"]


def test_simulated_streaming_trains_with_fragment_sized_messages() -> None:
    from dist_llm_train.sim.training import simulate_trained

    strategy = {"name": "streaming_diloco", "local_steps": 8, "fragments": 4, "overlap_steps": 1}
    cfg, sim = _sim_config(strategy, "cellular", steps=48)
    full_cfg, full_sim = _sim_config({"name": "diloco", "local_steps": 8}, "cellular", steps=48)
    result = simulate_trained(cfg, sim)
    assert result.outcome == "completed" and result.version == 48 // 2
    assert result.trained.final_loss < result.trained.initial_loss - 0.3
    params = sim.param_count
    # Each sync moves one fragment up (float32) and back (a lossless slice): a quarter of DiLoCo's messages.
    assert abs(result.sizes.push_bytes - (params / 4 * 4 + sim.payload.header_bytes)) < 16
    assert result.sizes.pull_bytes < 0.26 * 4 * params + sim.payload.header_bytes
    wire = result.trained.strategy["wire_bytes"]
    assert wire["params_delta_bytes_sent"] > 0
    again = simulate_trained(cfg, sim)  # the same seed, the same run
    np.testing.assert_array_equal(again.trained.final_params, result.trained.final_params)
