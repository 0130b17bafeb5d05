"""`dist-llm-train secret | token | certs`, and how `serve` finds its credential or refuses to start.

    dist-llm-train secret > cluster.secret                     a new cluster secret (controller + PS only)
    DLT_CLUSTER_SECRET_FILE=cluster.secret dist-llm-train token --role admin
    dist-llm-train token --role join --name worker-1           a join credential for one worker name
    dist-llm-train certs --out certs --host paramserver --client controller --client worker

See docs/security.md for what each credential allows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from dist_llm_train.cli.common import console
from dist_llm_train.core.credentials import ROLES, CredentialError, TokenAuthority, check_secret, generate_secret

SECRET_ENV = "DLT_CLUSTER_SECRET"
SecretFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        envvar="DLT_CLUSTER_SECRET_FILE",
        help=f"File holding the cluster secret (or set {SECRET_ENV}); make one with `dist-llm-train secret`.",
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Run without authentication: anyone who reaches the port can act as any worker or operator.",
    ),
]


def read_secret(secret_file: Path | None, configured: str | None = None) -> str | None:
    """The cluster secret from the config, DLT_CLUSTER_SECRET or --secret-file (first found); None if none."""
    if configured:
        return configured
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    if secret_file is not None:
        try:
            return secret_file.read_text().strip()
        except OSError as err:
            console.print(f"[red]cannot read the cluster secret[/red]: {err}")
            raise typer.Exit(2) from None
    return None


def cluster_secret_or_exit(
    service: str, secret_file: Path | None, configured: str | None, insecure: bool
) -> str | None:
    """What `serve` runs with: a valid secret, or None with --insecure; anything else exits 2 saying why."""
    secret = read_secret(secret_file, configured)
    if secret is not None and insecure:
        console.print(f"[red]--insecure given together with a cluster secret[/red]; choose one for the {service}")
        raise typer.Exit(2)
    if secret is not None:
        try:
            return check_secret(secret)
        except CredentialError as err:
            console.print(f"[red]invalid cluster secret[/red]: {err}")
            raise typer.Exit(2) from None
    if not insecure:
        console.print(
            f"[red]refusing to start the {service} without a credential[/red]: set {SECRET_ENV} or "
            "--secret-file (make one with `dist-llm-train secret`), or pass --insecure to run it without "
            "authentication (docs/security.md)"
        )
        raise typer.Exit(2)
    console.print(f"[yellow]WARNING[/yellow]: the {service} runs with --insecure: no authentication at all")
    return None


def secret() -> None:
    """Print a new random cluster secret (256 bits). Give it to the controller and the PS only."""
    typer.echo(generate_secret())


def token(
    role: Annotated[str, typer.Option(help=f"Role: {', '.join(ROLES)}.")] = "admin",
    name: Annotated[
        str, typer.Option(help="join: the one worker name it may register (empty: any); others: a label.")
    ] = "",
    ttl: Annotated[float, typer.Option(help="Lifetime in seconds (0 = no expiry).")] = 0.0,
    secret_file: SecretFileOpt = None,
) -> None:
    """Mint a credential from the cluster secret (admin for the CLI, join for workers; docs/security.md)."""
    value = read_secret(secret_file)
    if value is None:
        console.print(f"[red]no cluster secret[/red]: set {SECRET_ENV} or --secret-file")
        raise typer.Exit(2)
    if role not in ROLES or role == "worker":
        console.print("[red]--role must be admin, controller or join[/red] (workers get theirs at registration)")
        raise typer.Exit(2)
    try:
        authority = TokenAuthority(value)
    except CredentialError as err:
        console.print(f"[red]invalid cluster secret[/red]: {err}")
        raise typer.Exit(2) from None
    typer.echo(authority.mint_for(role, name, ttl_s=ttl or None))  # type: ignore[arg-type]


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def certs(
    out: Annotated[Path, typer.Option(help="Folder to write the PEM files to.")] = Path("certs"),
    host: Annotated[
        list[str] | None, typer.Option("--host", help="A name or address of the PS (repeatable).")
    ] = None,
    client: Annotated[
        list[str] | None, typer.Option("--client", help="Client certificate to make, for mutual TLS (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity in days.")] = 365,
) -> None:
    """Write a private CA, the PS's TLS certificate and client certificates (gRPC TLS / mutual TLS)."""
    hosts = host or ["localhost", "127.0.0.1", "paramserver"]
    clients = client or []
    bad = [n for n in clients if not _FILE_NAME.match(n) or n in ("ca", "paramserver")]
    if bad:
        console.print(f"[red]client names must be plain file names other than ca/paramserver[/red]: {bad}")
        raise typer.Exit(2)
    try:
        from dist_llm_train.paramserver.transport.certs import write_certificates
    except ImportError:
        console.print("[red]`certs` needs the cryptography package[/red]: pip install 'dist-llm-train[certs]'")
        raise typer.Exit(2) from None
    for path in write_certificates(out, hosts, clients, days):
        console.print(f"wrote {path}")
