"""Helpers shared by the CLI commands."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from dist_llm_train.config import Config, ConfigError, load_config

console = Console(stderr=True)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns the logs that matter (heartbeats run every second).
    logging.getLogger("httpx").setLevel(logging.WARNING)


def load_or_exit(path: Path | None) -> Config:
    """Load a config or exit with status 2 and a message naming the bad field."""
    try:
        return load_config(path)
    except ConfigError as err:
        console.print(f"[red]invalid config[/red]: {err}")
        raise typer.Exit(2) from None
