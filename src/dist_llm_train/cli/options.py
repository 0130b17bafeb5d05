"""Options more than one command takes, declared once so every command spells the same idea the same way.

A renamed option keeps its old spelling as a hidden alias: `resolve_alias` merges the two and prints one
deprecation warning naming the new spelling, so old scripts keep working and say what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer

from dist_llm_train.cli.common import console
from dist_llm_train.core.strategies import strategy_names

T = TypeVar("T")

STRATEGIES_HELP = ", ".join(strategy_names()) + "."  # the registry: a new strategy file shows up here

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/JSON run config file.")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help=f"Training strategy: {STRATEGIES_HELP}")]
ModeAliasOpt = Annotated[str | None, typer.Option("--mode", hidden=True, help="Deprecated spelling of --strategy.")]
CodecOpt = Annotated[
    str | None, typer.Option("--codec", help="Update codec: none, fp16, int8, int4, int2, topk or sparseloco.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object last, on stdout.")]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
AvailabilityOpt = Annotated[
    Path | None,
    typer.Option(
        "--availability",
        help="Transient workers: a trace (CSV or YAML rows worker, join_s, leave_s) or a YAML with an "
        "availability generator (exponential, diurnal, preemption). See docs/simulation.md.",
    ),
]


def load_availability_or_exit(path: Path | None) -> dict[str, object] | None:
    """`--availability FILE` as an `availability` config mapping (None: not given); a bad file exits 2."""
    if path is None:
        return None
    from dist_llm_train.config import ConfigError, load_availability_file

    try:
        return load_availability_file(path).model_dump(mode="json", exclude_none=True)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--availability") from None


def resolve_alias(value: T | None, alias_value: T | None, *, name: str, alias: str) -> T | None:
    """The value of option `name`, which may also have been given under its deprecated spelling `alias`.

    Giving both with different values is refused rather than silently picking one.
    """
    if alias_value is None:
        return value
    console.print(f"[yellow]warning[/yellow]: {alias} is deprecated and will be removed; use {name}")
    if value is not None and value != alias_value:
        raise typer.BadParameter(f"{name} {value!r} and {alias} {alias_value!r} disagree; give {name} only")
    return alias_value
