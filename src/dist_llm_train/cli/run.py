"""`dist-llm-train run`, `demo-ml` and `demo-basic`: local runs of the real services, with a progress bar.

The work is `embedded.launcher.EmbeddedRun` (and `embedded.basic_demo` for the control plane alone); this
module turns flags into a `Config`, checks them before any process starts, and shows progress and the summary.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from dist_llm_train.cli.common import console, load_or_exit, setup_logging
from dist_llm_train.cli.options import (
    AvailabilityOpt,
    CodecOpt,
    ConfigOpt,
    JsonOpt,
    LogLevelOpt,
    ModeAliasOpt,
    StrategyOpt,
    load_availability_or_exit,
    resolve_alias,
)
from dist_llm_train.config import (
    LEGACY_STRATEGY_SELECTORS,
    LEGACY_TRAINING_KEYS,
    AvailabilityConfig,
    Config,
    ConfigError,
    LegacyConfigWarning,
    TrainingConfig,
    format_validation_error,
    migrate_legacy_keys,
    read_config_mapping,
)
from dist_llm_train.core.strategies import strategy_fields

WorkersOpt = Annotated[int, typer.Option("--workers", min=1, max=64, help="Number of worker processes.")]

# The JSON summary leads with these, so a reader sees the outcome before the bookkeeping.
HEADLINE_KEYS = ["initial_loss", "final_loss", "loss_floor", "steps", "workers", "bytes_sent", "wall_seconds",
                 "run_dir"]


def apply_training_overrides(
    cfg: Config, overrides: dict[str, object], file_training: dict[str, Any] | None = None
) -> Config:
    """`cfg` with the given `training` flags (None: not given), validated together and against each other.

    Flags use the flat key names (`strategy`, `compression`, `aggregation_rule`, ...); each lands on its
    nested path through the config's one migration, and wins over what the file set there. `file_training`
    is the config file's `training` mapping as written: with it, the file's settings for the strategy a flag
    chooses (e.g. the seed's `diloco_local_steps` beside `--strategy diloco`) still apply. One validation, so
    e.g. `--aggregation krum` is checked against `--workers`; on refusal `cfg` is unchanged.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return cfg
    current = dict(file_training) if file_training is not None else cfg.training.model_dump(exclude_none=True)
    if "strategy" in given:
        # A strategy chosen on the command line replaces the file's; the file's settings that the chosen
        # strategy also has carry over.
        for selector in LEGACY_STRATEGY_SELECTORS:
            current.pop(selector, None)
        previous = current.pop("strategy", None)
        try:
            fields = strategy_fields(str(given["strategy"]))
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--strategy") from None
        kept = {k: v for k, v in previous.items() if k in fields and k != "name"} if isinstance(previous, dict) else {}
        given["strategy"] = {**kept, "name": given["strategy"]}
    for key in given:
        owner, field = LEGACY_TRAINING_KEYS.get(key, (None, None))
        if owner is not None and isinstance(current.get(owner), dict):
            current[owner] = {k: v for k, v in current[owner].items() if k != field}  # the flag wins
    if "dp_noise_multiplier" in given:
        given["enable_differential_privacy"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyConfigWarning)  # flags are flat by design; the file warned already
        try:
            migrated, _ = migrate_legacy_keys({"training": current | given})
            cfg.training = TrainingConfig.model_validate(migrated["training"])
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="training flags") from None
        except ValidationError as err:
            raise typer.BadParameter(format_validation_error(err), param_hint="training flags") from None
    return cfg


def apply_availability(cfg: Config, given: dict[str, Any] | None, workers: int) -> Config:
    """`cfg` with the `--availability` section (None: the config's own, if any), its trace checked against
    `workers` before any process starts (a bad row or an unknown worker exits 2, naming the row)."""
    if given is not None:
        cfg.availability = AvailabilityConfig.model_validate(given)
    if cfg.availability is not None:
        try:
            cfg.availability.resolve(workers)
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="--availability / availability:") from None
    return cfg


def apply_model_and_transport(cfg: Config, model: str | None, transport: str | None) -> Config:
    """`cfg` with the model family and the PS transport chosen on the command line (None: not given)."""
    try:
        if model is not None:
            cfg.model.name = model  # type: ignore[assignment]  # validated on assignment
        if transport is not None:
            cfg.paramserver.transport = transport  # type: ignore[assignment]
    except ValueError as err:
        raise typer.BadParameter(str(err).splitlines()[-1]) from None
    return cfg


def train_with_progress(
    cfg: Config,
    workers: int,
    json_out: bool,
    runs_dir: Path = Path("runs"),
    timeout: float = 1800.0,
    profile: str | None = None,
    shaping: str = "userspace",
    max_restarts: int = 3,
    ps_shards: int = 1,
) -> None:
    """Run the embedded services to the end under a progress bar; print the summary (or JSON)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dist_llm_train.embedded.launcher import EmbeddedRun, RunOptions, Snapshot
    from dist_llm_train.embedded.supervision import RestartPolicy

    run = EmbeddedRun(RunOptions(config=cfg, workers=workers, runs_dir=runs_dir, timeout_s=timeout,
                                 profile=profile, shaping=shaping,
                                 restart_policy=RestartPolicy(max_restarts=max_restarts), ps_shards=ps_shards))
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
        data = summary.to_json()
        print(json.dumps({k: data[k] for k in HEADLINE_KEYS} | data))
    else:
        floor = f"{summary.loss_floor:.3f}" if summary.loss_floor is not None else "unknown"
        console.print(
            f"[green]done[/green] in {summary.wall_seconds:.1f}s: loss {summary.initial_loss:.3f} -> "
            f"{summary.final_loss:.3f} (floor {floor}), {summary.steps} steps, "
            f"{summary.bytes_sent / 1e6:.1f} MB sent. Report: {summary.run_dir}/summary.md"
        )
        av = summary.availability
        if av:
            goodput = "-" if av.get("goodput") is None else f"{av['goodput']:.1%}"
            console.print(f"availability: {av['leaves']} leaves, {av['joins']} joins applied; goodput {goodput}")
        rs = summary.restarts
        if rs.get("events"):
            counts = ", ".join(f"{name} {n}" for name, n in rs["counts"].items())
            console.print(f"restarts: {counts}; at most {rs['max_versions_lost']} versions lost "
                          f"(checkpoint every {rs['checkpoint_every']})")


def run(
    workers: WorkersOpt = 3,
    steps: Annotated[int | None, typer.Option(min=1, help="Global training steps (PS versions).")] = None,
    config: ConfigOpt = None,
    model: Annotated[str | None, typer.Option(help="gpt or lstm (also tiny-lstm, small-transformer).")] = None,
    strategy: StrategyOpt = None,
    mode: ModeAliasOpt = None,
    transport: Annotated[str | None, typer.Option(help="PS transport: grpc or zmq.")] = None,
    json_out: JsonOpt = False,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 1800.0,
    log_level: LogLevelOpt = "WARNING",
    profile: Annotated[str | None, typer.Option(
        "--profile", "-p", help="Shape every link with this netem profile (name, file or inline JSON/YAML).")] = None,
    shaping: Annotated[str, typer.Option(help="userspace (relays, no root) or kernel.")] = "userspace",
    codec: CodecOpt = None,
    aggregation: Annotated[str | None, typer.Option(
        help="mean, median, trimmed_mean, krum, multi_krum, bulyan or centered_clipping (bucketing and NNM "
        "wrappers: training.aggregation in a config file).")] = None,
    byzantine_f: Annotated[int | None, typer.Option(min=0, help="Faulty workers the rule must tolerate.")] = None,
    attack: Annotated[str | None, typer.Option(
        help="sign_flip, gaussian, alie, ipm, mimic or drift (needs --attackers).")] = None,
    attackers: Annotated[int | None, typer.Option(min=0, help="The last K workers attack.")] = None,
    dp_noise: Annotated[float | None, typer.Option(help="DP noise multiplier (turns DP on).")] = None,
    dp_clip: Annotated[float | None, typer.Option(help="DP L2 clip bound per update.")] = None,
    availability: AvailabilityOpt = None,
    max_restarts: Annotated[int, typer.Option(
        min=0, max=100, help="Restart a dead PS (from its newest checkpoint) or controller (from its SQLite) at "
        "most this many times each; 0: a death fails the run.")] = 3,
    checkpoint_every: Annotated[int | None, typer.Option(
        min=1, help="PS checkpoint interval in versions: a PS restart loses fewer than this many "
        "(config: paramserver.checkpoint_every).")] = None,
    ps_shards: Annotated[int, typer.Option(
        "--ps-shards", min=1, max=64, help="Parameter-server processes, each holding one contiguous slice of the "
        "parameters (docs/architecture.md, sharded parameter servers). Refused with rules that need the whole "
        "vector (krum, multi_krum, bulyan, centered_clipping, bucketing, nnm, central DP, streaming_diloco). With "
        "--profile each worker reaches each shard over its own shaped path (nodes paramserver, shard-1, ...), "
        "all of them sharing the worker's link rate.")] = 1,
) -> None:
    """Train for real: controller, PS and workers as local processes on loopback. Auth is on: the run makes its
    own cluster secret and gives each worker its own credential (docs/security.md)."""
    setup_logging(log_level)
    strategy = resolve_alias(strategy, mode, name="--strategy", alias="--mode")
    cfg = apply_model_and_transport(load_or_exit(config), model, transport)
    if checkpoint_every is not None:
        cfg.paramserver.checkpoint_every = checkpoint_every
    file_training = read_config_mapping(config).get("training") if config is not None else None
    cfg = apply_training_overrides(cfg, {
        "num_workers": workers, "steps": steps, "strategy": strategy, "compression": codec,
        "aggregation_rule": aggregation, "byzantine_f": byzantine_f, "attack": attack, "attackers": attackers,
        "dp_noise_multiplier": dp_noise, "dp_clip": dp_clip,
    }, file_training if isinstance(file_training, dict) else None)
    if profile is not None:  # checked before anything starts
        from dist_llm_train.netem.profile.schema import ProfileError
        from dist_llm_train.netem.userspace.embedded import validate

        try:
            validate(profile, shaping)
        except ProfileError as err:
            raise typer.BadParameter(str(err), param_hint="--profile/--shaping") from None
    cfg = apply_availability(cfg, load_availability_or_exit(availability), workers)
    from dist_llm_train.embedded.launcher import check_ps_shards

    try:
        check_ps_shards(cfg, ps_shards)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--ps-shards") from None
    train_with_progress(cfg, workers, json_out, runs_dir, timeout, profile, shaping, max_restarts, ps_shards)


def demo_ml(
    config: ConfigOpt = None,
    workers: WorkersOpt = 3,
    steps: Annotated[int, typer.Option(min=1, help="Global training steps (PS versions).")] = 150,
    json_out: JsonOpt = False,
) -> None:
    """The seed's ML demo: a real training run (same as `run`)."""
    cfg = apply_training_overrides(load_or_exit(config), {"num_workers": workers, "steps": steps})
    train_with_progress(cfg, workers, json_out)


def demo_basic(
    workers: WorkersOpt = 3,
    tasks: Annotated[int, typer.Option(min=1, max=1000, help="Tasks to submit and see finished.")] = 6,
    config: ConfigOpt = None,
) -> None:
    """The seed's infrastructure demo: workers register, heartbeat, take and finish tasks (no torch)."""
    from dist_llm_train.embedded.basic_demo import run_basic_demo

    result = run_basic_demo(load_or_exit(config), workers=workers, tasks=tasks)
    console.print_json(data=result)
