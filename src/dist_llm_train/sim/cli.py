"""`dist-llm-train simulate`: the typer command function (mounted by the CLI app).

Settings stack, later wins: SimConfig defaults ← the run config (`--config`, the same file `run` takes) ←
a `--sim-config` YAML of SimConfig fields ← command-line flags. `--from-run DIR` takes the place of `--config`:
a finished embedded run's config, profile, shaping and measured compute times (`sim.validation`), and the
output then carries the run's measured round time next to the simulated one. Bad values exit with status 2
and a message naming the field; nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dist_llm_train.config import Config, ConfigError, load_config
from dist_llm_train.sim import runner
from dist_llm_train.sim.config import SimConfig, SimConfigError, load_sim_overrides, merge_dotted
from dist_llm_train.sim.report import write_report
from dist_llm_train.sim.validation import (
    DEFAULT_ROUNDS,
    WARMUP_ROUNDS,
    MeasuredRun,
    RunFolderError,
    read_run,
    sim_config_for_run,
)

console = Console(stderr=True)


def build_config(config: Path | None, sim_config: Path | None, flags: dict[str, Any]) -> SimConfig:
    """The SimConfig the flags, files and defaults describe; raises SimConfigError / ConfigError."""
    base = load_config(config) if config is not None else Config()
    overrides: dict[str, Any] = load_sim_overrides(sim_config) if sim_config is not None else {}
    overrides = merge_dotted(overrides, flags)
    return SimConfig.from_config(base, **overrides)


def build_from_run(run: MeasuredRun, sim_config: Path | None, flags: dict[str, Any]) -> SimConfig:
    """The simulation of a measured run (see `sim.validation`), with a --sim-config file and flags over it."""
    overrides: dict[str, Any] = load_sim_overrides(sim_config) if sim_config is not None else {}
    overrides = merge_dotted(overrides, flags)
    return sim_config_for_run(run, rounds=overrides.pop("rounds", DEFAULT_ROUNDS), **overrides)


def measured_block(run: MeasuredRun, result: runner.SimResult) -> dict[str, Any]:
    """The run's measured round time beside the simulated one (warm-up rounds left out of both)."""
    times = result.round_times[WARMUP_ROUNDS:]
    simulated = float(times.mean()) if times.size else None
    return {
        "run_dir": str(run.run_dir),
        "profile": run.profile_name,
        "shaper": run.shaper,
        "measured_round_s": run.round_s,
        "measured_versions": run.versions,
        "simulated_round_s": simulated,
        "relative_error": None if simulated is None else (simulated - run.round_s) / run.round_s,
    }


def simulate(
    workers: Annotated[int | None, typer.Option(min=1, help="Virtual workers at the start.")] = None,
    rounds: Annotated[
        int | None, typer.Option(min=0, help="PS versions to reach (0: control plane only).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Network profile name or file (deploy/netem/); none: perfect links.")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="sync, async, adaptive or diloco.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config (YAML/JSON).")] = None,
    from_run: Annotated[
        Path | None,
        typer.Option(help="A finished `run` folder: simulate that job (its profile, shaping, measured compute)."),
    ] = None,
    sim_config: Annotated[Path | None, typer.Option(help="YAML of SimConfig fields (see docs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: same seed, same result.")] = None,
    engine: Annotated[
        str | None, typer.Option(help="auto, vectorised (sync, diloco) or exact (per event).")
    ] = None,
    compute: Annotated[
        str | None, typer.Option(help="Step-time distribution: constant, exponential, lognormal.")
    ] = None,
    compute_mean: Annotated[float | None, typer.Option(help="Mean step compute time, seconds.")] = None,
    compute_sigma: Annotated[float | None, typer.Option(help="Lognormal sigma of step time.")] = None,
    params: Annotated[
        int | None, typer.Option(help="Parameters (default: the model config's count).")
    ] = None,
    codec: Annotated[str | None, typer.Option(help="Update codec: none, fp16, int8, topk.")] = None,
    mtbf: Annotated[float | None, typer.Option(help="Mean time between crashes per worker, seconds.")] = None,
    rejoin_after: Annotated[
        float | None, typer.Option(help="A crashed worker rejoins after this, seconds.")
    ] = None,
    join_rate: Annotated[
        float | None, typer.Option(help="New workers per second (with --max-joins).")
    ] = None,
    max_joins: Annotated[int | None, typer.Option(help="At most this many new workers.")] = None,
    max_staleness: Annotated[int | None, typer.Option(help="Async staleness bound.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="DiLoCo: local steps per update (H).")] = None,
    straggler_timeout: Annotated[float | None, typer.Option(help="Sync round timeout, seconds.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="priority, gale-shapley or capability.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the report folder goes.")] = Path("runs"),
    report: Annotated[bool, typer.Option(help="Write the report folder.")] = True,
) -> None:
    """Simulate a run with thousands of virtual workers: virtual clock, real scheduler and PS rules."""
    flags = {
        "workers": workers,
        "rounds": rounds,
        "profile": profile,
        "mode": mode,
        "seed": seed,
        "engine": engine,
        "compute.kind": compute,
        "compute.mean_s": compute_mean,
        "compute.sigma": compute_sigma,
        "payload.params": params,
        "payload.codec": codec,
        "failures.mtbf_s": mtbf,
        "failures.rejoin_after_s": rejoin_after,
        "churn.join_rate_per_s": join_rate,
        "churn.max_joins": max_joins,
        "max_staleness": max_staleness,
        "local_steps": local_steps,
        "straggler_timeout_s": straggler_timeout,
        "scheduler": scheduler,
    }
    measured: MeasuredRun | None = None
    try:
        if from_run is not None and config is not None:
            raise SimConfigError("--from-run and --config both name the job: give one of them")
        if from_run is not None:
            measured = read_run(from_run)
            cfg = build_from_run(measured, sim_config, {k: v for k, v in flags.items() if v is not None})
        else:
            cfg = build_config(config, sim_config, flags)
        result = runner.simulate(cfg)
    except (SimConfigError, ConfigError, RunFolderError) as err:
        console.print(f"[red]invalid simulation config[/red]: {err}")
        raise typer.Exit(2) from None
    extra = {"measured_run": measured_block(measured, result)} if measured is not None else {}
    if report:
        _, data = write_report(result, runs_dir, extra=extra)
    else:
        data = {**runner.summary(result), **extra}
    if json_out:
        print(json.dumps(data, allow_nan=False))
    else:
        show(data)


def show(d: dict[str, Any]) -> None:
    s = d["simulation"]
    rt = s["round_time_s"]
    t = Table(title=f"simulation: {d['workers']:,} workers, {s['profile']}, {d['mode']} ({s['engine']})")
    t.add_column("figure")
    t.add_column("value", justify="right")

    def num(x: Any, unit: str = "") -> str:
        return "-" if x is None else (f"{x:,.4g}{unit}" if isinstance(x, float) else f"{x:,}{unit}")

    rows = [
        ("job state / steps", f"{d['job_state']} / {d['steps']:,}"),
        ("virtual time", num(s["virtual_seconds"], " s")),
        (
            "round time mean / p50 / p95",
            f"{num(rt['mean'], ' s')} / {num(rt['p50'], ' s')} / {num(rt['p95'], ' s')}",
        ),
        ("measured / physics bound", num(s["physics_bound"]["measured_over_bound"])),
        ("acceptance rate (async)", num(s["acceptance_rate"])),
        (
            "staleness applied mean / max",
            f"{num(s['staleness_applied']['mean'])} / {num(s['staleness_applied']['max'])}",
        ),
        (
            "crashes / declared dead / reassignments",
            f"{s['crashes']} / {s['declared_dead']} / {d['reassignments']}",
        ),
        ("bytes sent / received", f"{d['bytes_sent']:,} / {d['bytes_received']:,}"),
        ("wall clock", num(s["wall_seconds"], " s")),
    ]
    m = d.get("measured_run")
    if m:
        rows.append(("measured run: round time", num(m["measured_round_s"], " s")))
        rows.append(("simulated (after warm-up) / error", f"{num(m['simulated_round_s'], ' s')} / "
                     f"{num(None if m['relative_error'] is None else 100 * m['relative_error'], ' %')}"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if d.get("run_dir"):
        console.print(f"report: {d['run_dir']}/summary.md")
