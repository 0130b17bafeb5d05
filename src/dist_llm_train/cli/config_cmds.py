"""`dist-llm-train validate-config` and `dist-llm-train config schema`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dist_llm_train.cli.common import console
from dist_llm_train.config import ConfigError, config_json_schema, load_config

config_app = typer.Typer(help="Inspect the configuration format.", no_args_is_help=True)


def validate_config(path: Annotated[Path, typer.Argument(help="YAML or JSON config file.")]) -> None:
    """Check a config file; print the resolved config, or every bad field path (exit 2)."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        console.print(f"[red]invalid[/red] {path}: {err}")
        raise typer.Exit(2) from None
    console.print(f"[green]valid[/green] {path}: strategy={cfg.training.strategy.name} "
                  f"model={cfg.model.name} scheduler={cfg.controller.scheduler} "
                  f"transport={cfg.paramserver.transport}")


@config_app.command("schema")
def schema() -> None:
    """Print the JSON Schema of the config file."""
    print(json.dumps(config_json_schema(), indent=2))
