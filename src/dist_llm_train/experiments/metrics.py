"""Reading a run's `metrics.csv` and the figures that need nothing but it.

Every row is one worker step: when it finished (`wall_time`, Unix seconds), the PS version it produced or
joined, its training loss, how long the step took and how much of that was compute, and the worker's
*cumulative* byte counters. The run's clock starts when the first step started (first row's wall time minus
its step time), so service start-up, which has nothing to do with the training strategy, is not charged.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("wall_time", "worker", "step", "ps_version", "loss", "step_time_s", "compute_time_s",
            "bytes_sent", "bytes_received")


class MetricsError(ValueError):
    """A metrics.csv is missing, lacks a column, or holds a value that is not a number."""


@dataclass(frozen=True)
class Row:
    wall_time: float
    worker: str
    step: int
    ps_version: int
    loss: float | None
    step_time_s: float
    compute_time_s: float
    bytes_sent: int
    bytes_received: int


def _num(raw: str | None, name: str, line: int) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise MetricsError(f"line {line}: {name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[Row]:
    """Rows sorted by wall time; rows without a wall time or version are dropped (they cannot be placed)."""
    if not path.is_file():
        raise MetricsError(f"metrics file not found: {path}")
    rows: list[Row] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise MetricsError(f"{path}: missing columns {missing}")
        for line, rec in enumerate(reader, start=2):
            vals = {k: _num(rec.get(k), k, line) for k in REQUIRED if k != "worker"}
            if vals["wall_time"] is None or vals["ps_version"] is None:
                continue
            rows.append(Row(
                wall_time=float(vals["wall_time"] or 0.0),
                worker=str(rec.get("worker") or ""),
                step=int(vals["step"] or 0),
                ps_version=int(vals["ps_version"] or 0),
                loss=vals["loss"],
                step_time_s=float(vals["step_time_s"] or 0.0),
                compute_time_s=float(vals["compute_time_s"] or 0.0),
                bytes_sent=int(vals["bytes_sent"] or 0),
                bytes_received=int(vals["bytes_received"] or 0),
            ))
    rows.sort(key=lambda r: r.wall_time)
    return rows


def start_time(rows: list[Row]) -> float:
    """When the first training step began: the earliest `wall_time - step_time_s`."""
    if not rows:
        raise MetricsError("no telemetry rows")
    return min(r.wall_time - r.step_time_s for r in rows)


@dataclass(frozen=True)
class Series:
    """One point per telemetry row (in time order): x in three units, y the windowed mean loss.

    `bytes` is everything the workers sent plus everything they received up to that row (both directions of
    every link), from each worker's latest cumulative counters.
    """

    step: list[int]
    wall_s: list[float]
    bytes: list[int]
    loss: list[float]


def loss_series(rows: list[Row], window: int) -> Series:
    """Windowed mean loss; a point appears only once `window` rows with a loss have been seen."""
    if window < 1:
        raise ValueError("window must be >= 1")
    t0 = start_time(rows) if rows else 0.0
    latest: dict[str, int] = {}
    recent: list[float] = []
    out = Series([], [], [], [])
    for r in rows:
        latest[r.worker] = max(latest.get(r.worker, 0), r.bytes_sent + r.bytes_received)
        if r.loss is None:
            continue
        recent.append(r.loss)
        if len(recent) > window:
            recent.pop(0)
        if len(recent) == window:
            out.step.append(r.ps_version)
            out.wall_s.append(r.wall_time - t0)
            out.bytes.append(sum(latest.values()))
            out.loss.append(sum(recent) / window)
    return out


@dataclass(frozen=True)
class TargetHit:
    """Where the windowed loss first reached the target: seconds since the first step, bytes, PS version."""

    time_s: float
    bytes: int
    step: int
    loss: float


def first_hit(series: Series, target: float) -> TargetHit | None:
    for i, loss in enumerate(series.loss):
        if loss <= target:
            return TargetHit(series.wall_s[i], series.bytes[i], series.step[i], loss)
    return None


def training_wall_s(rows: list[Row]) -> float:
    return rows[-1].wall_time - start_time(rows) if rows else 0.0


def total_bytes(rows: list[Row]) -> tuple[int, int]:
    """(sent, received) summed over workers' last cumulative counters."""
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    for r in rows:
        sent[r.worker] = max(sent.get(r.worker, 0), r.bytes_sent)
        received[r.worker] = max(received.get(r.worker, 0), r.bytes_received)
    return sum(sent.values()), sum(received.values())


def compute_utilisation(rows: list[Row], workers: int) -> float | None:
    """Share of the workers' wall time spent computing: Σ compute_time_s / (training wall × workers).

    `workers` is the configured count, so a worker that died or never got work counts as idle.
    """
    wall = training_wall_s(rows)
    if wall <= 0 or workers < 1:
        return None
    return sum(r.compute_time_s for r in rows) / (wall * workers)
