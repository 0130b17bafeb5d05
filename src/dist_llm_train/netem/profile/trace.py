"""Mahimahi packet-delivery traces → rate segments.

A Mahimahi trace (mm-link) is a text file of non-decreasing integer milliseconds; each line is one opportunity to
deliver an MTU-sized (1500-byte) packet, several lines may share a millisecond, and the trace loops when it ends.
Kernel shapers cannot follow per-packet opportunities, so we average them over fixed windows: a window with k
opportunities becomes a segment of rate k·MTU·8 / window. A window with none becomes a near-stall (the lowest rate
the shapers accept) rather than a zero rate, which htb cannot express.
"""

from __future__ import annotations

from pathlib import Path

from dist_llm_train.netem.profile.schema import LinkOverride, ProfileError, Segment, TraceSchedule

MIN_RATE_MBIT = 0.008  # 1 kB/s: what an empty trace window becomes


def parse_mahimahi(text: str, source: str = "<trace>") -> list[int]:
    """Parse trace text into delivery times in ms; errors name the line."""
    times: list[int] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            t = int(line)
        except ValueError:
            raise ProfileError(f"{source}:{lineno}: expected an integer millisecond, got {line!r}") from None
        if t < 0:
            raise ProfileError(f"{source}:{lineno}: negative time {t}")
        if times and t < times[-1]:
            raise ProfileError(f"{source}:{lineno}: time {t} goes backwards (previous {times[-1]})")
        times.append(t)
    if not times:
        raise ProfileError(f"{source}: trace has no delivery opportunities")
    return times


def trace_to_segments(times: list[int], window_ms: int = 1000, mtu_bytes: int = 1500) -> list[Segment]:
    """Average delivery opportunities over windows; the trace period is its last timestamp (at least 1 ms)."""
    period = max(times[-1], 1)
    n_windows = max(1, -(-period // window_ms))
    counts = [0] * n_windows
    for t in times:
        counts[min(t // window_ms, n_windows - 1)] += 1
    segments = []
    for i, k in enumerate(counts):
        span_ms = min(window_ms, period - i * window_ms) if i == n_windows - 1 else window_ms
        span_ms = max(span_ms, 1)
        rate = max(k * mtu_bytes * 8 / (span_ms / 1000.0) / 1e6, MIN_RATE_MBIT)
        segments.append(
            Segment(duration_s=span_ms / 1000.0, link=LinkOverride(rate_mbit=round(rate, 6)), label=f"trace[{i}]")
        )
    return segments


def load_trace_segments(trace: TraceSchedule, base_dir: Path | None = None) -> list[Segment]:
    """Segments for a TraceSchedule, reading `file` relative to the profile's directory when relative."""
    if trace.inline is not None:
        return trace_to_segments(parse_mahimahi("\n".join(map(str, trace.inline)), "<inline trace>"),
                                 trace.window_ms, trace.mtu_bytes)
    assert trace.file is not None
    path = Path(trace.file)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ProfileError(f"schedule.trace.file: not found: {path}")
    return trace_to_segments(parse_mahimahi(path.read_text(), str(path)), trace.window_ms, trace.mtu_bytes)
