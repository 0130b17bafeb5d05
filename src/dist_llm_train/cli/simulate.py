"""`dist-llm-train simulate`: flags in, `sim.request.run_request`, a table (or one JSON object) out.

How files and flags stack up, and what `--from-run` does, is `sim.request`'s business. Bad values exit with
status 2 and a message naming the field; nothing is written.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dist_llm_train.cli.common import console
from dist_llm_train.cli.options import (
    AvailabilityOpt,
    CodecOpt,
    ConfigOpt,
    JsonOpt,
    ModeAliasOpt,
    StrategyOpt,
    load_availability_or_exit,
    resolve_alias,
)
from dist_llm_train.config import ConfigError
from dist_llm_train.core.strategies import STRATEGIES
from dist_llm_train.experiments.grid import Target
from dist_llm_train.sim.config import SimConfigError
from dist_llm_train.sim.report import DEFAULT_TARGET
from dist_llm_train.sim.request import SimRequest, run_request
from dist_llm_train.sim.surrogate import SurrogateError
from dist_llm_train.sim.validation import RunFolderError

ROUND_STRATEGIES = ", ".join(name for name, cls in sorted(STRATEGIES.items()) if cls.rounds)


def simulate(
    workers: Annotated[int | None, typer.Option(min=1, help="Virtual workers at the start.")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=0, help="PS versions to reach (0: control plane only).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=0, hidden=True, help="Deprecated spelling of --steps.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Network profile name or file (deploy/netem/); none: perfect links."),
    ] = None,
    strategy: StrategyOpt = None,
    mode: ModeAliasOpt = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    from_run: Annotated[
        Path | None,
        typer.Option(help="A finished `run` folder: simulate that job (its profile, shaping, measured compute)."),
    ] = None,
    sim_config: Annotated[Path | None, typer.Option(help="YAML of SimConfig fields (see docs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: same seed, same result.")] = None,
    engine: Annotated[
        str | None,
        typer.Option(help=f"auto, vectorised ({ROUND_STRATEGIES}; not with overlap_steps) or exact (per event)."),
    ] = None,
    compute: Annotated[
        str | None, typer.Option(help="Step-time distribution: constant, exponential, lognormal.")
    ] = None,
    compute_mean: Annotated[float | None, typer.Option(help="Mean step compute time, seconds.")] = None,
    compute_sigma: Annotated[float | None, typer.Option(help="Lognormal sigma of step time.")] = None,
    params: Annotated[
        int | None, typer.Option(help="Parameters (default: the model config's count).")
    ] = None,
    codec: CodecOpt = None,
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
    buffer_size: Annotated[
        int | None, typer.Option(help="buffered_async: accepted updates per version (K).")
    ] = None,
    straggler_timeout: Annotated[float | None, typer.Option(help="Sync round timeout, seconds.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="priority, gale-shapley or capability.")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the report folder goes.")] = Path("runs"),
    report: Annotated[bool, typer.Option(help="Write the report folder.")] = True,
    train: Annotated[
        bool,
        typer.Option(
            "--train",
            help="Real numerics: train the real model with the real strategy, codec, rule and PS on the virtual "
            "clock (loss vs step / wall / bytes, time to target, loss.png). Up to a few dozen workers.",
        ),
    ] = False,
    target_loss: Annotated[
        float | None,
        typer.Option(min=0.0, help="Target loss for --train or a surrogate (default: entropy floor + 0.10 nats)."),
    ] = None,
    loss_surrogate: Annotated[
        list[Path] | None,
        typer.Option(
            "--loss-surrogate",
            help="Timing-only runs: fit a loss surrogate from these trained simulation folders (repeatable); "
            "reported under 'surrogate', labelled, never as the run's loss.",
        ),
    ] = None,
    availability: AvailabilityOpt = None,
) -> None:
    """Simulate a run with thousands of virtual workers: virtual clock, real scheduler and PS rules.

    With --train the model really trains while time comes from the virtual clock."""
    steps = resolve_alias(steps, rounds, name="--steps", alias="--rounds")
    strategy = resolve_alias(strategy, mode, name="--strategy", alias="--mode")
    overrides = {
        "workers": workers,
        "rounds": steps,
        "profile": profile,
        "mode": strategy,
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
        "strategy_options.buffer_size": buffer_size,
        "straggler_timeout_s": straggler_timeout,
        "scheduler": scheduler,
        "availability": load_availability_or_exit(availability),
    }
    if target_loss is not None and not (train or loss_surrogate):
        console.print("[red]invalid simulation config[/red]: --target-loss needs --train or --loss-surrogate")
        raise typer.Exit(2)
    target = Target(loss=target_loss) if target_loss is not None else DEFAULT_TARGET
    request = SimRequest(config=config, sim_config=sim_config, from_run=from_run, overrides=overrides,
                         train=train, target=target, surrogate_from=tuple(loss_surrogate or ()))
    try:
        with _progress(enabled=train and not json_out) as on_version:
            data = run_request(request, runs_dir if report else None, progress=on_version)
    except (SimConfigError, ConfigError, RunFolderError, SurrogateError) as err:
        console.print(f"[red]invalid simulation config[/red]: {err}")
        raise typer.Exit(2) from None
    if json_out:
        print(json.dumps(data, allow_nan=False))
    else:
        console.print(summary_table(data))
        if data.get("run_dir"):
            console.print(f"report: {data['run_dir']}/summary.md")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[int, float], None] | None]:
    """A progress bar over the simulated PS's versions while a trained simulation runs."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("simulating (real numerics)"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("versions", total=None, loss="-")

        def on_version(version: int, loss: float) -> None:
            bar.update(task, completed=version, loss=f"{loss:.3f}")

        yield on_version


def _figure(x: Any, unit: str = "") -> str:
    return "-" if x is None else (f"{x:,.4g}{unit}" if isinstance(x, float) else f"{x:,}{unit}")


def summary_table(d: dict[str, Any]) -> Table:
    """The headline figures of a simulation summary (`sim.runner.summary`), one row each."""
    s = d["simulation"]
    rt = s["round_time_s"]
    t = Table(title=f"simulation: {d['workers']:,} workers, {s['profile']}, {d['mode']} ({s['engine']})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [
        ("job state / steps", f"{d['job_state']} / {d['steps']:,}"),
        ("virtual time", _figure(s["virtual_seconds"], " s")),
        (
            "round time mean / p50 / p95",
            f"{_figure(rt['mean'], ' s')} / {_figure(rt['p50'], ' s')} / {_figure(rt['p95'], ' s')}",
        ),
        ("measured / physics bound", _figure(s["physics_bound"]["measured_over_bound"])),
        ("acceptance rate (async)", _figure(s["acceptance_rate"])),
        (
            "staleness applied mean / max",
            f"{_figure(s['staleness_applied']['mean'])} / {_figure(s['staleness_applied']['max'])}",
        ),
        (
            "crashes / declared dead / reassignments",
            f"{s['crashes']} / {s['declared_dead']} / {d['reassignments']}",
        ),
        ("bytes sent / received", f"{d['bytes_sent']:,} / {d['bytes_received']:,}"),
        ("wall clock", _figure(s["wall_seconds"], " s")),
    ]
    if s.get("numerics") == "real":
        tg = d.get("target") or {}
        rows.insert(1, ("eval loss initial / final / floor",
                        f"{_figure(d['initial_loss'])} / {_figure(d['final_loss'])} / {_figure(d['loss_floor'])}"))
        rows.insert(2, ("time / bytes to target " + (f"({_figure(tg.get('loss'))})" if tg else ""),
                        f"{_figure(tg.get('time_s'), ' s')} / {_figure(tg.get('bytes'))}"))
    av = s.get("availability") or {}
    if av.get("trace"):  # churn of transient workers
        rows.append(("goodput / updates lost to leaves / short rounds",
                     f"{_figure(av['goodput'])} / {av['updates_lost_to_leaves']} / {av['rounds_closed_by_departure']}"))
    sg = d.get("surrogate")
    if sg:
        rows.append(("SURROGATE loss (not trained) final", _figure(sg["final_loss"])))
        rows.append(("SURROGATE time to target", _figure(sg["time_to_target_s"], " s")))
        rows += [("SURROGATE warning", w) for w in sg.get("warnings", [])]
    m = d.get("measured_run")
    if m:
        error_pct = None if m["relative_error"] is None else 100 * m["relative_error"]
        rows.append(("measured run: round time", _figure(m["measured_round_s"], " s")))
        rows.append(("simulated (after warm-up) / error",
                     f"{_figure(m['simulated_round_s'], ' s')} / {_figure(error_pct, ' %')}"))
    for name, value in rows:
        t.add_row(name, value)
    return t
