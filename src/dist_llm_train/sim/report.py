"""The report folder a simulation leaves, shaped like a real run's: config, summary.json, summary.md, a CSV.

The CSV is per round (`rounds.csv`: version, publish time, round time, updates, members). A real run's
per-update `metrics.csv` (same columns; loss empty unless the run trained) is written only when the simulation
kept telemetry (`simulate(cfg, telemetry=True)`, as experiment cells and trained runs do): at 10⁴ workers × 10³
rounds it would be 10⁷ lines. A trained run (real numerics) adds `loss.png` (loss against PS version, virtual
wall clock and bytes) and a `target` block: when and after how many bytes the windowed training loss first
reached the target, computed by the same code as `run-experiments`' figures.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import yaml

from dist_llm_train.embedded.report import CSV_COLUMNS
from dist_llm_train.experiments.figures import compute_figures, default_window
from dist_llm_train.experiments.grid import Target
from dist_llm_train.experiments.metrics import MetricsError, Series, loss_series, read_metrics
from dist_llm_train.sim.network import worker_name
from dist_llm_train.sim.runner import SimResult, summary

ROUND_COLUMNS = ["version", "publish_time_s", "round_time_s", "updates", "members"]


def new_run_id() -> str:
    return "sim-" + time.strftime("%Y%m%d-%H%M%S")


DEFAULT_TARGET = Target(floor_plus=0.10)


def write_report(
    result: SimResult,
    runs_dir: Path,
    run_id: str | None = None,
    extra: dict[str, Any] | None = None,
    target: Target = DEFAULT_TARGET,
) -> tuple[Path, dict[str, Any]]:
    """Write `runs_dir/<run_id>/` and return it with the summary written into it (`extra` keys added).

    `target` is the loss a trained run is measured against (ignored when nothing was trained)."""
    rid = run_id or new_run_id()
    run_dir = runs_dir / rid
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = runs_dir / f"{rid}-{n}"
    run_dir.mkdir(parents=True)
    data = {**summary(result, run_id=run_dir.name, run_dir=str(run_dir)), **(extra or {})}
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump(result.config.model_dump(mode="json"), sort_keys=False)
    )

    with (run_dir / "rounds.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROUND_COLUMNS)
        times = result.round_times.tolist()
        st = result.stats
        for i, (pub, rt) in enumerate(zip(st.publish_times, times, strict=True)):
            w.writerow(
                [i + 1, f"{pub:.6f}", f"{rt:.6f}", st.updates_per_version[i], st.members_per_version[i]]
            )
    if result.telemetry is not None and result.sizes is not None:
        rows = result.telemetry.rows(result.sizes, worker_name)
        with (run_dir / "metrics.csv").open("w", newline="") as f:
            dw = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            dw.writeheader()
            dw.writerows(rows)
    if result.trained is not None:
        data["target"] = target_figures(run_dir, data, target)
        plot_training(run_dir / "loss.png", data, target)
    (run_dir / "summary.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (run_dir / "summary.md").write_text(markdown(data))
    return run_dir, data


def target_figures(run_dir: Path, data: dict[str, Any], target: Target) -> dict[str, Any]:
    """Time, bytes and versions to the target loss, from the run's `metrics.csv` (as `run-experiments` does)."""
    fig = compute_figures(run_dir, target, int(data["workers"]), str(data["mode"]), data.get("profile"),
                          data.get("loss_floor"))
    return {
        "rule": target.describe(),
        "loss": fig.target_loss,
        "time_s": fig.time_to_target_s,
        "bytes": fig.bytes_to_target,
        "versions": fig.steps_to_target,
        "compute_utilisation": fig.compute_utilisation,
        "note": fig.note,
    }


def _series(run_dir: Path, workers: int, target: Target) -> Series | None:
    try:
        rows = read_metrics(run_dir / "metrics.csv")
    except MetricsError:
        return None
    series = loss_series(rows, target.window or default_window(workers))
    return series if series.loss else None


def plot_training(path: Path, data: dict[str, Any], target: Target) -> None:
    """Windowed training loss against PS version, virtual wall clock and bytes, with floor and target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(path.parent, int(data["workers"]), target)
    if series is None:
        return
    panels = (("step", "PS version"), ("wall_s", "virtual wall clock (s)"), ("bytes", "bytes sent + received"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    goal = data.get("target", {}).get("loss")
    for ax, (attr, label) in zip(axes, panels, strict=True):
        ax.plot(getattr(series, attr), series.loss, label="training loss (windowed)")
        if data.get("loss_floor") is not None:
            ax.axhline(data["loss_floor"], color="grey", linestyle="--", label="entropy floor")
        if goal is not None:
            ax.axhline(goal, color="red", linestyle=":", label="target")
        ax.set_xlabel(label)
        if attr == "bytes":
            ax.set_xscale("log")
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[0].legend()
    s = data["simulation"]
    fig.suptitle(f"simulated: {data['workers']} workers, {data['mode']}, {s['profile']} (real numerics)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: object, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.4g}{unit}"
    if isinstance(x, int):
        return f"{x:,}{unit}"
    return f"{x}{unit}"


def markdown(d: dict[str, Any]) -> str:
    s = d["simulation"]
    rt = s["round_time_s"]
    bound = s["physics_bound"]
    lines = [
        f"# Simulation {d['run_id']}",
        "",
        "Virtual time, no sockets: see docs/simulation.md for the models behind every figure.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| engine / profile | {s['engine']} / {s['profile']} |",
        f"| mode | {d['mode']} |",
        f"| workers | {d['workers']:,} |",
        f"| global steps (PS versions) | {d['steps']:,} |",
        f"| job state | {d['job_state']} |",
        f"| virtual time | {_fmt(s['virtual_seconds'], ' s')} |",
        f"| round time mean / p50 / p95 | {_fmt(rt['mean'], ' s')} / {_fmt(rt['p50'], ' s')} / "
        f"{_fmt(rt['p95'], ' s')} |",
        f"| link-physics bound (shared PS egress) | {_fmt(bound['shared_s'], ' s')} |",
        f"| measured / bound | {_fmt(bound['measured_over_bound'])} |",
        f"| rounds closed by straggler timeout | {_fmt(s['timed_out_rounds'])} |",
        f"| push outcomes | {', '.join(f'{k} {v:,}' for k, v in s['push_outcomes'].items()) or '-'} |",
        f"| acceptance rate | {_fmt(s['acceptance_rate'])} |",
        f"| staleness applied mean / p95 / max | {_fmt(s['staleness_applied']['mean'])} / "
        f"{_fmt(s['staleness_applied']['p95'])} / {_fmt(s['staleness_applied']['max'])} |",
        f"| compute utilisation | {_fmt(s['compute_utilisation'])} |",
        f"| crashes / rejoins / joins | {s['crashes']} / {s['rejoins']} / {s['joins']} |",
        f"| declared dead (false suspicions) | {s['declared_dead']} ({s['false_suspicions']}) |",
        f"| detection latency mean | {_fmt(s['detection_latency_s']['mean'], ' s')} |",
        f"| task reassignments | {d['reassignments']:,} |",
        f"| bytes sent by workers | {d['bytes_sent']:,} |",
        f"| bytes received by workers | {d['bytes_received']:,} |",
        f"| heartbeats (control bytes) | {s['heartbeats']:,} ({s['control_bytes']:,}) |",
        f"| events / wall clock | {s['events']:,} / {_fmt(s['wall_seconds'], ' s')} |",
        "",
        "Per-round figures: `rounds.csv`.",
        "",
    ]
    if s.get("numerics") == "real":
        tg = d.get("target", {})
        floor = d.get("loss_floor")
        lines[4:4] = [
            "Real numerics: the model trained on the virtual clock (`simulate --train`).",
            "",
        ]
        lines[-3:-3] = [
            f"| eval loss initial / final | {_fmt(d['initial_loss'])} / {_fmt(d['final_loss'])} |",
            f"| loss floor (entropy rate) | {_fmt(floor)} |",
            f"| target ({tg.get('rule', '-')}) | {_fmt(tg.get('loss'))} |",
            f"| time / bytes / versions to target | {_fmt(tg.get('time_s'), ' s')} / {_fmt(tg.get('bytes'))} / "
            f"{_fmt(tg.get('versions'))} |",
        ]
    m = d.get("measured_run")
    if m:
        err = m["relative_error"]
        lines[-3:-3] = [
            f"| measured run | {m['run_dir']} ({m['profile']}, {m['shaper']} shaping) |",
            f"| measured round time ({m['measured_versions']} versions) | {_fmt(m['measured_round_s'], ' s')} |",
            f"| simulated round time after warm-up / error | {_fmt(m['simulated_round_s'], ' s')} / "
            f"{_fmt(None if err is None else 100 * err, ' %')} |",
        ]
    if s.get("numerics") == "real":
        lines += ["![loss](loss.png)", ""]
    sg = d.get("surrogate")
    if sg:
        model = sg.get("model", {})
        lines += [
            "## Loss surrogate (nothing was trained in this run)",
            "",
            f"{sg['label']}: loss = floor + A·(S/(1+β·s) + S0)^(−α) with A = {_fmt(model.get('a'))}, "
            f"α = {_fmt(model.get('alpha'))}, S0 = {_fmt(model.get('s0'))}, β = {_fmt(model.get('beta'))} "
            f"({'fitted' if model.get('beta_fitted') else 'not identifiable from these runs: 0'}), rms log error "
            f"{_fmt(model.get('rms_log_error'))}; fitted from {', '.join(model.get('fitted_from', []))}.",
            "",
            f"| surrogate final loss | {_fmt(sg['final_loss'])} |",
            "|---|---|",
            f"| surrogate time to target ({_fmt(sg.get('target_loss'))}) | {_fmt(sg['time_to_target_s'], ' s')} |",
            "",
            *(f"**Warning:** {w}." for w in sg.get("warnings", [])),
            "",
        ]
    return "\n".join(lines)
