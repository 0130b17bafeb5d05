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
