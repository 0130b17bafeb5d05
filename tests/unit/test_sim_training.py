"""Real numerics on the virtual clock (`sim.training`): the simulator's timing, a model that really learns.

Held here: a run repeats exactly from its seed; on perfect links a sync (and DiLoCo) run equals a
hand-written reference — every worker computes on the same parameters, the mean is applied by the job's
own optimizer — version by version; links change the clock, not the learning; and settings that cannot be
trained are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.config import Config
from dist_llm_train.core.downlink import DownlinkPublisher
from dist_llm_train.paramserver.optim import make_optimizer
from dist_llm_train.sim.config import SimConfig, SimConfigError
from dist_llm_train.sim.report import write_report
from dist_llm_train.sim.training import MAX_TRAINED_WORKERS, simulate_trained, training_config_for

pytestmark = pytest.mark.timeout(240)


def _config(workers: int = 3, steps: int = 12, **training: object) -> Config:
    cfg = Config()
    cfg.training.num_workers = workers
    cfg.training.steps = steps
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return Config.model_validate(cfg.model_dump())


def _versions_losses(result: object) -> list[tuple[int, float]]:
    log = result.telemetry  # type: ignore[attr-defined]
    rows = log.rows(result.sizes, str)  # type: ignore[attr-defined]
    return sorted((int(r["ps_version"]), float(r["loss"])) for r in rows)


def reference_sync(cfg: Config, versions: int) -> tuple[np.ndarray, list[list[float]]]:
    """Rounds by hand: each worker's pipeline on the same parameters, the mean, the job's optimizer."""
    from dist_llm_train.training.data import make_dataset
    from dist_llm_train.training.flat import flatten_params
    from dist_llm_train.training.trainer import LocalTrainer

    t = cfg.training
    n = t.num_workers
    dataset = make_dataset(t)
    trainers = [LocalTrainer(cfg.model, t, dataset, [i], num_shards=n) for i in range(n)]
    pipes = [t.worker_update(worker_name=f"worker-{i}", shard_ids=[i], num_shards=n) for i in range(n)]
    params = flatten_params(trainers[0].model)
    spec = t.job_spec("reference")
    opt = make_optimizer(spec.optimizer, params.size)
    # With a downlink codec workers compute on the published θ̂ (core.downlink), the optimizer steps θ.
    pub = DownlinkPublisher(spec.downlink.build(), params, 0) if spec.downlink is not None else None
    losses: list[list[float]] = []
    for v in range(versions):
        updates, round_losses = [], []
        for trainer, pipe in zip(trainers, pipes, strict=True):
            trainer.set_params(np.array(pub.published if pub is not None else params))
            u = pipe.compute(trainer)
            updates.append(u.vec)
            round_losses.append(u.loss)
        params = opt.step(params, np.mean(np.stack(updates), axis=0), 1.0).astype(np.float32)
        if pub is not None:
            pub.publish(params, v + 1)
        losses.append(sorted(round_losses))
    return (pub.published if pub is not None else params), losses  # what a pull returns, as the run reports


@pytest.mark.parametrize("strategy", ["sync", "diloco", "diloco+downlink"])
def test_perfect_links_equal_the_reference_version_by_version(strategy: str) -> None:
    extra: dict[str, object] = {"strategy": {"name": "diloco", "local_steps": 3}} if "diloco" in strategy else {}
    if "downlink" in strategy:
        extra["downlink"] = {"name": "topk", "ratio": 0.05}
    cfg = _config(workers=3, steps=12, **extra)
    sim = SimConfig.from_config(cfg, profile="none", **{"compute.kind": "constant", "compute.mean_s": 0.01})
    result = simulate_trained(cfg, sim)
    versions = cfg.training.versions
    assert result.outcome == "completed" and result.version == versions
    ref_params, ref_losses = reference_sync(cfg, versions)
    by_version: dict[int, list[float]] = {}
    for v, loss in _versions_losses(result):
        by_version.setdefault(v, []).append(loss)
    got = [sorted(by_version[v]) for v in range(versions)]
    np.testing.assert_allclose(np.array(got), np.array(ref_losses), rtol=0, atol=1e-5)
    # The PS sums the round's updates in arrival order, the reference in worker order: float32 rounding,
    # which Adam's normalisation can blow up to ~1e-5 on a parameter whose gradient is ~0.
    np.testing.assert_allclose(result.trained.final_params, ref_params, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["sync", "async"])
def test_same_seed_same_run_and_links_cost_time_not_learning(strategy: str) -> None:
    cfg = _config(workers=3, steps=10, strategy=strategy)
    sim = SimConfig.from_config(cfg, profile="cellular")
    a, b = simulate_trained(cfg, sim), simulate_trained(cfg, sim)
    assert a.virtual_s == b.virtual_s
    assert _versions_losses(a) == _versions_losses(b)
    np.testing.assert_array_equal(a.trained.final_params, b.trained.final_params)
    assert a.trained.final_loss == b.trained.final_loss
    if strategy == "sync":  # sync's maths does not depend on arrival times; only the clock does
        fast = simulate_trained(cfg, SimConfig.from_config(cfg, profile="none"))
        np.testing.assert_allclose(fast.trained.final_params, a.trained.final_params, atol=1e-5)
        assert a.virtual_s > 5 * fast.virtual_s


def test_downlink_deltas_shrink_the_pulls_the_clock_and_the_counters_see() -> None:
    full = _config(workers=2, steps=12, strategy={"name": "diloco", "local_steps": 3})
    deltas = _config(
        workers=2, steps=12, strategy={"name": "diloco", "local_steps": 3}, downlink={"name": "int8"}
    )
    a = simulate_trained(full, SimConfig.from_config(full, profile="cellular"))
    b = simulate_trained(deltas, SimConfig.from_config(deltas, profile="cellular"))
    assert b.sizes.pull_bytes < 0.3 * a.sizes.pull_bytes  # int8 + scales vs float32
    assert b.virtual_s < a.virtual_s
    wire_a, wire_b = a.trained.strategy["wire_bytes"], b.trained.strategy["wire_bytes"]
    assert wire_a["params_delta_bytes_sent"] == 0
    assert 0 < wire_b["params_delta_bytes_sent"] < 0.3 * wire_a["params_bytes_sent"]
    assert b.trained.strategy["downlink"] == "int8"
    assert abs(b.trained.final_loss - a.trained.final_loss) < 0.05  # int8 deltas with feedback: same learning


def test_trained_report_has_losses_target_and_plot(tmp_path: Path) -> None:
    cfg = _config(workers=2, steps=60)
    result = simulate_trained(cfg, SimConfig.from_config(cfg, profile="good"))
    run_dir, data = write_report(result, tmp_path)
    assert data["simulation"]["numerics"] == "real"
    assert data["final_loss"] < data["initial_loss"] - 0.5
    assert data["loss_floor"] is not None and data["target"]["time_s"] > 0
    assert data["strategy"]["wire_bytes"]["bytes_received_gradient"] > 0  # the PS's own byte counters
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert "![loss](loss.png)" in (run_dir / "summary.md").read_text()
    header, first = (run_dir / "metrics.csv").read_text().splitlines()[:2]
    assert float(first.split(",")[header.split(",").index("loss")]) > 0


def test_untrainable_settings_are_refused_before_running() -> None:
    cfg = _config()
    with pytest.raises(SimConfigError, match="cannot be trained"):
        simulate_trained(cfg, SimConfig.from_config(cfg, **{"payload.params": 1000}))
    with pytest.raises(SimConfigError, match="too many to train"):
        training_config_for(cfg, SimConfig.from_config(cfg, workers=MAX_TRAINED_WORKERS + 1))
    with pytest.raises(SimConfigError, match="vectorised cannot train"):
        simulate_trained(cfg, SimConfig.from_config(cfg, engine="vectorised"))


def test_eval_curve_follows_the_global_model_in_virtual_time_and_bytes() -> None:
    cfg = _config(workers=2, steps=40, strategy={"name": "diloco", "local_steps": 5})
    result = simulate_trained(cfg, SimConfig.from_config(cfg, profile="cellular"), eval_every=2)
    curve = result.trained.eval_curve
    assert [p.version for p in curve] == [2, 4, 6, 8]
    pairs = zip(curve, curve[1:], strict=False)
    assert all(a.virtual_s < b.virtual_s and a.wire_bytes < b.wire_bytes for a, b in pairs)
    assert curve[-1].loss == result.trained.final_loss  # the last version's is the run's final evaluation
    assert curve[-1].loss < result.trained.initial_loss - 0.3
    with pytest.raises(SimConfigError, match="eval_every"):
        simulate_trained(cfg, SimConfig.from_config(cfg, profile="cellular"), eval_every=0)


def test_markov_hard_reports_its_exact_floor_and_true_size(tmp_path: Path) -> None:
    from dist_llm_train.training.corpora import HigherOrderMarkovCorpus

    cfg = _config(workers=2, steps=4, data="markov-hard", vocab_size=12, markov_concentration=0.05)
    cfg = Config.model_validate({**cfg.model_dump(), "model": {"n_layer": 1, "n_embd": 32, "ngram_order": 2}})
    sim = SimConfig.from_config(cfg, profile="good")
    result = simulate_trained(cfg, sim)
    floor = HigherOrderMarkovCorpus(12, 2, seed=0, concentration=0.05).loss_floor_nats(cfg.training.seq_length)
    assert result.trained.loss_floor == floor
    assert result.trained.final_params.size == sim.param_count  # payload sizes match the trained model
    _, data = write_report(result, tmp_path)
    assert data["loss_floor"] == floor
