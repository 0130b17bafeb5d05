"""Helpers shared by the CLI commands."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console

from dist_llm_train.config import Config, ConfigError, LegacyConfigWarning, load_config

console = Console(stderr=True)
_show_python_warning = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A config-layout warning is for the user, not a developer: one plain line, no source location."""
    if issubclass(category, LegacyConfigWarning):
        console.print(f"[yellow]warning[/yellow]: {message}", highlight=False)
    else:
        _show_python_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_warning


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
