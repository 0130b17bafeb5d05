"""Aggregation rules (dist_llm_train.core.aggregation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.core.aggregation import (
    AGGREGATORS,
    get_aggregator,
    krum_scores,
    pairwise_sq_dists,
    validate_aggregator,
)

# (name, params, smallest n it accepts)
RULES: list[tuple[str, dict[str, Any], int]] = [
    ("mean", {}, 1),
    ("median", {}, 1),
    ("trimmed_mean", {"beta": 0.2}, 1),
    ("krum", {"f": 1}, 5),
    ("multi_krum", {"f": 1, "m": 2}, 5),
    ("bulyan", {"f": 1}, 7),
]


@st.composite
def generic_updates(draw: st.DrawFn, min_n: int) -> np.ndarray:
    """Updates in general position (no score ties), scaled and shifted by hypothesis."""
    n = draw(st.integers(min_n, min_n + 6))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    shift = draw(st.floats(-10, 10))
    return (np.random.default_rng(seed).standard_normal((n, d)) * scale + shift).astype(np.float32)


@pytest.mark.parametrize("name,params,min_n", RULES)
@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_permutation_invariance(name: str, params: dict[str, Any], min_n: int, data: st.DataObject) -> None:
    x = data.draw(generic_updates(min_n))
    perm = data.draw(st.permutations(range(len(x))))
    agg = get_aggregator(name, **params)
    a, b = agg.aggregate(x), agg.aggregate(x[list(perm)])
    assert a.shape == (x.shape[1],) and a.dtype == np.float32
    assert np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.parametrize("name,params,min_n", RULES)
@given(
    row=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=30),
    extra=st.integers(0, 4),
)
@settings(max_examples=40, deadline=None)
def test_identical_inputs_give_that_input(
    name: str, params: dict[str, Any], min_n: int, row: list[float], extra: int
) -> None:
    v = np.array(row, dtype=np.float32)
    x = np.tile(v, (min_n + extra, 1))
    assert np.allclose(get_aggregator(name, **params).aggregate(x), v, rtol=1e-6, atol=0)


@given(x=generic_updates(1), beta=st.floats(0, 0.49))
@settings(max_examples=60, deadline=None)
def test_trimmed_mean_within_coordinate_min_max(x: np.ndarray, beta: float) -> None:
    out = get_aggregator("trimmed_mean", beta=beta).aggregate(x)
    tol = 1e-6 * (1 + np.abs(x).max())
    assert (out >= x.min(axis=0) - tol).all() and (out <= x.max(axis=0) + tol).all()


@given(x=generic_updates(5), f=st.integers(0, 1))
@settings(max_examples=60, deadline=None)
def test_krum_returns_one_of_its_inputs(x: np.ndarray, f: int) -> None:
    out = get_aggregator("krum", f=f).aggregate(x)
    assert any(np.array_equal(out, row) for row in x)


def test_pairwise_distances_match_direct_computation() -> None:
    x = np.random.default_rng(0).standard_normal((6, 9)).astype(np.float32)
    direct = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(axis=2)
    assert np.allclose(pairwise_sq_dists(x), direct, atol=1e-9)


def test_krum_scores_by_hand() -> None:
    x = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]], dtype=np.float32)
    # n=5, f=1 → each row sums its n-f-2 = 2 nearest squared distances.
    assert krum_scores(x, 1).tolist() == [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64]


def test_basic_rules_by_hand() -> None:
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -1000.0]], dtype=np.float32)
    assert get_aggregator("mean").aggregate(x).tolist() == [26.5, -235.0]
    assert get_aggregator("median").aggregate(x).tolist() == [2.5, 15.0]
    assert get_aggregator("trimmed_mean", beta=0.25).aggregate(x).tolist() == [2.5, 15.0]
    assert get_aggregator("trimmed_mean", beta=0.0).aggregate(x).tolist() == [26.5, -235.0]


@pytest.mark.parametrize(
    "name,params",
    [
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 2}),
        ("bulyan", {"f": 2}),
        ("median", {}),
        ("trimmed_mean", {"beta": 0.3}),
    ],
)
def test_robust_rules_resist_outliers_mean_does_not(name: str, params: dict[str, Any]) -> None:
    rng = np.random.default_rng(1)
    honest = rng.standard_normal((9, 50)).astype(np.float32) * 0.1 + 1.0
    attack = np.full((2, 50), -1000.0, dtype=np.float32)
    x = np.concatenate([honest, attack])
    robust = get_aggregator(name, **params).aggregate(x)
    assert np.abs(robust - honest.mean(axis=0)).max() < 0.5
    assert np.abs(get_aggregator("mean").aggregate(x) - honest.mean(axis=0)).max() > 100


def test_multi_krum_interpolates_between_krum_and_mean() -> None:
    x = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32)
    assert np.allclose(get_aggregator("multi_krum", f=1, m=1).aggregate(x), get_aggregator("krum", f=1).aggregate(x))
    default_m = get_aggregator("multi_krum", f=0).aggregate(x)  # m = n - f = n: the plain mean
    assert np.allclose(default_m, x.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize(
    "name,params,n,message",
    [
        ("krum", {"f": 2}, 6, r"krum.*n >= 2f\+3 = 7 \(f=2\).*n=6"),
        ("multi_krum", {"f": 1}, 4, r"n >= 2f\+3 = 5 \(f=1\).*n=4"),
        ("bulyan", {"f": 1}, 6, r"bulyan.*n >= 4f\+3 = 7 \(f=1\).*n=6"),
        ("bulyan", {"f": 2}, 10, r"n >= 4f\+3 = 11 \(f=2\).*n=10"),
        ("multi_krum", {"f": 1, "m": 5}, 5, r"m <= n - f = 4, got m=5"),
    ],
)
def test_preconditions_fail_with_clear_numbers(name: str, params: dict[str, Any], n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_aggregator(name, n, **params)


def test_preconditions_hold_at_the_boundary() -> None:
    validate_aggregator("krum", 7, f=2)
    validate_aggregator("bulyan", 11, f=2)
    validate_aggregator("multi_krum", 5, f=1, m=4)
    validate_aggregator("krum", 5, f=1.0)  # config numbers arrive as floats


def test_aggregate_rechecks_n_at_run_time() -> None:
    agg = get_aggregator("bulyan", f=1)
    with pytest.raises(ValueError, match="n=6"):
        agg.aggregate(np.zeros((6, 3), dtype=np.float32))


@pytest.mark.parametrize(
    "name,params",
    [
        ("krum", {"f": -1}),
        ("krum", {"f": 1.5}),
        ("krum", {"f": float("nan")}),
        ("krum", {"f": True}),
        ("trimmed_mean", {"beta": 0.5}),
        ("trimmed_mean", {"beta": -0.1}),
        ("multi_krum", {"m": 0}),
        ("mean", {"beta": 0.1}),
        ("geomedian", {}),
    ],
)
def test_bad_parameters_are_value_errors(name: str, params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        get_aggregator(name, **params)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_aggregate_rejects_bad_arrays(name: str) -> None:
    agg = get_aggregator(name, f=0) if "krum" in name or name == "bulyan" else get_aggregator(name)
    with pytest.raises(ValueError, match="shape"):
        agg.aggregate(np.zeros(5, dtype=np.float32))
    bad = np.zeros((5, 2), dtype=np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        agg.aggregate(bad)
