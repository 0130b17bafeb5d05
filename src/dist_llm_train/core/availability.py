"""When each worker of a transient pool (volunteer machines, preemptible VMs) is there: availability traces.

A trace is a list of sessions `(worker, join_s, leave_s)`: worker `worker` (an index 0..N-1, or its name
`worker-<i>`) is available from `join_s` until `leave_s` seconds after the job starts (virtual seconds in the
simulator, wall seconds in an embedded run); `leave_s` None means it stays to the end. A worker may have
several sessions, which must not overlap. A worker with no session at all is not transient: it is there for
the whole run. A worker whose first session starts after 0 is absent until then.

Three generators produce the same model from a few numbers, seeded (same seed and spec, same trace):
`ExponentialSessions` (memoryless up and down times), `DiurnalPattern` (the fraction of the pool that is up
follows a day curve whose period can be compressed for tests) and `CorrelatedPreemption` (at given or Poisson
times a fixed fraction of the pool leaves together and comes back after a delay).

This module is pure (numpy + pydantic, no I/O): parsing takes text or mappings; the config layer reads files
(`config.AvailabilityConfig`). Docs: docs/simulation.md, "Churn of transient workers".
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

_WORKER_NAME = re.compile(r"^worker-(\d+)$")
JOIN, LEAVE = "join", "leave"


class TraceError(ValueError):
    """An availability trace is invalid; the message names the row (file line or list position)."""


def parse_worker(value: Any) -> int:
    """A worker reference as an index: 3, "3" or "worker-3"."""
    if isinstance(value, bool):
        raise ValueError(f"worker {value!r} is not an index or a name worker-<i>")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        match = _WORKER_NAME.match(text)
        if match:
            return int(match.group(1))
        if text.isdigit():
            return int(text)
    raise ValueError(f"worker {value!r} is not an index or a name worker-<i>")


class Session(BaseModel):
    """Worker `worker` is available from `join_s` to `leave_s` (None: to the end of the run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker: int
    join_s: float
    leave_s: float | None = None

    @field_validator("worker", mode="before")
    @classmethod
    def _worker_ref(cls, value: Any) -> int:
        index = parse_worker(value)
        if index < 0:
            raise ValueError(f"worker index {index} is negative")
        return index

    @field_validator("join_s", "leave_s")
    @classmethod
    def _time(cls, value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise ValueError(f"time {value} is not finite (leave leave_s empty to stay to the end)")
        if value < 0:
            raise ValueError(f"time {value:g} s is negative (times are seconds after the job starts)")
        return value

    @model_validator(mode="after")
    def _leave_after_join(self) -> Session:
        if self.leave_s is not None and self.leave_s <= self.join_s:
            raise ValueError(f"leave_s {self.leave_s:g} is not after join_s {self.join_s:g}")
        return self

    def overlap_s(self, start: float, end: float) -> float:
        """Seconds of this session inside [start, end]."""
        stop = end if self.leave_s is None else min(self.leave_s, end)
        return max(0.0, stop - max(self.join_s, start))


class AvailabilityTrace(BaseModel):
    """Sessions of workers 0..`workers`-1; `source` says where they came from (a file, a generator)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: Annotated[int, Field(ge=1, le=10_000_000)]
    sessions: list[Session]
    source: str = ""

    @model_validator(mode="after")
    def _rows_consistent(self, info: ValidationInfo) -> AvailabilityTrace:
        labels = (info.context or {}).get("labels") if info is not None else None
        problems = trace_problems(self.workers, self.sessions, labels)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # -- questions callers ask -----------------------------------------------------------------------------
    @cached_property
    def _by_worker(self) -> dict[int, list[Session]]:
        """Each worker's sessions in time order (built once: a generated trace may hold 10⁵ of them)."""
        out: dict[int, list[Session]] = {}
        for s in self.sessions:
            out.setdefault(s.worker, []).append(s)
        for sessions in out.values():
            sessions.sort(key=lambda s: s.join_s)
        return out

    @property
    def controlled(self) -> set[int]:
        """Workers the trace speaks about; every other worker is there for the whole run."""
        return set(self._by_worker)

    def sessions_of(self, worker: int) -> list[Session]:
        return list(self._by_worker.get(worker, []))

    def present_at_start(self, worker: int) -> bool:
        sessions = self._by_worker.get(worker)
        return sessions is None or sessions[0].join_s == 0

    def events(self) -> list[tuple[float, int, str]]:
        """(time, worker, "join" | "leave") after time 0, in time order; at one instant leaves come first.

        Joins at time 0 are not events: those workers are there from the start."""
        out: list[tuple[float, int, str]] = []
        for s in self.sessions:
            if s.join_s > 0:
                out.append((s.join_s, s.worker, JOIN))
            if s.leave_s is not None:
                out.append((s.leave_s, s.worker, LEAVE))
        return sorted(out, key=lambda e: (e[0], e[2] != LEAVE, e[1]))

    def available_s(self, worker: int, end: float, start: float = 0.0) -> float:
        """Seconds worker `worker` is available inside [start, end]."""
        sessions = self._by_worker.get(worker)
        if sessions is None:
            return max(0.0, end - start)
        return sum(s.overlap_s(start, end) for s in sessions)

    def offered_s(self, end: float, start: float = 0.0) -> float:
        """Worker-seconds the whole pool offers inside [start, end]."""
        per_worker: dict[int, float] = {}
        for s in self.sessions:
            per_worker[s.worker] = per_worker.get(s.worker, 0.0) + s.overlap_s(start, end)
        uncontrolled = self.workers - len(per_worker)
        return sum(per_worker.values()) + uncontrolled * max(0.0, end - start)

    def available_at(self, t: float) -> int:
        """How many workers are available at time t (a session includes its join instant, not its leave)."""
        up = {s.worker for s in self.sessions if s.join_s <= t and (s.leave_s is None or t < s.leave_s)}
        return len(up) + self.workers - len(self._by_worker)

    def describe(self) -> dict[str, Any]:
        """What a report says about the trace."""
        events = self.events()
        return {
            "source": self.source,
            "workers": self.workers,
            "transient_workers": len(self._by_worker),
            "sessions": len(self.sessions),
            "joins": sum(1 for e in events if e[2] == JOIN),
            "leaves": sum(1 for e in events if e[2] == LEAVE),
            "last_event_s": max((e[0] for e in events), default=0.0),
        }

    # -- writing it back ----------------------------------------------------------------------------------
    def to_rows(self) -> list[tuple[int, float, float | None]]:
        return [(s.worker, s.join_s, s.leave_s) for s in sorted(self.sessions, key=lambda s: (s.worker, s.join_s))]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["worker", "join_s", "leave_s"])
        for w, join, leave in self.to_rows():
            writer.writerow([w, repr(join), "" if leave is None else repr(leave)])
        return buf.getvalue()

    def to_mapping(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "sessions": [{"worker": w, "join_s": j, "leave_s": le} for w, j, le in self.to_rows()],
        }


def trace_problems(workers: int, sessions: Sequence[Session], labels: Sequence[str] | None = None) -> list[str]:
    """Every row-level problem: unknown worker indices and overlapping sessions of one worker."""

    def label(i: int) -> str:
        return labels[i] if labels is not None and i < len(labels) else f"row {i + 1}"

    problems = [
        f"{label(i)}: worker {s.worker} does not exist (this run has workers 0..{workers - 1})"
        for i, s in enumerate(sessions)
        if s.worker >= workers
    ]
    by_worker: dict[int, list[int]] = {}
    for i, s in enumerate(sessions):
        by_worker.setdefault(s.worker, []).append(i)
    for w, rows in sorted(by_worker.items()):
        rows.sort(key=lambda i: sessions[i].join_s)
        for prev, cur in zip(rows, rows[1:], strict=False):
            end = sessions[prev].leave_s
            if end is None or sessions[cur].join_s < end:
                until = "the end" if end is None else f"{end:g} s"
                problems.append(
                    f"{label(cur)}: worker {w}'s session from {sessions[cur].join_s:g} s overlaps "
                    f"{label(prev)} (from {sessions[prev].join_s:g} s to {until})"
                )
    return problems


# -- parsing (text and mappings in, a validated trace out) ----------------------------------------------------
def build_trace(
    rows: Sequence[Any], workers: int, labels: Sequence[str] | None = None, source: str = ""
) -> AvailabilityTrace:
    """A trace from rows (mappings {worker, join_s, leave_s} or [worker, join_s, leave_s]); errors name rows."""
    labels = list(labels) if labels is not None else [f"row {i + 1}" for i in range(len(rows))]
    sessions: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if isinstance(row, Sequence) and not isinstance(row, str | bytes):
            if len(row) not in (2, 3):
                raise TraceError(f"{labels[i]}: expected worker, join_s[, leave_s], got {len(row)} values")
            row = {"worker": row[0], "join_s": row[1], "leave_s": row[2] if len(row) == 3 else None}
        if not isinstance(row, dict):
            raise TraceError(f"{labels[i]}: a session is a mapping {{worker, join_s, leave_s}} or a list")
        sessions.append(row)
    try:
        return AvailabilityTrace.model_validate(
            {"workers": workers, "sessions": sessions, "source": source}, context={"labels": labels}
        )
    except ValidationError as err:
        raise TraceError(_format(err, labels)) from None


def _format(err: ValidationError, labels: Sequence[str]) -> str:
    out = []
    for e in err.errors():
        loc = list(e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "sessions" and isinstance(loc[1], int):
            where = labels[loc[1]] if loc[1] < len(labels) else f"row {loc[1] + 1}"
            field = ".".join(str(p) for p in loc[2:])
            out.append(f"{where}: {field + ': ' if field else ''}{msg}")
        elif loc:
            out.append(f"{'.'.join(str(p) for p in loc)}: {msg}")
        else:  # the trace's own check, whose message already names the rows
            out.append(msg)
    return "; ".join(out)


def parse_csv(text: str, workers: int, source: str = "") -> AvailabilityTrace:
    """CSV rows `worker,join_s,leave_s` (a header row and `#` comment lines are skipped; empty leave_s: to the
    end). Errors name the line."""
    rows: list[list[str]] = []
    labels: list[str] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if cells[0].lower() == "worker":
            continue  # the header
        label = f"line {lineno}"
        if len(cells) not in (2, 3):
            raise TraceError(f"{label}: expected worker,join_s,leave_s, got {len(cells)} columns")
        rows.append(cells)
        labels.append(label)
    parsed: list[dict[str, Any]] = []
    for cells, label in zip(rows, labels, strict=True):
        join = _number(cells[1], "join_s", label)
        leave = _number(cells[2], "leave_s", label) if len(cells) == 3 and cells[2] != "" else None
        parsed.append({"worker": cells[0], "join_s": join, "leave_s": leave})
    return build_trace(parsed, workers, labels, source)


def _number(text: str, field: str, label: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TraceError(f"{label}: {field} {text!r} is not a number of seconds") from None


def parse_mapping(data: Any, workers: int, source: str = "") -> AvailabilityTrace:
    """A trace from YAML/JSON data: `{workers: N (optional check), sessions: [...]}` or a bare list of rows."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"workers", "sessions", "source"})
        if unknown:
            raise TraceError(f"unknown keys {unknown} (a trace has workers and sessions)")
        stated = data.get("workers")
        if stated is not None and stated != workers:
            raise TraceError(f"the trace is for {stated} workers but this run has {workers}")
        rows = data.get("sessions")
        source = str(data.get("source") or source)
    else:
        rows = data
    if not isinstance(rows, list):
        raise TraceError("sessions must be a list of rows {worker, join_s, leave_s}")
    return build_trace(rows, workers, source=source)


# -- generators ----------------------------------------------------------------------------------------------
class _Generator(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    horizon_s: Annotated[float, Field(gt=0, le=1e9)] = 3600.0
    """The generator describes [0, horizon_s]; afterwards each worker keeps the state it had at the horizon
    (a session running then lasts to the end). Make it at least the run's length."""


class ExponentialSessions(_Generator):
    """Each worker alternates up and down times drawn from exponentials of means `mean_up_s`, `mean_down_s`.

    `start: stationary` (default) starts each worker up with probability up / (up + down), the long-run
    fraction, so the pool's availability is the same at every time; `start: up` starts every worker up."""

    kind: Literal["exponential"] = "exponential"
    mean_up_s: Annotated[float, Field(gt=0)]
    mean_down_s: Annotated[float, Field(gt=0)]
    start: Literal["stationary", "up"] = "stationary"


class DiurnalPattern(_Generator):
    """The fraction of the pool that is up follows a day curve: a cosine between `min_available` (trough) and
    `max_available` (at `peak_s`, and every `period_s` after), e.g. volunteers' machines idle in the evening.

    Each worker draws one uniform u per period (trough to trough) and is up while the curve is above u: one
    contiguous session around each peak, longer for lower u, so at every instant the expected fraction up is
    exactly the curve. Compress `period_s` (e.g. 60 s) to see several days in a short run."""

    kind: Literal["diurnal"] = "diurnal"
    period_s: Annotated[float, Field(gt=0)] = 86_400.0
    min_available: Annotated[float, Field(ge=0, le=1)] = 0.2
    max_available: Annotated[float, Field(ge=0, le=1)] = 0.9
    peak_s: Annotated[float, Field(ge=0)] | None = None
    """When the curve peaks (default: half a period, midday for a trace that starts at midnight)."""

    @model_validator(mode="after")
    def _ordered(self) -> DiurnalPattern:
        if self.min_available > self.max_available:
            raise ValueError(f"min_available {self.min_available} exceeds max_available {self.max_available}")
        return self

    def available(self, t: float | np.ndarray) -> float | np.ndarray:
        """The curve: the probability a worker is up at time t."""
        mid = (self.max_available + self.min_available) / 2
        amp = (self.max_available - self.min_available) / 2
        return mid + amp * np.cos(2 * np.pi * (np.asarray(t) - self._peak) / self.period_s)

    @property
    def _peak(self) -> float:
        return self.period_s / 2 if self.peak_s is None else self.peak_s


class CorrelatedPreemption(_Generator):
    """At each preemption a fraction of the pool leaves together (a spot-capacity reclaim, a rack's power) and
    comes back `down_s` later. Times are `at_s` (scripted) and/or a Poisson process of rate `rate_per_s`.

    Exactly round(`fraction` × workers) workers (at least one) leave at each event, chosen at random among
    those up at that moment (all of them when fewer are up). Every worker starts up."""

    kind: Literal["preemption"] = "preemption"
    fraction: Annotated[float, Field(gt=0, le=1)]
    down_s: Annotated[float, Field(gt=0)]
    at_s: list[Annotated[float, Field(ge=0)]] = []
    rate_per_s: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _some_times(self) -> CorrelatedPreemption:
        if not self.at_s and self.rate_per_s == 0:
            raise ValueError("give preemption times at_s, a Poisson rate_per_s, or both")
        return self

    def victims(self, workers: int) -> int:
        return max(1, round(self.fraction * workers))


GeneratorSpec = Annotated[ExponentialSessions | DiurnalPattern | CorrelatedPreemption, Field(discriminator="kind")]
_TAGS = {"exponential": 1, "diurnal": 2, "preemption": 3}


def generate(spec: ExponentialSessions | DiurnalPattern | CorrelatedPreemption, workers: int) -> AvailabilityTrace:
    """The trace `spec` describes for `workers` workers. Same spec (seed included), same trace.

    A worker's sessions come from its own random stream (seed, kind, worker), so the first N workers of a
    larger pool have the same sessions as a pool of N (except under correlated preemption, which picks
    victims from the whole pool)."""
    if isinstance(spec, ExponentialSessions):
        rows = _exponential(spec, workers)
    elif isinstance(spec, DiurnalPattern):
        rows = _diurnal(spec, workers)
    else:
        rows = _preemption(spec, workers)
    params = spec.model_dump(exclude={"kind"})
    source = f"{spec.kind}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
    return _trusted(workers, rows, source)


def _trusted(workers: int, rows: Iterable[tuple[int, float, float | None]], source: str) -> AvailabilityTrace:
    """A generated trace is valid by construction; skipping validation keeps 10⁵ sessions cheap (tests check
    generated traces through the validator)."""
    sessions = [Session.model_construct(worker=w, join_s=float(j), leave_s=None if le is None else float(le))
                for w, j, le in rows]
    return AvailabilityTrace.model_construct(workers=workers, sessions=sessions, source=source)


def _rng(spec: _Generator, *key: int) -> np.random.Generator:
    """An independent stream per (seed, generator kind, key), numpy's way: spawn keys of one seed sequence."""
    kind = str(getattr(spec, "kind", ""))
    return np.random.default_rng(np.random.SeedSequence(spec.seed & (2**64 - 1), spawn_key=(_TAGS.get(kind, 0), *key)))


def _exponential(spec: ExponentialSessions, workers: int) -> list[tuple[int, float, float | None]]:
    rows: list[tuple[int, float, float | None]] = []
    p_up = spec.mean_up_s / (spec.mean_up_s + spec.mean_down_s)
    for w in range(workers):
        rng = _rng(spec, w)
        up = spec.start == "up" or bool(rng.random() < p_up)
        t = 0.0
        while t < spec.horizon_s:
            length = float(rng.exponential(spec.mean_up_s if up else spec.mean_down_s))
            end = t + length
            if up and end > t:
                rows.append((w, t, end if end < spec.horizon_s else None))
            t, up = end, not up
    return rows


def _diurnal(spec: DiurnalPattern, workers: int) -> list[tuple[int, float, float | None]]:
    lo, hi, period, peak = spec.min_available, spec.max_available, spec.period_s, spec._peak
    mid, amp = (hi + lo) / 2, (hi - lo) / 2
    # Periods run trough to trough: period k covers [peak + (k - 1/2) P, peak + (k + 1/2) P].
    first = math.floor((0.0 - peak) / period + 0.5)
    last = math.floor((spec.horizon_s - peak) / period + 0.5)
    rows: list[tuple[int, float, float | None]] = []
    for w in range(workers):
        rng = _rng(spec, w)
        intervals: list[tuple[float, float]] = []
        for k in range(first, last + 1):
            u = float(rng.random())
            centre = peak + k * period
            if amp == 0:
                half = period / 2 if u < mid else 0.0
            else:
                c = (u - mid) / amp  # up while cos(2π(t - centre)/P) > c
                half = period / 2 if c <= -1 else (0.0 if c >= 1 else math.acos(c) / (2 * math.pi) * period)
            if half > 0:
                intervals.append((max(0.0, centre - half), min(spec.horizon_s, centre + half)))
        for start, end in _merge(intervals):
            if end > start:
                rows.append((w, start, None if end >= spec.horizon_s else end))
    return rows


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Touching or overlapping intervals as one (a worker up across a trough stays in one session)."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _preemption(spec: CorrelatedPreemption, workers: int) -> list[tuple[int, float, float | None]]:
    rng = _rng(spec)
    times = sorted(t for t in spec.at_s if t < spec.horizon_s)
    if spec.rate_per_s > 0:
        t = 0.0
        while True:
            t += float(rng.exponential(1.0 / spec.rate_per_s))
            if t >= spec.horizon_s:
                break
            times.append(t)
        times.sort()
    back_at = np.zeros(workers)  # when each worker is up again (0: up)
    session_start = [0.0] * workers
    rows: list[tuple[int, float, float | None]] = []
    k = spec.victims(workers)
    for t in times:
        up = np.nonzero(back_at <= t)[0]
        chosen = up if up.size <= k else np.sort(rng.choice(up, size=k, replace=False))
        for w in chosen.tolist():
            if t > session_start[w]:
                rows.append((w, session_start[w], t))
            back = t + spec.down_s
            back_at[w] = back
            session_start[w] = back
    for w in range(workers):
        if session_start[w] < spec.horizon_s:
            rows.append((w, session_start[w], None))
    return rows
