"""What both engines count, and the message sizes they count it in.

Update sizes come from the configured codec (`training.codec`): its exact payload length for the model's size
when that does not depend on the values (every codec but top-k's delta index coding), else its payload on a
vector of the model's size, plus the per-message framing. Past 4 M parameters the value-dependent case runs the
codec on 4 M and scales the size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
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


def codec_payload_bytes(
    codec: str, ratio: float, params: int, seed: int = 0, extra: dict[str, int | float | str] | None = None
) -> int:
    from dist_llm_train.core.codecs import get_codec

    built = get_codec(codec, ratio=ratio, **(extra or {}))
    n = min(params, _SAMPLE_MAX)
    enc = built.encode(np.random.default_rng(seed).standard_normal(n).astype(np.float32))
    meta = len(repr(enc.meta))  # msgpack is smaller still; a handful of bytes either way
    exact = built.payload_nbytes(params)
    return exact + meta if exact is not None else int(round((enc.nbytes + meta) * params / n))


def message_sizes(cfg: SimConfig) -> Sizes:
    p = cfg.payload
    params = cfg.param_count
    # A strategy whose versions each change one region (Streaming DiLoCo's fragments) pushes that region
    # and, without a downlink codec, pulls it back as a lossless slice (core.downlink); sizes of fragment 0.
    region = cfg.strategy.region(0, params)
    pushed = params if region is None else region.stop - region.start
    push = codec_payload_bytes(p.codec, p.codec_ratio, pushed, cfg.seed, p.codec_params)
    if p.downlink_codec != "none":
        pull = codec_payload_bytes(p.downlink_codec, p.downlink_ratio, params, cfg.seed, p.downlink_params)
    else:
        pull = 4 * pushed
    return Sizes(
        pull_bytes=pull + p.header_bytes,
        push_bytes=push + p.header_bytes,
        small_bytes=p.header_bytes,
        control_bytes=p.control_bytes,
        params=params,
    )


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
    # Churn: compute behind the updates the PS took, updates that died with their worker (by cause: a trace's
    # "leave" or a "crash") and the compute spent on them, and rounds a membership shrink closed.
    accepted_compute_s: float = 0.0
    lost_updates: Counter[str] = field(default_factory=Counter)
    lost_compute_s: float = 0.0
    closed_by_departure: int = 0

    def add_outcome(self, outcome: str, staleness: int) -> None:
        self.outcomes[outcome] += 1
        if outcome in ("APPLIED", "BUFFERED"):
            self.staleness_applied[staleness] += 1
        elif outcome == "STALE_REJECTED":
            self.staleness_rejected[staleness] += 1


class Throughput:
    """Per-slot EWMA of samples/s, updated as the controller's `record_telemetry` would.

    Only the capability scheduler reads it, so with any other scheduler (`enabled=False`) nothing is kept."""

    def __init__(self, capacity: int, alpha: float, batch_size: int, enabled: bool = True) -> None:
        self.alpha = alpha
        self.batch = batch_size
        self.enabled = enabled
        self.ewma = np.full(capacity, np.nan)
        self._dirty: set[int] = set()

    def observe(self, slots: np.ndarray, step_time_s: np.ndarray) -> None:
        if not self.enabled:
            return
        rate = self.batch / np.maximum(step_time_s, 1e-9)
        prev = self.ewma[slots]
        self.ewma[slots] = np.where(np.isnan(prev), rate, self.alpha * rate + (1 - self.alpha) * prev)
        self._dirty.update(slots.tolist())

    def observe_1(self, slot: int, step_time_s: float) -> None:
        if not self.enabled:
            return
        rate = self.batch / max(step_time_s, 1e-9)
        prev = self.ewma[slot]
        self.ewma[slot] = rate if np.isnan(prev) else self.alpha * rate + (1 - self.alpha) * prev
        self._dirty.add(slot)

    def take(self) -> dict[int, float]:
        out = {s: float(self.ewma[s]) for s in sorted(self._dirty)}
        self._dirty.clear()
        return out


class TelemetryLog:
    """Per-update telemetry rows, as real workers report them, for the run folder's `metrics.csv`.

    Only kept when asked for (experiment cells are small); past `max_rows` recording stops and `truncated`
    says so, so a 10⁴-worker run cannot fill memory with 10⁷ rows."""

    def __init__(self, max_rows: int = 2_000_000) -> None:
        self.max_rows = max_rows
        self.truncated = False
        self._parts: list[tuple[np.ndarray, ...]] = []
        self._scalars: list[tuple[int, float, float, float, float, float]] = []
        self._n = 0

    def _room(self, n: int) -> bool:
        if self._n + n > self.max_rows:
            self.truncated = True
            return False
        self._n += n
        return True

    def add(
        self,
        slots: np.ndarray,
        at: np.ndarray,
        step_time: np.ndarray,
        compute: np.ndarray,
        version: np.ndarray,
    ) -> None:
        if slots.size and self._room(int(slots.size)):
            no_loss = np.full(slots.size, np.nan)
            self._parts.append((slots.astype(np.int64), at, step_time, compute, version.astype(np.int64), no_loss))

    def add_1(
        self, slot: int, at: float, step_time: float, compute: float, version: int, loss: float = float("nan")
    ) -> None:
        """One update; `loss` is its training loss when the simulation trains (NaN: nothing trained)."""
        if self._room(1):
            self._scalars.append((slot, at, step_time, compute, float(version), loss))

    def rows(self, sizes: Sizes, name: Callable[[int], str]) -> list[dict[str, object]]:
        """Rows in time order with each worker's cumulative step count and byte counters."""
        cols = list(self._parts)
        if self._scalars:
            arr = np.array(self._scalars)
            cols.append(
                (arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4].astype(np.int64), arr[:, 5])
            )
        if not cols:
            return []
        slots, at, step_time, compute, version, loss = (np.concatenate(c) for c in zip(*cols, strict=True))
        order = np.argsort(at, kind="stable")
        steps: Counter[int] = Counter()
        out: list[dict[str, object]] = []
        for i in order.tolist():
            s = int(slots[i])
            steps[s] += 1
            k = steps[s]
            out.append(
                {
                    "wall_time": float(at[i]),
                    "worker": name(s),
                    "step": k,
                    "ps_version": int(version[i]),
                    "loss": "" if np.isnan(loss[i]) else float(loss[i]),
                    "step_time_s": float(step_time[i]),
                    "compute_time_s": float(compute[i]),
                    "samples_per_s": "",
                    "tokens_per_s": "",
                    "bytes_sent": k * sizes.push_bytes,
                    "bytes_received": k * sizes.pull_bytes,
                    "push_outcome": "",
                }
            )
        return out
