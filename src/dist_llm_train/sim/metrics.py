"""What both engines count, and the message sizes they count it in.

Update sizes are not a formula: the configured codec from `training.codecs` encodes a vector of the model's
size once, and its payload (plus the per-message framing) is what every push weighs. Past 4 M parameters the
codec runs on 4 M and the size is scaled, which is exact for every codec but int8's last partial chunk.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from dist_llm_train.sim.config import SimConfig

_SAMPLE_MAX = 4_000_000


@dataclass(frozen=True)
class Sizes:
    pull_bytes: int
    push_bytes: int
    small_bytes: int
    control_bytes: int
    params: int


def codec_payload_bytes(codec: str, ratio: float, params: int, seed: int = 0) -> int:
    from dist_llm_train.training.codecs import get_codec

    n = min(params, _SAMPLE_MAX)
    vec = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    enc = get_codec(codec, ratio=ratio).encode(vec)
    meta = len(repr(enc.meta))  # msgpack is smaller still; a handful of bytes either way
    return int(round((enc.nbytes + meta) * params / n))


def message_sizes(cfg: SimConfig) -> Sizes:
    p = cfg.payload
    params = cfg.param_count
    push = codec_payload_bytes(p.codec, p.codec_ratio, params, cfg.seed)
    return Sizes(pull_bytes=4 * params + p.header_bytes, push_bytes=push + p.header_bytes,
                 small_bytes=p.header_bytes, control_bytes=p.control_bytes, params=params)


@dataclass
class DataStats:
    publish_times: list[float] = field(default_factory=list)
    updates_per_version: list[int] = field(default_factory=list)
    members_per_version: list[int] = field(default_factory=list)
    timed_out_rounds: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    staleness_applied: Counter[int] = field(default_factory=Counter)
    staleness_rejected: Counter[int] = field(default_factory=Counter)
    pulls: int = 0
    pushes_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    compute_s: float = 0.0
    step_time_sum_s: float = 0.0
    steps: int = 0

    def add_outcome(self, outcome: str, staleness: int) -> None:
        self.outcomes[outcome] += 1
        if outcome in ("APPLIED", "BUFFERED"):
            self.staleness_applied[staleness] += 1
        elif outcome == "STALE_REJECTED":
            self.staleness_rejected[staleness] += 1


class Throughput:
    """Per-slot EWMA of samples/s, updated as the controller's `record_telemetry` would."""

    def __init__(self, capacity: int, alpha: float, batch_size: int) -> None:
        self.alpha = alpha
        self.batch = batch_size
        self.ewma = np.full(capacity, np.nan)
        self._dirty: set[int] = set()

    def observe(self, slots: np.ndarray, step_time_s: np.ndarray) -> None:
        rate = self.batch / np.maximum(step_time_s, 1e-9)
        prev = self.ewma[slots]
        self.ewma[slots] = np.where(np.isnan(prev), rate, self.alpha * rate + (1 - self.alpha) * prev)
        self._dirty.update(slots.tolist())

    def observe_1(self, slot: int, step_time_s: float) -> None:
        rate = self.batch / max(step_time_s, 1e-9)
        prev = self.ewma[slot]
        self.ewma[slot] = rate if np.isnan(prev) else self.alpha * rate + (1 - self.alpha) * prev
        self._dirty.add(slot)

    def take(self) -> dict[int, float]:
        out = {s: float(self.ewma[s]) for s in sorted(self._dirty)}
        self._dirty.clear()
        return out
