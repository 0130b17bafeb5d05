"""The fidelity judgement arithmetic (netem/measure/stats.py): the one exact binomial interval, delay tolerance,
change points. The interval is checked against exact rational tail sums and against scipy's binomial quantiles."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binom

from dist_llm_train.netem.measure.stats import binomial_interval, change_point, delay_ok


def exact_tail_masses(n: int, p: Fraction, lo: int, hi: int) -> tuple[Fraction, Fraction]:
    """P(X < lo) and P(X > hi) for X ~ Binomial(n, p), in exact rational arithmetic."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    return sum(pmf[:lo], Fraction(0)), sum(pmf[hi + 1:], Fraction(0))


@pytest.mark.parametrize(("n", "p"), [(50, "0.02"), (200, "0.1"), (300, "0.5"), (120, "0.9"), (500, "0.01")])
@pytest.mark.parametrize("tail", ["0.001", "0.005"])
def test_binomial_interval_is_the_tightest_with_tails_below_bound(n: int, p: str, tail: str) -> None:
    exact_p, exact_tail = Fraction(p), Fraction(tail)
    lo_frac, hi_frac = binomial_interval(n, float(exact_p), float(exact_tail))
    lo, hi = round(lo_frac * n), round(hi_frac * n)
    assert (lo / n, hi / n) == (lo_frac, hi_frac)  # fractions of whole counts
    below, above = exact_tail_masses(n, exact_p, lo, hi)
    assert below <= exact_tail and above <= exact_tail
    # one count tighter on either side would put more than `tail` outside
    assert exact_tail_masses(n, exact_p, lo + 1, hi)[0] > exact_tail
    assert exact_tail_masses(n, exact_p, lo, hi - 1)[1] > exact_tail


@pytest.mark.parametrize("n", [20, 500, 2000, 10_000])
@pytest.mark.parametrize("p", [0.001, 0.0100503, 0.02, 0.1, 0.37, 0.95])
@pytest.mark.parametrize("tail", [1e-6, 5e-5, 0.005, 0.05])
def test_binomial_interval_equals_scipys_quantiles(n: int, p: float, tail: float) -> None:
    """binom.ppf(tail) is the smallest count whose CDF reaches `tail`, binom.isf(tail) the smallest whose survival
    function is at most `tail`: the same bounds, computed independently (no exact ties on this grid)."""
    assert binomial_interval(n, p, tail) == (binom.ppf(tail, n, p) / n, binom.isf(tail, n, p) / n)


def test_binomial_interval_for_the_fallback_loss_check() -> None:
    """cellular's one-way loss over 10,000 probes at 1e-4 total tail mass: 0.64-1.42 % (docs/netem.md)."""
    lo, hi = binomial_interval(10_000, 0.0100503, 5e-5)
    assert (round(lo * 100, 2), round(hi * 100, 2)) == (0.64, 1.42)


def test_binomial_interval_edges_and_bad_input() -> None:
    assert binomial_interval(2000, 0.0) == (0.0, 0.0)
    assert binomial_interval(10, 1.0) == (1.0, 1.0)
    lo, hi = binomial_interval(2000, 0.02, 1e-6)
    assert lo < 0.02 < hi < 0.04  # 2 % over 2000: ~40 expected, 4 % is far out
    for bad in ((0, 0.1, 1e-6), (-1, 0.1, 1e-6), (10, 1.5, 1e-6), (10, 0.1, 0.0), (10, 0.1, 0.6)):
        with pytest.raises(ValueError):
            binomial_interval(*bad)


def test_delay_tolerance_is_five_percent_plus_a_millisecond() -> None:
    assert delay_ok(41.0, 40.0) and delay_ok(43.0, 40.0) and not delay_ok(43.1, 40.0)
    assert delay_ok(0.9, 0.0) and not delay_ok(1.1, 0.0)


def test_change_point_finds_the_rate_change() -> None:
    ts = np.arange(0.0, 4.0, 0.01)
    cum = np.where(ts < 2.3, ts * 5e6 / 8, 2.3 * 5e6 / 8 + (ts - 2.3) * 0.5e6 / 8)  # 5 → 0.5 Mbit/s at 2.3 s
    tau, before, after = change_point(ts, cum, 1.0, 3.5)
    assert tau == pytest.approx(2.3, abs=0.02) and before == pytest.approx(5.0) and after == pytest.approx(0.5)
    with pytest.raises(ValueError, match="too few samples"):
        change_point(ts[:5], cum[:5], 0.0, 1.0)
