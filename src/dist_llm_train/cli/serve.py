"""`dist-llm-train serve controller|paramserver|worker`: the entry points containers and `run` use."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from dist_llm_train.cli.common import load_or_exit, setup_logging
from dist_llm_train.cli.options import ConfigOpt, LogLevelOpt
from dist_llm_train.cli.security import InsecureOpt, SecretFileOpt, cluster_secret_or_exit
from dist_llm_train.cli.serve_shaper import serve_shaper
from dist_llm_train.paramserver.numerics import hugepage_malloc_active, with_hugepage_malloc

serve_app = typer.Typer(help="Run one service in the foreground (what each container runs).", no_args_is_help=True)

Section = TypeVar("Section", bound=BaseModel)


def _with_overrides(section: Section, overrides: dict[str, Any]) -> Section:
    """A copy of a config section with the given flags set (None: not given), validated as a whole (flags
    that only make sense together, like --tls-cert and --tls-key, are checked together)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _restart_with_hugepage_malloc() -> None:
    """Re-execute this process (same pid, same arguments, before anything is read) with glibc's huge-page malloc
    tunable, which glibc reads only at start-up: big pushes arrive in freshly mapped buffers, and with 2 MiB pages
    the PS ingests 64 MB pushes 1.4-2.1x faster (`paramserver.numerics.with_hugepage_malloc`). Only when this
    process was started as `serve paramserver` (not when called in-process, e.g. by tests), only under glibc,
    and never over an explicit `glibc.malloc.hugetlb` setting (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out)."""
    if sys.argv[1:3] != ["serve", "paramserver"] or platform.libc_ver()[0] != "glibc" or hugepage_malloc_active():
        return
    os.execve(sys.executable, [sys.executable, "-m", "dist_llm_train", *sys.argv[1:]],
              with_hugepage_malloc(os.environ))


@serve_app.command("paramserver")
def serve_paramserver(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC/ZMQ port (0 = pick a free one).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus /metrics port.")] = None,
    transport: Annotated[str | None, typer.Option(help="grpc or zmq.")] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Checkpoint folder (resume on start).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint every N versions.")] = None,
    secret_file: SecretFileOpt = None,
    tls_cert: Annotated[
        str | None,
        typer.Option(envvar="DLT_TLS_CERT", help="gRPC TLS: the PS's certificate (PEM; `dist-llm-train certs`)."),
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option(envvar="DLT_TLS_KEY", help="gRPC TLS: the PS's private key (PEM).")
    ] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(
            envvar="DLT_TLS_CLIENT_CA", help="Mutual TLS: accept only clients with a certificate from this CA (PEM)."
        ),
    ] = None,
    reflection: Annotated[bool, typer.Option(help="Serve gRPC reflection (off by default).")] = False,
    insecure: InsecureOpt = False,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Run the parameter server (numpy only; no torch). Needs the cluster secret (every call then carries a
    credential; ZMQ runs CURVE) unless --insecure is given. Restarts itself once at start-up, same pid, with
    glibc's huge-page malloc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; setting it to 0 opts out)."""
    _restart_with_hugepage_malloc()
    setup_logging(log_level)
    logging.getLogger(__name__).info("malloc tunables: GLIBC_TUNABLES=%s", os.environ.get("GLIBC_TUNABLES", ""))
    cfg = load_or_exit(config).paramserver
    ps = _with_overrides(cfg, {
        "host": host,
        "port": port,
        "metrics_port": metrics_port,
        "transport": transport,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": checkpoint_every,
        "cluster_secret": cluster_secret_or_exit("parameter server", secret_file, cfg.cluster_secret, insecure),
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_client_ca": tls_client_ca,
        "reflection": reflection or None,
    })
    from dist_llm_train.paramserver.server import serve

    asyncio.run(serve(ps))


@serve_app.command("controller")
def serve_controller(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (0 = pick a free one).")] = None,
    ps_address: Annotated[str, typer.Option(
        envvar="DLT_PS_ADDRESS",
        help="Parameter server HOST:PORT; P sharded PS: HOST:PORT,HOST:PORT,... (shard order).")] = "127.0.0.1:50051",
    ps_transport: Annotated[str, typer.Option(help="grpc or zmq.")] = "grpc",
    state_db: Annotated[str | None, typer.Option(help="SQLite file (state survives restarts).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="priority, gale-shapley or capability.")] = None,
    heartbeat_interval: Annotated[float | None, typer.Option(help="Seconds between worker heartbeats.")] = None,
    miss_limit: Annotated[int | None, typer.Option(help="Missed heartbeats before a worker is dead.")] = None,
    secret_file: SecretFileOpt = None,
    admin_token: Annotated[
        str | None,
        typer.Option(envvar="DLT_ADMIN_TOKEN", help="A static operator token accepted besides minted ones."),
    ] = None,
    public_metrics: Annotated[
        bool, typer.Option(envvar="DLT_PUBLIC_METRICS", help="Serve /metrics without a credential.")
    ] = False,
    public_docs: Annotated[
        bool, typer.Option(envvar="DLT_PUBLIC_DOCS", help="Serve /docs, /redoc, /openapi.json without a credential.")
    ] = False,
    insecure: InsecureOpt = False,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Run the controller (FastAPI + SQLite; no torch). Needs the cluster secret (workers then get their own
    credentials at registration) unless --insecure is given."""
    setup_logging(log_level)
    cfg = load_or_exit(config).controller
    c = _with_overrides(cfg, {
        "host": host,
        "port": port,
        "state_db": state_db,
        "scheduler": scheduler,
        "heartbeat_interval_s": heartbeat_interval,
        "heartbeat_miss_limit": miss_limit,
        "cluster_secret": cluster_secret_or_exit("controller", secret_file, cfg.cluster_secret, insecure),
        "auth_token": admin_token,
        "public_metrics": public_metrics or None,
        "public_docs": public_docs or None,
    })
    if ps_transport not in ("grpc", "zmq"):
        raise typer.BadParameter("--ps-transport must be grpc or zmq")
    from dist_llm_train.paramserver.transport.sharded import parse_addresses

    try:
        parse_addresses(ps_address)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--ps-address") from None
    from dist_llm_train.controller.server import serve

    serve(c, ps_transport, ps_address)


@serve_app.command("worker")
def serve_worker(
    controller: Annotated[str, typer.Option(help="Controller base URL.")] = "http://127.0.0.1:8000",
    name: Annotated[str, typer.Option(help="Worker name (registration is idempotent by name).")] = "worker-0",
    memory_gb: Annotated[float, typer.Option(help="Declared memory (GB), for the scheduler.")] = 16.0,
    flops: Annotated[float, typer.Option(help="Declared relative compute capability.")] = 100.0,
    bandwidth_mbps: Annotated[float, typer.Option(help="Declared link bandwidth (Mbit/s).")] = 1000.0,
    compute_slowdown: Annotated[float, typer.Option(help="Stretch compute time by this factor (>=1).")] = 1.0,
    token: Annotated[
        str | None,
        typer.Option(envvar="DLT_AUTH_TOKEN", help="Join credential (`dist-llm-train token --role join`); the "
                     "controller then issues this worker its own."),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(envvar="DLT_AUTH_TOKEN_FILE", help="File holding the join credential.")
    ] = None,
    insecure: InsecureOpt = False,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    # Per-traffic-class URLs, so each class can go through its own shaped relay.
    controller_heartbeat_url: Annotated[
        str | None, typer.Option(help="Heartbeats go here (default: --controller).")] = None,
    controller_telemetry_url: Annotated[
        str | None, typer.Option(help="Telemetry goes here (default: --controller).")] = None,
    ps_address_override: Annotated[
        str | None, typer.Option(help="Reach the PS at HOST:PORT (shards: HOST:PORT,...) instead of the "
                                 "assignment's address.")] = None,
    links_file: Annotated[
        str | None, typer.Option(help="Shaper ports file: probe the shaped links, report them.")] = None,
    link_probe_interval: Annotated[float, typer.Option(help="Seconds between link probes.")] = 5.0,
    link_report_file: Annotated[
        str | None,
        typer.Option(envvar="DLT_LINK_REPORT_FILE",
                     help="Link records measured beside this worker (kernel shaping: the link exporter's file); "
                     "sent with telemetry."),
    ] = None,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Run a training worker (needs the [worker] extra: torch). Needs a join credential (--token or
    DLT_AUTH_TOKEN) unless --insecure is given. TLS to the PS: DLT_PS_TLS_CA (+ _CERT, _KEY for mutual TLS)."""
    setup_logging(log_level)
    if not token and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as err:
            raise typer.BadParameter(f"--token-file: {err}") from None
    if not token and not insecure:
        from dist_llm_train.cli.common import console

        console.print("[red]refusing to start the worker without a credential[/red]: set --token or "
                      "DLT_AUTH_TOKEN (`dist-llm-train token --role join`), or pass --insecure (docs/security.md)")
        raise typer.Exit(2)
    if compute_slowdown < 1.0:
        raise typer.BadParameter("--compute-slowdown must be >= 1")
    from dist_llm_train.worker.agent import WorkerOptions
    from dist_llm_train.worker.agent import serve_worker as run_agent

    run_agent(
        WorkerOptions(
            controller_url=controller,
            name=name,
            memory_gb=memory_gb,
            flops=flops,
            bandwidth_mbps=bandwidth_mbps,
            compute_slowdown=compute_slowdown,
            auth_token=token,
            metrics_port=metrics_port,
            controller_heartbeat_url=controller_heartbeat_url,
            controller_telemetry_url=controller_telemetry_url,
            ps_address_override=ps_address_override,
            links_file=links_file,
            link_probe_interval_s=link_probe_interval,
            link_report_file=link_report_file,
        )
    )
    logging.getLogger(__name__).info("worker exited cleanly")


serve_app.command("shaper")(serve_shaper)
