"""The `dist-llm-train` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dist_llm_train.cli.client_cmds import register_client_commands
from dist_llm_train.cli.common import console, load_or_exit, setup_logging
from dist_llm_train.cli.config_cmds import config_app, validate_config
from dist_llm_train.cli.serve import serve_app
from dist_llm_train.config import Config
from dist_llm_train.experiments.cli import run_experiments
from dist_llm_train.netem.cli import netem_app
from dist_llm_train.sim.cli import simulate

app = typer.Typer(
    help="A lab for training language models across bad networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(serve_app, name="serve")
app.add_typer(config_app, name="config")
app.add_typer(netem_app, name="netem")
app.command("validate-config")(validate_config)
register_client_commands(app)
app.command("simulate")(simulate)
app.command("run-experiments")(run_experiments)


def _apply_run_overrides(
    cfg: Config, workers: int, steps: int | None, model: str | None, mode: str | None, transport: str | None
) -> Config:
    try:
        if steps is not None:
            cfg.training.steps = steps
        if model is not None:
            cfg.model.name = model  # type: ignore[assignment]
        if mode is not None:
            cfg.training.mode = mode  # type: ignore[assignment]
        if transport is not None:
            cfg.paramserver.transport = transport  # type: ignore[assignment]
        cfg.training.num_workers = workers
    except ValueError as err:
        raise typer.BadParameter(str(err).splitlines()[-1]) from None
    return cfg


# --- training strategies (issue 6) ---------------------------------------------------------------------
def _apply_strategy_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Apply the strategy flags in one validation, so e.g. --aggregation krum is checked against --workers."""
    from pydantic import ValidationError

    from dist_llm_train.config import TrainingConfig, format_validation_error

    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return cfg
    if "dp_noise_multiplier" in given:
        given["enable_differential_privacy"] = True
    try:
        cfg.training = TrainingConfig.model_validate(cfg.training.model_dump() | given)
    except ValidationError as err:
        raise typer.BadParameter(format_validation_error(err), param_hint="strategy flags") from None
    return cfg
# --- end training strategies ------------------------------------------------------------------------------


def _run(cfg: Config, workers: int, json_out: bool, runs_dir: Path, timeout: float,
         profile: str | None = None, shaping: str = "userspace") -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dist_llm_train.embedded.launcher import EmbeddedRun, RunOptions, Snapshot

    run = EmbeddedRun(RunOptions(config=cfg, workers=workers, runs_dir=runs_dir, timeout_s=timeout,
                                 profile=profile, shaping=shaping))
    columns = (
        TextColumn("[bold]training[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=json_out, disable=json_out) as progress:
        bar = progress.add_task("train", total=cfg.training.steps, info="starting services")

        def show(s: Snapshot) -> None:
            loss = f"{s.loss:.3f}" if s.loss is not None else "-"
            floor = f"{s.loss_floor:.3f}" if s.loss_floor is not None else "?"
            info = (
                f"loss {loss} (floor {floor})  {s.tokens_per_s:,.0f} tok/s  "
                f"{s.bytes_sent / 1e6:,.1f} MB sent  workers {s.workers_alive} alive / {s.workers_dead} dead"
            )
            progress.update(bar, completed=min(s.version, s.total_steps), info=info)

        try:
            summary = run.execute(on_progress=show)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; every child process was stopped[/yellow]")
            raise typer.Exit(130) from None
        except (RuntimeError, TimeoutError) as err:
            console.print(f"[red]run failed[/red]: {err}")
            raise typer.Exit(1) from None
    if json_out:
        keys = ["initial_loss", "final_loss", "loss_floor", "steps", "workers", "bytes_sent", "wall_seconds", "run_dir"]
        data = summary.to_json()
        print(json.dumps({k: data[k] for k in keys} | {k: v for k, v in data.items() if k not in keys}))
    else:
        floor = f"{summary.loss_floor:.3f}" if summary.loss_floor is not None else "unknown"
        console.print(
            f"[green]done[/green] in {summary.wall_seconds:.1f}s: loss {summary.initial_loss:.3f} -> "
            f"{summary.final_loss:.3f} (floor {floor}), {summary.steps} steps, "
            f"{summary.bytes_sent / 1e6:.1f} MB sent. Report: {summary.run_dir}/summary.md"
        )


@app.command()
def run(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Number of worker processes.")] = 3,
    steps: Annotated[int | None, typer.Option(min=1, help="Global training steps (PS versions).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON config file.")] = None,
    model: Annotated[str | None, typer.Option(help="gpt or lstm (also tiny-lstm, small-transformer).")] = None,
    mode: Annotated[str | None, typer.Option(help="sync or async.")] = None,
    transport: Annotated[str | None, typer.Option(help="PS transport: grpc or zmq.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON summary object last.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 1800.0,
    log_level: Annotated[str, typer.Option(help="Launcher log level.")] = "WARNING",
    # --- netem (issue 4) ---------------------------------------------------------------------------------
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Shape every link with this netem profile (name, file or inline JSON/YAML).")] = None,
    shaping: Annotated[str, typer.Option(help="userspace (relays, no root) or kernel.")] = "userspace",
    # --- training strategies (issue 6; docs/training_protocol.md) ------------------------------------------
    strategy: Annotated[str | None, typer.Option(help="sync, async, adaptive or diloco.")] = None,
    codec: Annotated[str | None, typer.Option(help="Update codec: none, fp16, int8 or topk.")] = None,
    aggregation: Annotated[str | None, typer.Option(
        help="mean, median, trimmed_mean, krum, multi_krum or bulyan.")] = None,
    byzantine_f: Annotated[int | None, typer.Option(min=0, help="Faulty workers the rule must tolerate.")] = None,
    attack: Annotated[str | None, typer.Option(help="sign_flip, gaussian, alie or ipm (needs --attackers).")] = None,
    attackers: Annotated[int | None, typer.Option(min=0, help="The last K workers attack.")] = None,
    dp_noise: Annotated[float | None, typer.Option(help="DP noise multiplier (turns DP on).")] = None,
    dp_clip: Annotated[float | None, typer.Option(help="DP L2 clip bound per update.")] = None,
) -> None:
    """Train for real: controller, PS and workers as local processes on loopback."""
    setup_logging(log_level)
    cfg = _apply_run_overrides(load_or_exit(config), workers, steps, model, mode, transport)
    cfg = _apply_strategy_overrides(cfg, {
        "strategy": strategy, "compression": codec, "aggregation_rule": aggregation, "byzantine_f": byzantine_f,
        "attack": attack, "attackers": attackers, "dp_noise_multiplier": dp_noise, "dp_clip": dp_clip,
    })
    if profile is not None:  # checked before anything starts
        from dist_llm_train.netem.embedded import validate
        from dist_llm_train.netem.profile import ProfileError

        try:
            validate(profile, shaping)
        except ProfileError as err:
            raise typer.BadParameter(str(err), param_hint="--profile/--shaping") from None
    _run(cfg, workers, json_out, runs_dir, timeout, profile, shaping)


@app.command("demo-ml")
def demo_ml(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON config file.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64)] = 3,
    steps: Annotated[int, typer.Option(min=1)] = 150,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The seed's ML demo: a real training run (same as `run`)."""
    cfg = _apply_run_overrides(load_or_exit(config), workers, steps, None, None, None)
    _run(cfg, workers, json_out, Path("runs"), 1800.0)


@app.command("demo-basic")
def demo_basic(
    workers: Annotated[int, typer.Option(min=1, max=64)] = 3,
    tasks: Annotated[int, typer.Option(min=1, max=1000)] = 6,
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
) -> None:
    """The seed's infrastructure demo: workers register, heartbeat, take and finish tasks (no torch)."""
    from dist_llm_train.embedded.basic_demo import run_basic_demo

    cfg = load_or_exit(config)
    result = run_basic_demo(cfg, workers=workers, tasks=tasks)
    console.print_json(data=result)
