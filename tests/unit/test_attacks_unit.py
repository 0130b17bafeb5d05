"""Attack maths and the choice of attacking workers."""

from __future__ import annotations

import re
from statistics import NormalDist

import numpy as np
import pytest

from dist_llm_train.core.attacks import (
    ALIE,
    IPM,
    Attacker,
    Gaussian,
    SignFlip,
    alie_z_max,
    get_attack,
    is_attacker,
)


def estimates(k: int = 5, d: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(1.0, 0.5, size=(k, d))).astype(np.float32)


def test_sign_flip_and_ipm_are_scaled_negations() -> None:
    x = estimates()
    rng = np.random.default_rng(0)
    assert np.allclose(SignFlip(3.0).craft(x, rng), -3.0 * x[0])
    assert np.allclose(IPM(0.1).craft(x, rng), -0.1 * x.mean(axis=0), atol=1e-6)
    assert float(np.dot(IPM(0.1).craft(x, rng), x.mean(axis=0))) < 0  # the inner product is negative


def test_alie_sits_z_standard_deviations_below_the_mean() -> None:
    x = estimates(k=20)
    out = ALIE(z=1.5).craft(x, np.random.default_rng(0))
    expected = x.mean(axis=0) - 1.5 * x.std(axis=0, ddof=1)
    assert np.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("n,f", [(7, 1), (7, 2), (11, 2), (50, 24)])
def test_alie_default_z_is_the_papers_z_max(n: int, f: int) -> None:
    s = n // 2 + 1 - f
    assert alie_z_max(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n))
    assert get_attack("alie", {}, n=n, f=f).z == pytest.approx(alie_z_max(n, f))  # type: ignore[attr-defined]


def test_gaussian_has_the_requested_spread_and_ignores_the_gradient() -> None:
    out = Gaussian(2.0).craft(estimates(d=20_000), np.random.default_rng(1))
    assert abs(float(out.std()) - 2.0) < 0.05 and abs(float(out.mean())) < 0.05


def test_attacker_is_reproducible_and_counts() -> None:
    a, b = Attacker(Gaussian(1.0), seed=5), Attacker(Gaussian(1.0), seed=5)
    x = estimates()
    assert np.array_equal(a.craft(x), b.craft(x))
    assert a.crafted == 1
    with pytest.raises(ValueError, match="shape"):
        a.craft(np.zeros(3, np.float32))


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("poison", {}, "unknown attack"),
        ("sign_flip", {"scale": 0}, "scale"),
        ("gaussian", {"sigma": float("inf")}, "sigma"),
        ("ipm", {"samples": 1}, "samples"),
        ("alie", {"z": -1}, "z"),
        ("sign_flip", {"sigma": 1}, "not ['sigma']"),
    ],
)
def test_bad_attacks_are_value_errors(name: str, params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        get_attack(name, params, n=7, f=2)


def test_attackers_are_the_last_k_shards_or_named() -> None:
    chosen = [i for i in range(7) if is_attacker(f"worker-{i}", [i], 7, 2, [])]
    assert chosen == [5, 6]
    assert is_attacker("w-x", [0], 7, 0, ["w-x"]) and not is_attacker("w-y", [0], 7, 0, ["w-x"])
    assert not any(is_attacker(f"worker-{i}", [i], 7, 0, []) for i in range(7))


# -- mimic and drift (issue 13) ----------------------------------------------------------------------------------
def test_mimic_sends_its_honest_update_computed_on_the_target_shard() -> None:
    x = estimates()
    mimic = get_attack("mimic", {"target": 2.0})
    assert np.array_equal(mimic.craft(x, np.random.default_rng(0)), x[0])
    assert mimic.train_shards([6], lambda: 0) == [2]
    assert get_attack("mimic").train_shards([6], lambda: 4) == [4]  # the training side picks the target
    assert SignFlip().train_shards([6], lambda: 4) == [6]
    with pytest.raises(ValueError, match="shard index"):
        get_attack("mimic", {"target": -1.0})


def test_mimic_copy_is_bit_identical_to_the_targets_update() -> None:
    """Trained on the target's shard with the target's batch stream, at the same parameters."""
    from dist_llm_train.config import parse_config
    from dist_llm_train.training.data import make_dataset
    from dist_llm_train.training.trainer import LocalTrainer

    cfg = parse_config({
        "training": {"num_workers": 4, "num_samples": 400, "batch_size": 4, "sharding": "dirichlet",
                     "dirichlet_alpha": 0.3, "attack": {"name": "mimic", "attackers": 1}},
        "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
    })
    t = cfg.training
    dataset = make_dataset(t)
    target = dataset.mimic_target(4, 1)
    assert target in (0, 1, 2)  # an honest shard: shard 3 is the attacker's
    pipes = {i: t.worker_update(worker_name=f"w{i}", shard_ids=[i], num_shards=4) for i in (target, 3)}
    assert pipes[target].attacker is None and pipes[3].attacker is not None
    trainers = {
        i: LocalTrainer(cfg.model, t, dataset, p.train_shards([i], lambda: target), num_shards=4)
        for i, p in pipes.items()
    }
    for _ in range(3):
        sent = {i: pipes[i].compute(trainers[i]).vec for i in pipes}
        np.testing.assert_array_equal(sent[3], sent[target])


def test_drift_keeps_one_direction_inside_the_honest_spread() -> None:
    drift = get_attack("drift", {"z": 0.5}, n=11, f=2)
    first = estimates(k=8, seed=1)
    out1 = drift.craft(first, np.random.default_rng(0))
    mu1 = first.mean(axis=0)
    u = -mu1 / np.linalg.norm(mu1)
    offset1 = out1 - mu1
    # z·||sigma|| along -mu of the first round
    assert np.linalg.norm(offset1) == pytest.approx(0.5 * np.linalg.norm(first.std(axis=0, ddof=1)), rel=1e-4)
    np.testing.assert_allclose(offset1 / np.linalg.norm(offset1), u, atol=1e-5)
    # Later rounds: new honest estimates (even pointing elsewhere), the same bias direction.
    later = (estimates(k=8, seed=2) * np.float32(-1.0)).astype(np.float32)
    offset2 = drift.craft(later, np.random.default_rng(0)) - later.mean(axis=0)
    np.testing.assert_allclose(offset2 / np.linalg.norm(offset2), u, atol=1e-5)
    # Inside the spread: no farther from the honest mean than a typical honest estimate.
    typical = np.median(np.linalg.norm(first - mu1, axis=1))
    assert np.linalg.norm(offset1) < typical
    with pytest.raises(ValueError, match="z"):
        get_attack("drift", {"z": 0.0})


def test_alie_and_ipm_strength_comes_from_config() -> None:
    from dist_llm_train.config import parse_config

    for name, key, value in (("alie", "z", 0.3), ("ipm", "epsilon", 2.0)):
        cfg = parse_config({"training": {"num_workers": 11, "attack": {"name": name, "attackers": 2,
                                                                          "params": {key: value}}}})
        assert cfg.training.attack is not None
        assert getattr(cfg.training.attack.build(11), key) == value
