"""Pacing a one-way link in userspace: its current figures, a token bucket, a self-correcting timer, and the
constants the relay's loss model uses. Shared by every connection of a relay (relay.py)."""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from dist_llm_train.netem.delayer import ClassShaper
from dist_llm_train.netem.profile import Link

MSS_BYTES = 1448
RTO_FLOOR_S = 0.2
BURST_S = 0.005  # token-bucket depth in seconds of rate: absorbs timer overshoot without visible bursts
QUANTUM_S = 0.005  # a rate-limited piece is about this long on the wire, so rate changes apply promptly
MAX_PIECE_BYTES = 256 << 10
INFLIGHT_CAP_BYTES = 8 << 20  # bytes "on the wire" per pipe before the relay stops taking more
HIGH_WATER_BYTES = 1 << 20


def rto_s(rtt_s: float) -> float:
    """Retransmission timeout the loss model charges for a tail loss."""
    return rtt_s + RTO_FLOOR_S


class LinkState:
    """The current one-way link of one relay direction; a schedule replaces it while connections run."""

    def __init__(self, link: Link, rtt_s: float) -> None:
        self.link, self.rtt_s, self.version = link, rtt_s, 0

    def set(self, link: Link, rtt_s: float) -> None:
        if link != self.link or rtt_s != self.rtt_s:
            self.link, self.rtt_s = link, rtt_s
            self.version += 1

    @property
    def rate_bps(self) -> float | None:
        return self.link.rate_mbit * 1e6 if self.link.rate_mbit else None

    def quantum(self) -> int:
        rate = self.rate_bps
        if rate is None:
            return MAX_PIECE_BYTES
        return int(min(max(rate / 8 * QUANTUM_S, MSS_BYTES), MAX_PIECE_BYTES))


class TokenBucket:
    """Serialisation at the link rate: `reserve` returns when the last of `nbytes` leaves the bottleneck."""

    def __init__(self) -> None:
        self.t_free = -math.inf

    def reserve(self, nbytes: int, rate_bps: float, now: float) -> float:
        start = max(self.t_free, now - BURST_S)
        self.t_free = start + nbytes * 8 / rate_bps
        return self.t_free


class Timer:
    """Sleeps until loop-time deadlines, aiming early by what it learnt about its own lateness (epoll rounds
    timeouts up to whole milliseconds, and a busy loop adds more)."""

    def __init__(self) -> None:
        self.lateness = 0.0

    async def sleep_until(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        wait = due - self.lateness - loop.time()
        if wait <= 0:
            return
        await asyncio.sleep(wait)
        late = loop.time() - due
        self.lateness = min(max(self.lateness + 0.05 * late, 0.0), 0.002)


@dataclass
class DirectionStats:
    bytes: int = 0
    pieces: int = 0
    segments: int = 0
    segments_lost: int = 0  # modelled
    stalls: int = 0
    stall_seconds: float = 0.0


def shaper_for(link: Link, rng: random.Random) -> ClassShaper:
    loss = link.loss.model_dump() if link.loss_pct > 0 else None
    return ClassShaper(
        link.delay_ms, link.jitter_ms, link.distribution, link.delay_correlation_pct / 100.0, loss, rng
    )
