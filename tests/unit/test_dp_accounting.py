"""DP: the clip bound, the noise, and ε from the dp-accounting RDP accountant (never hand-computed here)."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dist_llm_train.core.privacy import CentralDP, DPSettings, LocalDP, clip_update, dp_report, epsilon


def library_epsilon(z: float, k: int, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), k))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    "z,k,delta", [(0.8, 10, 1e-5), (1.1, 100, 1e-5), (2.0, 500, 1e-6), (5.0, 1000, 1e-5)]
)
def test_epsilon_is_the_accountants_value(z: float, k: int, delta: float) -> None:
    assert epsilon(z, k, delta) == pytest.approx(library_epsilon(z, k, delta), rel=1e-12)


def test_epsilon_falls_as_noise_rises_and_grows_with_releases() -> None:
    noises = [0.5, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0]
    eps = [epsilon(z, 200, 1e-5) for z in noises]
    assert all(a > b for a, b in zip(eps, eps[1:], strict=False))
    assert epsilon(1.0, 10, 1e-5) < epsilon(1.0, 100, 1e-5) < epsilon(1.0, 1000, 1e-5)
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(1.0, 100, 1e-3) < epsilon(1.0, 100, 1e-7)  # a looser delta buys a smaller epsilon


def test_poisson_sampling_amplifies() -> None:
    assert epsilon(1.0, 100, 1e-5, sampling_rate=0.01) < epsilon(1.0, 100, 1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"noise_multiplier": 0.0, "clip": 1.0}, "epsilon = inf"),
        ({"noise_multiplier": -1.0, "clip": 1.0}, "> 0"),
        ({"noise_multiplier": float("nan"), "clip": 1.0}, "finite"),
        ({"noise_multiplier": 1.0, "clip": 0.0}, "clip"),
        ({"noise_multiplier": 1.0, "clip": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "clip": 1.0, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "clip": 1.0, "mode": "global"}, "mode"),
    ],
)
def test_nonsensical_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPSettings(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        epsilon(1.0, -1, 1e-5)


vectors = hnp.arrays(
    np.float32, st.integers(1, 300), elements=st.floats(-1e4, 1e4, width=32, allow_nan=False)
)


@given(vec=vectors, clip=st.floats(1e-3, 1e3))
@settings(max_examples=200, deadline=None)
def test_clip_bound_holds_on_every_update(vec: np.ndarray, clip: float) -> None:
    out, norm = clip_update(vec, clip)
    assert float(np.linalg.norm(out.astype(np.float64))) <= clip
    if norm <= clip:
        assert np.array_equal(out, vec)
    else:  # direction kept
        assert np.allclose(out * (norm / clip), vec, rtol=1e-4, atol=1e-3)


@given(
    rows=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 50)),
        elements=st.floats(-1e3, 1e3, width=32, allow_nan=False),
    ),
    clip=st.floats(1e-2, 10),
)
@settings(max_examples=100, deadline=None)
def test_central_clip_bound_holds_on_every_row(rows: np.ndarray, clip: float) -> None:
    out = CentralDP(DPSettings(1.0, clip, "central"), 0).clip_all(rows)
    assert (np.linalg.norm(out.astype(np.float64), axis=1) <= clip).all()


def test_local_noise_has_the_calibrated_spread() -> None:
    dp = LocalDP(DPSettings(noise_multiplier=1.5, clip=0.2), seed=0)
    out = dp.privatize(np.zeros(50_000, np.float32))
    assert float(out.std()) == pytest.approx(1.5 * 0.2, rel=0.02)
    assert dp.releases == 1 and dp.clipped == 0
    dp.privatize(np.full(10, 5.0, np.float32))
    assert dp.clipped == 1 and dp.last_norm == pytest.approx(np.sqrt(10) * 5)
    assert dp.max_sent_norm <= 0.2


def test_central_noise_is_added_to_the_sum_once() -> None:
    dp = CentralDP(DPSettings(noise_multiplier=1.0, clip=1.0, mode="central"), seed=0)
    out = dp.noisy_mean(np.zeros((4, 40_000), np.float32))
    assert float(out.std()) == pytest.approx(1.0 / 4, rel=0.02)  # sigma = z*C on the sum, divided by n
    assert dp.releases == 1


def test_report_shows_spent_and_planned_epsilon() -> None:
    rep = dp_report(DPSettings(1.2, 1.0), releases=30, planned_releases=100)
    assert rep["epsilon"] == pytest.approx(library_epsilon(1.2, 30, 1e-5))
    assert rep["planned_epsilon"] == pytest.approx(library_epsilon(1.2, 100, 1e-5))
    assert dp_report(None, 5, 10) == {"enabled": False}
