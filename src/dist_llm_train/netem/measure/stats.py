"""The arithmetic that judges a measured link against its profile, shared by every fidelity check.

Used by the kernel and userspace fidelity harnesses (kernel_fidelity.py, userspace_fidelity.py), the netem VM
suite (tests/netem_vm) and benchmarks/shaping.py, so that "inside the interval" and "within tolerance" mean the
same thing everywhere.

Why an exact binomial interval for loss: a shaper drops each packet independently with the configured
probability, so the number lost out of n is Binomial(n, p). Accepting anything inside the central 1 − 2·tail mass
makes a false alarm a `tail`-sized event, while a wrong configuration (2 % applied as 0.2 %, or applied twice)
falls far outside. The normal approximation this replaced is skewed at ~20 expected losses: its "99 %" interval
missed 1.02 % of runs (0.19 % low, 0.83 % high).
"""

from __future__ import annotations

import math

import numpy as np


def binomial_interval(n: int, p: float, tail: float = 0.005) -> tuple[float, float]:
    """Loss fractions [lo, hi] that n packets, each lost independently with probability p, fall outside with
    probability at most `tail` on each side (0.005: a 99 % interval).

    Exact and the tightest such interval: lo·n is the largest count with P(X < lo·n) ≤ tail and hi·n the smallest
    with P(X > hi·n) ≤ tail, for X ~ Binomial(n, p). Summed from the probability mass function in log space
    (standard library only), so neither the guest of the netem VM nor a service image needs scipy.
    """
    if n <= 0 or not 0.0 <= p <= 1.0 or not 0.0 < tail < 0.5:
        raise ValueError(f"need n > 0, 0 <= p <= 1 and 0 < tail < 0.5; got n={n}, p={p}, tail={tail}")
    if p in (0.0, 1.0):
        return p, p

    log_p, log_q, log_n_factorial = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def pmf(k: int) -> float:
        return math.exp(log_n_factorial - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)

    # Walk in from each end until the mass passed exceeds `tail`: the count where that happens is the bound.
    lo, below = 0, pmf(0)  # below = P(X <= lo)
    while below <= tail:
        lo += 1
        below += pmf(lo)
    hi, above = n, pmf(n)  # above = P(X >= hi)
    while above <= tail:
        hi -= 1
        above += pmf(hi)
    return lo / n, hi / n


def delay_ok(measured_ms: float, configured_ms: float) -> bool:
    """Within ±5 % + 1 ms of the configured delay: the tolerance every delay check accepts (the millisecond
    absorbs timer granularity and the measuring process's own scheduling)."""
    return abs(measured_ms - configured_ms) <= 0.05 * configured_ms + 1.0


def change_point(ts: np.ndarray, cum_bytes: np.ndarray, lo: float, hi: float) -> tuple[float, float, float]:
    """Best hinge of a continuous two-piece linear fit of cumulative bytes on [lo, hi]: (time, Mbit/s before,
    Mbit/s after). Fitting the cumulative curve, not binned rates, keeps short stalls from moving it."""
    m = (ts >= lo) & (ts <= hi)
    t, b = ts[m], cum_bytes[m]
    if len(t) < 10:
        raise ValueError(f"too few samples in [{lo}, {hi}] to find a change point")
    best: tuple[float, float, float, float] | None = None
    for tau in np.arange(lo + 0.1, hi - 0.1, 0.01):
        x = np.column_stack([np.ones_like(t), np.minimum(t - tau, 0), np.maximum(t - tau, 0)])
        coef = np.linalg.lstsq(x, b, rcond=None)[0]
        sse = float(((x @ coef - b) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(tau), float(coef[1]) * 8e-6, float(coef[2]) * 8e-6)
    assert best is not None
    return best[1], best[2], best[3]
