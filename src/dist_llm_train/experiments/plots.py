"""PNG plots of a grid with matplotlib's Agg backend (no display needed).

Loss curves show one run per cell (its first successful run) so the figure stays readable; the bar charts show
the mean over every run that reached the target with the standard deviation as error bar, and mark cells that
never reached it instead of drawing a zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_llm_train.experiments.figures import default_window
from dist_llm_train.experiments.grid import Target
from dist_llm_train.experiments.metrics import MetricsError, Series, loss_series, read_metrics

LOG_SPREAD = 20.0
"""Bars switch to a log axis only when the cells differ by more than this factor (compression grids)."""

if TYPE_CHECKING:
    from dist_llm_train.experiments.report import Group

CURVES = (
    ("loss_vs_step.png", "step", "PS version (global step)", False),
    ("loss_vs_wall.png", "wall_s", "wall clock since the first step (s)", False),
    ("loss_vs_bytes.png", "bytes", "bytes sent + received by all workers", True),
)


def _first_series(group: Group, target: Target) -> tuple[Series, dict[str, Any]] | None:
    for row in sorted(group.ok, key=lambda r: int(r.get("repeat") or 0)):
        if not row.get("run_dir"):
            continue
        try:
            rows = read_metrics(Path(str(row["run_dir"])) / "metrics.csv")
        except MetricsError:
            continue
        workers = int(row.get("workers") or 1)
        series = loss_series(rows, target.window or default_window(workers))
        if series.loss:
            return series, row
    return None


def _curves(out: Path, groups: Sequence[Group], target: Target) -> list[str]:
    import matplotlib.pyplot as plt

    found = [(g, s) for g in groups if (s := _first_series(g, target)) is not None]
    if not found:
        return []
    targets = {r.get("target_loss") for _, (_, r) in found}
    floors = {r.get("loss_floor") for _, (_, r) in found}
    # One target line only when every cell shares it.
    target_line = next(iter(targets)) if len(targets) == 1 else None
    floor_line = next(iter(floors)) if len(floors) == 1 else None
    written = []
    for name, attr, xlabel, logx in CURVES:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for group, (series, _) in found:
            ax.plot(getattr(series, attr), series.loss, label=group.label, linewidth=1.2)
        if target_line is not None:
            ax.axhline(float(target_line), color="black", linestyle=":", label="target")
        if floor_line is not None:
            ax.axhline(float(floor_line), color="grey", linestyle="--", label="entropy floor")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss, windowed mean (nats)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


def _bars(out: Path, groups: Sequence[Group], field: str, name: str, ylabel: str, scale: float,
          log: bool) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2), 4.5))
    positions = list(range(len(groups)))
    for i, group in enumerate(groups):
        stat = group.stat(field)
        if stat["mean"] is None:
            ax.text(i, 0.5, "not reached", rotation=90, ha="center", va="bottom",
                    transform=ax.get_xaxis_transform())
            continue
        mean, std = float(stat["mean"]) * scale, float(stat["std"] or 0.0) * scale
        ax.bar(i, mean, yerr=std if stat["n"] and int(stat["n"]) > 1 else None, capsize=4, color="tab:blue")
    ax.set_xticks(positions)
    ax.set_xticklabels([g.label for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    means = [float(m) for g in groups if (m := g.stat(field)["mean"])]
    if log and means and max(means) / min(means) > LOG_SPREAD:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(means) / 3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def write_plots(out: Path, groups: Sequence[Group], target: Target) -> list[str]:
    """Write every plot into `out` and return their file names (relative, for report.md)."""
    import matplotlib

    matplotlib.use("Agg")
    if not groups:
        return []
    written = _curves(out, groups, target)
    if any(g.stat("time_to_target_s")["n"] for g in groups):
        written.append(_bars(out, groups, "time_to_target_s", "time_to_target.png", "time to target (s)",
                             1.0, False))
        written.append(_bars(out, groups, "bytes_to_target", "bytes_to_target.png", "MB to target",
                             1e-6, True))
    return written
