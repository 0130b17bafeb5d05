"""Drawing each packet's delay and loss the way netem does, for the shapers that are not netem.

The kernel fallback's delayer (netem/kernel/delayer.py) draws once per packet, the userspace relays
(netem/userspace/relay.py) once per piece of a byte stream; both use this one sampler, so a profile means the
same thing under either. Configured from plain JSON fields (the delayer daemon reads them from its config file),
so importing it costs nothing beyond the standard library.

Delay: `delay_ms + jitter_ms · Z`, floored at zero, where Z has mean 0 and standard deviation 1 in the chosen
distribution and follows an AR(1) process, Z ← ρ·Z + √(1 − ρ²)·ε, which is netem's delay correlation. Loss:
correlated random (with probability ρ repeat the previous outcome, netem's semantics) or Gilbert–Elliott (a
good and a bad state, each with its own loss probability).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LinkSampler:
    """Delay sampler and loss state for one one-way link (a traffic class, or one direction of a relay)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    distribution: str = "normal"
    correlation: float = 0.0
    loss: dict[str, Any] | None = None
    rng: random.Random = field(default_factory=random.Random)
    _z: float = 0.0
    _bad: bool = False
    _last_lost: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], seed: int) -> LinkSampler:
        return cls(cfg.get("delay_ms", 0.0), cfg.get("jitter_ms", 0.0), cfg.get("distribution", "normal"),
                   cfg.get("delay_correlation_pct", 0.0) / 100.0, cfg.get("loss"), random.Random(seed))

    def _standard(self) -> float:
        if self.distribution == "uniform":
            return self.rng.uniform(-math.sqrt(3), math.sqrt(3))
        if self.distribution == "pareto" or (self.distribution == "paretonormal" and self.rng.random() < 0.25):
            return (self.rng.paretovariate(3.0) - 1.5) / math.sqrt(0.75)  # Pareto(α=3) scaled to mean 0, sd 1
        return self.rng.gauss(0.0, 1.0)

    def delay_s(self) -> float:
        if not self.jitter_ms:
            return self.delay_ms / 1000.0
        rho = self.correlation
        self._z = rho * self._z + math.sqrt(1 - rho * rho) * self._standard()
        return max(0.0, self.delay_ms + self.jitter_ms * self._z) / 1000.0

    def lost(self) -> bool:
        spec = self.loss
        if not spec:
            return False
        if spec["model"] == "gilbert_elliott":
            if self._bad and self.rng.random() < spec["r_pct"] / 100.0:
                self._bad = False
            elif not self._bad and self.rng.random() < spec["p_pct"] / 100.0:
                self._bad = True
            p = (spec["bad_loss_pct"] if self._bad else spec["good_loss_pct"]) / 100.0
            return self.rng.random() < p
        # Correlated random loss: with probability ρ repeat the previous outcome (netem's semantics).
        rho = spec.get("correlation_pct", 0.0) / 100.0
        if self.rng.random() < rho:
            return self._last_lost
        self._last_lost = self.rng.random() < spec["pct"] / 100.0
        return self._last_lost
