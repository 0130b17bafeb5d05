"""The report folder every run leaves behind: config, metrics CSV, JSON summary, markdown, plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_llm_train.config import Config, TrainingConfig
from dist_llm_train.core.aggregation import aggregation_health
from dist_llm_train.core.types import JobStats

CSV_COLUMNS = [
    "wall_time",
    "worker",
    "step",
    "ps_version",
    "loss",
    "step_time_s",
    "compute_time_s",
    "samples_per_s",
    "tokens_per_s",
    "bytes_sent",
    "bytes_received",
    "push_outcome",
]


@dataclass
class RunSummary:
    run_id: str
    run_dir: str
    initial_loss: float
    final_loss: float
    loss_floor: float | None
    steps: int
    workers: int
    bytes_sent: int
    bytes_received: int
    wall_seconds: float
    mode: str
    transport: str
    model: str
    job_state: str
    dead_workers: list[str] = field(default_factory=list)
    reassignments: int = 0
    profile: str | None = None  # the netem profile every link was shaped with (None: unshaped loopback)
    shaping: str = "none"
    links: list[dict[str, Any]] = field(default_factory=list)  # netem: shaped links, configured vs measured
    links_out_of_tolerance: list[str] = field(default_factory=list)  # worker/class whose RTT drifted (busy host)
    strategy: dict[str, Any] = field(default_factory=dict)  # strategy, codec, rule, attack, DP, bytes
    # Churn of transient workers (an availability trace): events applied, goodput, lost updates, short rounds.
    availability: dict[str, Any] = field(default_factory=dict)
    # Supervised restarts of the PS and the controller: policy, counts, what each cost (embedded.supervision).
    restarts: dict[str, Any] = field(default_factory=dict)
    ps_shards: int = 1  # parameter-server processes, each holding one slice of the parameters (core.sharding)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _bytes_per_worker(rows: list[dict[str, Any]], key: str) -> int:
    """Workers report cumulative byte counters; the run's total is the sum of each worker's last value."""
    last: dict[str, int] = {}
    for r in rows:
        last[str(r.get("worker", ""))] = max(last.get(str(r.get("worker", "")), 0), int(r.get(key, 0) or 0))
    return sum(last.values())


def total_bytes(rows: list[dict[str, Any]]) -> tuple[int, int]:
    return _bytes_per_worker(rows, "bytes_sent"), _bytes_per_worker(rows, "bytes_received")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: float(r.get("wall_time") or 0.0)):
            writer.writerow(r)


def _loss_by_version(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    by_version: dict[int, list[float]] = {}
    for r in rows:
        if r.get("loss") is None or r.get("ps_version") is None:
            continue
        by_version.setdefault(int(r["ps_version"]), []).append(float(r["loss"]))
    versions = sorted(by_version)
    return versions, [sum(by_version[v]) / len(by_version[v]) for v in versions]


def plot_loss(path: Path, rows: list[dict[str, Any]], summary: RunSummary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions, losses = _loss_by_version(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(versions, losses, label="training loss (mean over workers)")
    if summary.loss_floor is not None:
        ax.axhline(summary.loss_floor, color="grey", linestyle="--", label=f"entropy floor {summary.loss_floor:.3f}")
    ax.axhline(summary.final_loss, color="green", linestyle=":", label=f"final eval loss {summary.final_loss:.3f}")
    ax.set_xlabel("parameter version (global step)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{summary.model}, {summary.workers} workers, {summary.mode} ({summary.transport})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_summary(s: RunSummary) -> str:
    floor = f"{s.loss_floor:.4f}" if s.loss_floor is not None else "unknown (text corpus)"
    lines = [
        f"# Run {s.run_id}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| model | {s.model} |",
        f"| mode / transport | {s.mode} / {s.transport} |",
        f"| links | {s.profile + ' (' + s.shaping + ')' if s.profile else 'unshaped loopback'} |",
        *([f"| links out of tolerance (host too busy to keep their timing) | "
           f"{', '.join(s.links_out_of_tolerance) or 'none'} |"] if s.profile else []),
        f"| workers | {s.workers} |",
        f"| global steps (PS versions) | {s.steps} |",
        f"| initial eval loss | {s.initial_loss:.4f} |",
        f"| final eval loss | {s.final_loss:.4f} |",
        f"| loss floor (entropy rate) | {floor} |",
        f"| bytes sent by workers | {s.bytes_sent:,} |",
        f"| bytes received by workers | {s.bytes_received:,} |",
        f"| wall clock | {s.wall_seconds:.1f} s |",
        f"| job state | {s.job_state} |",
        f"| dead workers | {', '.join(s.dead_workers) or 'none'} |",
        f"| task reassignments | {s.reassignments} |",
        "",
        "![loss](loss.png)",
        "",
        *strategy_markdown(s.strategy),
        *availability_markdown(s.availability),
        *restarts_markdown(s.restarts),
    ]
    return "\n".join(lines)


# -- the algorithm: what ran, bytes per class, privacy spent, per-worker acceptance --------------------------
WIRE_BYTE_COUNTERS = (
    "bytes_received_gradient",
    "raw_bytes_gradient",
    "bytes_received_pseudo_gradient",
    "raw_bytes_pseudo_gradient",
    "params_bytes_sent",
    "params_delta_bytes_sent",
)


def strategy_summary(t: TrainingConfig, stats: JobStats | None, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run report's strategy section: `TrainingConfig.describe` + wire bytes per class (as the PS
    counted them) + per-worker acceptance."""
    releases = max([stats.version if stats else 0, *(int(r.get("step") or 0) for r in rows)])
    counters = stats.counters if stats is not None else {}
    workers = [
        {**asdict(w), "acceptance_rate": w.acceptance_rate} for w in (stats.workers if stats is not None else [])
    ]
    wire = {k: int(counters.get(k, 0)) for k in WIRE_BYTE_COUNTERS}
    health = aggregation_health(counters)
    return {**t.describe(releases), "wire_bytes": wire, "workers": workers, "aggregation_health": health}


def strategy_markdown(st: dict[str, Any]) -> list[str]:
    """The strategy section: what ran, wire bytes per class, privacy spent, per-worker acceptance."""
    if not st:
        return []
    dp = st.get("dp", {})
    wire = st.get("wire_bytes", {})
    attack = st.get("attack")
    lines = [
        "## Strategy",
        "",
        "| figure | value |",
        "|---|---|",
        f"| strategy | {st.get('strategy')} |",
        f"| codec (error feedback) | {st.get('codec')} ({'on' if st.get('error_feedback') else 'off'}) |",
        f"| aggregation | {st.get('aggregation')} {st.get('aggregation_params') or ''} |",
        f"| attack | {attack if attack else 'none'} |",
    ]
    health = st.get("aggregation_health")
    if health:
        lines.append(
            f"| short rounds (fewer updates than members) | {health['short_rounds']} |"
        )
        lines.append(
            f"| rounds the rule's precondition failed ({health['fallback_rule']} used) | "
            f"{health['fallback_rounds']} |"
        )
    for key, value in wire.items():
        lines.append(f"| wire bytes: {key} | {value:,} |")
    if dp.get("enabled"):
        lines.append(
            f"| differential privacy | {dp['mode']}, z={dp['noise_multiplier']}, clip={dp['clip']}: "
            f"ε = {dp['epsilon']:.3g} at δ = {dp['delta']:g} after {dp['releases']} releases |"
        )
    else:
        lines.append("| differential privacy | off |")
    workers = st.get("workers", [])
    if workers:
        lines += [
            "",
            "| worker | pushes | accepted | rejected | acceptance | staleness bound | mean staleness |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {w['worker_id']} | {w['pushes']} | {w['accepted']} | {w['rejected']} | "
            f"{w['acceptance_rate']:.0%} | {w['staleness_bound']} | {w['mean_staleness']:.2f} |"
            for w in workers
        ]
    return [*lines, ""]


def availability_markdown(av: dict[str, Any]) -> list[str]:
    """The churn section: what the availability trace did to the run (empty without a trace)."""
    if not av:
        return []
    goodput = av.get("goodput")
    lines = [
        "## Availability (transient workers)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| trace | {av['trace'].get('source') or 'inline'} ({av['trace'].get('sessions')} sessions) |",
        f"| leaves / joins applied | {av.get('leaves')} / {av.get('joins')} |",
        f"| offered worker-seconds | {av.get('offered_worker_s', 0.0):.1f} |",
        f"| compute of accepted updates | {av.get('accepted_compute_s', 0.0):.1f} s |",
        f"| goodput | {'-' if goodput is None else f'{goodput:.1%}'} |",
        f"| updates lost to leaves (at most) | {av.get('updates_lost_to_leaves')} |",
        f"| rounds closed short by a departure | {av.get('rounds_closed_by_departure')} |",
        "",
        "| worker | action | trace time (s) | applied (s) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {e['worker']} | {e['action']}{' (failed)' if e.get('error') else ''} | {e['scheduled_s']:.2f} | "
        f"{e['applied_s']:.2f} |"
        for e in av.get("events", [])
    ]
    return [*lines, ""]


def restarts_markdown(rs: dict[str, Any]) -> list[str]:
    """The restarts section: which services were restarted, when, and what each restart cost."""
    if not rs or not rs.get("events"):
        return []
    counts = ", ".join(f"{name} {n}" for name, n in rs.get("counts", {}).items())
    lines = [
        "## Supervised restarts",
        "",
        "| figure | value |",
        "|---|---|",
        f"| restarts | {counts} (at most {rs['policy']['max_restarts']} each) |",
        f"| checkpoint every | {rs.get('checkpoint_every')} versions |",
        f"| most versions lost to a PS restart (seen) | {rs.get('max_versions_lost')} |",
        f"| updates refused as ahead of a restarted PS (recomputed) | {rs.get('updates_refused_after_restart')} |",
        f"| failed task attempts | {rs.get('task_attempts_failed')} |",
        "",
        "| service | restart | exit code | died (s) | back (s) | version seen before | resumed at | lost |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def shown(value: Any) -> str:
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    keys = ("service", "restart", "exit_code", "died_s", "ready_s", "version_seen_before", "version_resumed",
            "versions_lost")
    lines += ["| " + " | ".join(shown(e.get(k)) for k in keys) + " |" for e in rs["events"]]
    return [*lines, ""]


def write_report(run_dir: Path, cfg: Config, rows: list[dict[str, Any]], summary: RunSummary) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # Never a secret in the run folder (a config may carry one; the run itself uses its own, docs/security.md).
    secrets = {"controller": {"cluster_secret", "auth_token"}, "paramserver": {"cluster_secret"}}
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", exclude=secrets), sort_keys=False)
    )
    write_metrics_csv(run_dir / "metrics.csv", rows)
    (run_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    (run_dir / "summary.md").write_text(markdown_summary(summary))
    plot_loss(run_dir / "loss.png", rows, summary)
