"""The netem VM suite's judgement arithmetic, checked on any machine (no VM, no root, pure maths).

The binomial interval it judges loss with is netem/measure/stats.py's, tested in tests/unit/test_netem_stats.py.
"""

from __future__ import annotations

import pytest
from vm_stats import (
    delay_problem,
    expected_round_trip,
    loss_problem,
    one_way,
    rate_verdict,
    starved,
)


def test_round_trip_figures_split_and_compound_back() -> None:
    d1, p1 = one_way("round_trip", 80.0, 2.0)
    assert d1 == 40.0 and 1 - (1 - p1 / 100) ** 2 == pytest.approx(0.02)
    assert expected_round_trip("round_trip", 80.0, 2.0) == pytest.approx((80.0, 2.0))
    assert expected_round_trip("one_way", 40.0, 1.0) == pytest.approx((80.0, 1.99))
    with pytest.raises(ValueError):
        one_way("sideways", 1.0, 1.0)


def test_delay_judgement() -> None:
    assert delay_problem(100.9, 0.3, 100.0) is None
    assert delay_problem(25.8, 0.24, 20.0) is not None  # 5.6 ms off a 20 ms link: beyond max(3 ms, 5 %)
    assert delay_problem(415.0, 0.3, 400.0) is None  # 5 % of 400 is 20 ms
    assert delay_problem(50.0, 0.3, 100.0) is not None
    # starved: late by up to a further max(7 ms, 5 %), never early; a doubled delay stays out
    assert delay_problem(54.3, 0.24, 50.0) is not None and delay_problem(54.3, 0.24, 50.0, starved=True) is None
    assert delay_problem(45.0, 0.24, 50.0, starved=True) is not None
    assert delay_problem(100.0, 0.24, 50.0, starved=True) is not None
    assert starved(197.3, 25.8) and not starved(102.2, 100.6)


def test_loss_judgement() -> None:
    assert loss_problem(35, 2000, 2.0) is None
    assert loss_problem(4, 2000, 2.0) is not None  # an order of magnitude too little loss
    assert loss_problem(200, 2000, 2.0) is not None
    assert loss_problem(0, 2000, 0.0) is None and loss_problem(1, 2000, 0.0) is not None


def test_rate_verdicts() -> None:
    assert rate_verdict(13.0, 9.9, 10.0).kind == "measured" and rate_verdict(13.0, 9.9, 10.0).ok
    assert not rate_verdict(13.0, 12.0, 10.0).ok  # the shaper let 20 % too much through
    assert not rate_verdict(13.0, 1.25, 10.0).ok  # kbit-for-kbyte style unit error
    limited = rate_verdict(9.0, 8.5, 10.0)
    assert limited.ok and limited.kind == "sender-limited"
    assert not rate_verdict(40.0, 39.0, 10.0).ok  # even a fast sender must never exceed the ceiling
    fast = rate_verdict(130.0, 61.5, 100.0)  # beyond what one emulated CPU carries: ceiling only
    assert fast.ok and fast.kind == "ceiling-only"
    assert not rate_verdict(130.0, 125.0, 100.0).ok
    with pytest.raises(ValueError):
        rate_verdict(1.0, 1.0, 0.0)
