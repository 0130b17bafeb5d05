"""`dist-llm-train serve shaper`: the userspace shaping service that embedded runs put between services.

It opens one relay per (link, traffic class) of a topology file, shapes each direction per the profile, and
reports the ports it bound (one JSON line on stdout, and `--ports-out` atomically) for the launcher to hand to
the workers. The work is done by `dist_llm_train.netem.shaper`; this is only its command-line face.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dist_llm_train.cli.common import setup_logging


def serve_shaper(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile name, file, or inline JSON/YAML.")],
    topology: Annotated[
        Path, typer.Option(help="Topology JSON: workers, targets, links (netem/userspace/topology.py).")
    ],
    ports_out: Annotated[
        Path | None, typer.Option(help="Write bound ports and configured links here.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address the relays listen on.")] = "127.0.0.1",
    seed: Annotated[str, typer.Option(help="Seed of the delay and loss draws.")] = "0",
    profile_dir: Annotated[str | None, typer.Option(help="Extra directory of <name>.yaml profiles.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = "INFO",
) -> None:
    """Run the userspace shaper (asyncio TCP relays, no root) until SIGTERM."""
    setup_logging(log_level)
    from dist_llm_train.netem.profile.schema import ProfileError
    from dist_llm_train.netem.userspace.shaper import run

    try:
        run(profile, topology, ports_out, host, seed, profile_dir)
    except ProfileError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
