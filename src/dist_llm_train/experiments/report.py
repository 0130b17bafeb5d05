"""The grid's outputs besides runs.csv: summary.json (every run plus per-cell statistics) and report.md.

Runs are grouped by cell *ignoring the seed axis*, so a group's spread covers seeds and repeats alike. Means
are over the runs that have the figure: time- and bytes-to-target over the runs that reached the target (the
`reached` column says how many did), so a figure is never averaged with a made-up value for a miss.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.grid import Cell, ResolvedGrid
from dist_llm_train.experiments.machine import describe_machine, machine_info
from dist_llm_train.experiments.plots import write_plots

STAT_FIELDS = ("final_loss", "time_to_target_s", "bytes_to_target", "steps_to_target", "compute_utilisation",
               "round_measured_s", "round_bound_s", "measured_over_bound", "train_wall_s", "bytes_sent")


@dataclass
class Group:
    """The runs of one cell (all seeds and repeats)."""

    label: str
    labels: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") == "ok"]

    def stat(self, name: str) -> dict[str, float | int | None]:
        values = [float(r[name]) for r in self.ok if r.get(name) is not None]
        if not values:
            return {"mean": None, "std": None, "n": 0}
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def group_rows(rows: list[dict[str, Any]], cells: list[Cell], varying: list[str]) -> list[Group]:
    by_id = {c.cell_id: c for c in cells}
    groups: dict[str, Group] = {}
    for row in rows:
        cell = by_id.get(str(row.get("cell_id")))
        if cell is None:
            continue
        labels = {k: v for k, v in cell.labels.items() if k != "seed"}
        shown = [k for k in varying if k != "seed"]
        label = " ".join(f"{k}={labels[k]}" for k in shown if k in labels) or "all"
        groups.setdefault(label, Group(label, labels)).rows.append(row)
    return list(groups.values())


def _pm(stat: dict[str, float | int | None], scale: float = 1.0, digits: int = 3) -> str:
    mean, std, n = stat["mean"], stat["std"], stat["n"]
    if mean is None or not n:
        return "n/a"
    if n == 1 or std is None:
        return f"{mean * scale:.{digits}g}"
    return f"{mean * scale:.{digits}g} ± {std * scale:.{digits - 1}g}"


def _table(groups: list[Group]) -> list[str]:
    base_bytes = groups[0].stat("bytes_to_target")["mean"] if groups else None
    lines = [
        "| cell | runs ok | final eval loss | reached target | time to target (s) | MB to target | "
        "× fewer bytes than first cell | compute util. (%) | round measured (ms) | bound (ms) | "
        "measured / bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in groups:
        b = g.stat("bytes_to_target")["mean"]
        ratio = f"{base_bytes / b:.3g}" if base_bytes and b else "n/a"
        reached = f"{g.stat('time_to_target_s')['n']}/{len(g.ok)}"
        lines.append(
            f"| {g.label} | {len(g.ok)}/{len(g.rows)} | {_pm(g.stat('final_loss'), digits=4)} | {reached} | "
            f"{_pm(g.stat('time_to_target_s'))} | {_pm(g.stat('bytes_to_target'), 1e-6)} | {ratio} | "
            f"{_pm(g.stat('compute_utilisation'), 100)} | {_pm(g.stat('round_measured_s'), 1e3)} | "
            f"{_pm(g.stat('round_bound_s'), 1e3)} | {_pm(g.stat('measured_over_bound'))} |"
        )
    return lines


def render_markdown(rg: ResolvedGrid, groups: list[Group], rows: list[dict[str, Any]], backend: str,
                    machine: str, when: str, plots: list[str]) -> str:
    g = rg.grid
    bound_profiles = sorted({str(r.get("bound_profile")) for r in rows if r.get("bound_profile")})
    lines = [
        f"# Experiment grid `{g.name}`",
        "",
        g.description.strip() or "",
        "",
        f"- generated: {when} on {machine}",
        f"- backend: {backend}; runs: {len(rows)} ({sum(r.get('status') == 'ok' for r in rows)} ok)",
        f"- target: {g.target.describe()} (windowed mean of the training loss, see docs/experiments.md)",
        f"- link-physics bound computed with: {', '.join(bound_profiles) or 'n/a'}",
        "",
        "Mean ± sample standard deviation over seeds and repeats; time and bytes to target over the runs "
        "that reached it.",
        "",
        *_table(groups),
        "",
    ]
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["## Refused and failed runs", "", "| run | status | message |", "|---|---|---|"]
        for r in failed:
            msg = str(r.get("error") or "").replace("|", "\\|")
            lines.append(f"| {r['run_key']} | {r['status']} | {msg} |")
        lines.append("")
    notes = sorted({str(r["note"]) for r in rows if r.get("note")})
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    if plots:
        lines += ["## Plots", "", *(f"![{Path(p).stem}]({p})" for p in plots), ""]
    return "\n".join(lines)


def write_outputs(rg: ResolvedGrid, out: Path, rows: list[dict[str, Any]], planned_cells: list[Cell],
                  backend: str) -> None:
    varying = rg.varying_axes(planned_cells)
    groups = group_rows(rows, planned_cells, varying)
    info = machine_info()
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    plots = write_plots(out, groups, rg.grid.target)
    summary = {
        "grid": rg.grid.name,
        "description": rg.grid.description,
        "source": str(rg.source) if rg.source else None,
        "generated_at": when,
        "machine": info,
        "backend": backend,
        "target": rg.grid.target.model_dump(),
        "varying_axes": varying,
        "runs": rows,
        "cells": [
            {"label": grp.label, "labels": grp.labels, "runs": len(grp.rows), "ok": len(grp.ok),
             "stats": {name: grp.stat(name) for name in STAT_FIELDS}}
            for grp in groups
        ],
        "plots": plots,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    text = render_markdown(rg, groups, rows, backend, describe_machine(info), when, plots)
    (out / "report.md").write_text(text)
