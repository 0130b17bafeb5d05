"""The arithmetic behind the netem VM assertions, kept apart so it can be unit-tested on any machine.

Loss is judged with the project's one exact binomial interval (netem/measure/stats.py, which says why): netem
drops each packet independently with the configured probability, so a false alarm is a `tail`-sized event and a
wrong configuration (say 2 % applied as 0.2 %, or applied twice) falls far outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_llm_train.netem.measure.stats import binomial_interval

RATE_CEILING = 0.10
"""Never more than 10 % above the configured rate: a shaper that lets more through is simply wrong."""
RATE_FLOOR = 0.20
"""At most 20 % below it. Widened from 10 % after measuring, honestly: htb with tc's default burst (about one
MTU) loses tokens whenever its timer fires late, and a TCG guest on a shared host fires timers late all the time.
A plain `htb rate 10mbit` with default burst, no project code, measured 9.47 Mbit/s in the guest on a quiet host
and the backend's tree 8.7-9.1 on a busy one, while the same class with `burst 32k` measured 9.98. A unit error
(kbit vs kbyte, Mbit vs bit) is still far outside the band."""
VM_RATE_LIMIT_MBIT = 20.0
"""Above this the floor is not checked, only the ceiling: one emulated CPU cannot carry a shaped flood that fast
reliably. The good profile's 100 Mbit/s measured 88.6 on a quiet host but 61.5 and 44.8 on a busy one, and 64 KB
frames (a tenth of the packets) still gave only 82 — the guest's timers and softirqs, not the shaper, set it."""
SENDER_HEADROOM = 1.15
"""The flood must reach 1.15x the configured rate for the shaper, not the sender, to be what limits it."""
DELAY_TOLERANCE_MS = 3.0
DELAY_TOLERANCE_REL = 0.05
STARVED_MS = 10.0
"""If user-space RTTs exceed kernel-timestamped ones by more than this, the guest was starved of CPU by the
host while measuring; its timers (netem's and htb's included) ran late, so the run is repeated."""
STARVED_ALLOWANCE_MS = 7.0
STARVED_ALLOWANCE_REL = 0.05
"""Extra delay accepted, above the normal tolerance only, when the guest was starved in every attempt: a late
timer can only hold a packet longer, never release it early. Measured on a host at load 4.5 on 2 cores: +3.4 to
+5.9 ms on 40-80 ms links whose quiet-host error was +0.8 to +1.6 ms. Doubled delays (a profile applied twice,
round-trip figures not halved) stay far outside."""


def delay_problem(median_ms: float, baseline_ms: float, expected_ms: float, starved: bool = False) -> str | None:
    """Why a median RTT does not match `expected_ms` (after removing the unshaped baseline), or None."""
    tol = max(DELAY_TOLERANCE_MS, DELAY_TOLERANCE_REL * expected_ms)
    extra = max(STARVED_ALLOWANCE_MS, STARVED_ALLOWANCE_REL * expected_ms) if starved else 0.0
    excess = median_ms - baseline_ms
    if -tol <= excess - expected_ms <= tol + extra:
        return None
    return (f"median RTT {median_ms:.2f} ms (baseline {baseline_ms:.2f}) vs configured {expected_ms:g} "
            f"-{tol:.1f}/+{tol + extra:.1f}")


def starved(user_rtt_median_ms: float, net_rtt_median_ms: float) -> bool:
    return user_rtt_median_ms - net_rtt_median_ms > STARVED_MS


def loss_problem(lost: int, sent: int, loss_pct: float, tail: float = 1e-6) -> str | None:
    """Why `lost` of `sent` is implausible for a `loss_pct` link, or None."""
    lo, hi = binomial_interval(sent, loss_pct / 100.0, tail)
    if lo <= lost / sent <= hi:  # k/n against lost/n: the same division, so exactly the count comparison
        return None
    plausible = f"{round(lo * sent)}..{round(hi * sent)}"
    return f"lost {lost}/{sent}; for {loss_pct:.4g} % anything in {plausible} is plausible (tail {tail:g})"


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
    kind: str  # "measured", "sender-limited" (the emulated CPU could not offer enough) or "ceiling-only"
    reason: str


def rate_verdict(offered_mbit: float, got_mbit: float, rate_mbit: float) -> RateVerdict:
    """Judge a flood: never faster than configured; close to configured when the VM can tell (see above)."""
    if rate_mbit <= 0:
        raise ValueError("rate must be positive")
    if got_mbit > rate_mbit * (1 + RATE_CEILING):
        return RateVerdict(False, "measured", f"received {got_mbit:.2f} Mbit/s, above {rate_mbit} + 10 %")
    if rate_mbit > VM_RATE_LIMIT_MBIT:
        return RateVerdict(True, "ceiling-only",
                           f"{rate_mbit} Mbit/s is beyond what the VM carries reliably; only the ceiling is checked")
    if offered_mbit < rate_mbit * SENDER_HEADROOM:
        return RateVerdict(True, "sender-limited",
                           f"sender offered only {offered_mbit:.2f} Mbit/s (< {SENDER_HEADROOM}x {rate_mbit}); "
                           "only the ceiling is checked")
    if got_mbit < rate_mbit * (1 - RATE_FLOOR):
        return RateVerdict(False, "measured", f"received {got_mbit:.2f} Mbit/s, below {rate_mbit} - 20 %")
    return RateVerdict(True, "measured", f"received {got_mbit:.2f} Mbit/s for {rate_mbit} configured")
