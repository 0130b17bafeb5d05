"""Commands that talk to a running controller: submit-job, status, metrics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.table import Table

from dist_llm_train.cli.common import console, load_or_exit
from dist_llm_train.cli.run import apply_training_overrides
from dist_llm_train.config import Config, format_validation_error
from dist_llm_train.controller.client import ControllerClient, ControllerUnavailable
from dist_llm_train.controller.errors import ControllerError
from dist_llm_train.controller.models import JobIn, LinkStatusOut

ControllerOpt = Annotated[
    str, typer.Option("--controller", envvar="DLT_CONTROLLER", help="Controller base URL.")
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="DLT_AUTH_TOKEN", help="An admin credential (`dist-llm-train token`; docs/security.md)."
    ),
]


T = TypeVar("T")


def _ask(url: str, token: str | None, call: Callable[[ControllerClient], T]) -> T:
    """One call to the controller; if it is away or refuses, one red line and exit code 1."""
    try:
        with ControllerClient(url, token=token) as controller:
            return call(controller)
    except ControllerUnavailable as err:
        console.print(f"[red]cannot reach controller at {url}[/red]: {err.__cause__ or err}")
        raise typer.Exit(1) from None
    except ControllerError as err:
        console.print(f"[red]refused ({err.status_code})[/red]: {err.message}")
        raise typer.Exit(1) from None


def use_every_worker(cfg: Config, workers: int | None) -> Config:
    """`cfg` sized for a cluster of `workers`: a config that does not set `training.num_workers` itself gets
    that many (and so, by the controller's default, that many tasks: no worker idles); one that sets it keeps it.
    Validated like any training flag (e.g. Krum's n >= 2f + 3 against the new n)."""
    if workers is None or "num_workers" in cfg.training.model_fields_set:
        return cfg
    return apply_training_overrides(cfg, {"num_workers": workers})


def submit_job(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config with model/training sections.")],
    controller: ControllerOpt = "http://127.0.0.1:8000",
    name: Annotated[str, typer.Option(help="Job name.")] = "job",
    num_tasks: Annotated[int | None, typer.Option(min=1, help="Data shards (default: training.num_workers).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=1024,
            help="Workers the cluster runs: the job's training.num_workers (and so its tasks) when the config "
            "does not set it.",
        ),
    ] = None,
    priority: Annotated[int, typer.Option(help="Scheduling priority.")] = 1,
    token: TokenOpt = None,
) -> None:
    """Submit a training job to a running controller."""
    cfg = use_every_worker(load_or_exit(config), workers)
    try:
        job = JobIn(
            name=name,
            priority=priority,
            config={
                "model": cfg.model.model_dump(mode="json"),
                "training": cfg.training.model_dump(mode="json", exclude_none=True),
                "network": cfg.network.model_dump(mode="json", exclude_none=True),
            },
            num_tasks=num_tasks,
        )
    except ValidationError as err:  # checked here by the model the controller would check it with
        console.print(f"[red]invalid job[/red]: {format_validation_error(err)}")
        raise typer.Exit(1) from None
    submitted = _ask(controller, token, lambda c: c.submit_job(job))
    print(json.dumps(submitted.model_dump(mode="json")))


def status(
    controller: ControllerOpt = "http://127.0.0.1:8000",
    json_out: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
    token: TokenOpt = None,
    summary: Annotated[
        bool, typer.Option("--summary", help="Workers as counts only (for large fleets): no per-worker rows.")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="List at most this many workers (by name).")] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many workers (by name).")] = 0,
) -> None:
    """Show a controller's /status: jobs, workers and links."""
    data = _ask(
        controller, token, lambda c: c.status(workers="summary" if summary else "full", offset=offset, limit=limit)
    )
    if json_out:
        # exclude_unset: the keys the controller sent, no more (see WorkerStatusOut)
        print(json.dumps(data.model_dump(mode="json", exclude_unset=True), indent=2))
        return
    jobs = Table(title="jobs")
    for col in ("job_id", "state", "step", "loss", "tokens/s"):
        jobs.add_column(col)
    for j in data.jobs:
        jobs.add_row(
            j.job_id, j.state, str(j.step),
            f"{j.loss:.4f}" if j.loss is not None else "-",
            f"{j.tokens_per_s:,.0f}",
        )
    workers = Table(title="workers")
    for col in ("name", "state", "heartbeat age (s)", "tasks", "throughput"):
        workers.add_column(col)
    for w in data.workers:
        workers.add_row(
            w.name, w.state, f"{w.last_heartbeat_age_s:.1f}",
            str(len(w.tasks)), f"{w.throughput_samples_per_s or 0:,.1f}",
        )
    console.print(jobs)
    fleet, page = data.worker_summary, data.worker_page
    if fleet is not None:
        states = ", ".join(f"{n} {s}" for s, n in sorted(fleet.by_state.items())) or "none"
        age = "-" if fleet.max_heartbeat_age_s is None else f"{fleet.max_heartbeat_age_s:.1f}"
        console.print(f"workers: {fleet.total} ({states}); longest heartbeat silence {age} s")
    if not summary:
        console.print(workers)
        if page is not None and page.next_offset is not None:
            console.print(f"more workers: --offset {page.next_offset}")
        if data.links:
            console.print(links_table(data.links))
        if data.links_out_of_tolerance:
            console.print(f"[yellow]links out of tolerance[/yellow]: {', '.join(data.links_out_of_tolerance)}")


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def links_table(links: list[LinkStatusOut]) -> Table:
    """Each shaped link as its worker last reported it: configured against measured round trip, rate and loss
    ("-": not measured yet, or not measurable by that backend, e.g. loss under the userspace relays)."""
    table = Table(title="links (configured / measured)")
    for col in ("link", "class", "backend", "RTT ms", "rate Mbit/s", "loss %", "within tolerance"):
        table.add_column(col)
    for link in links:
        table.add_row(
            link.link, link.traffic_class, link.backend,
            f"{link.configured_rtt_ms:.1f} / {_figure(link.measured_rtt_ms, '.1f')}",
            f"{_figure(link.configured_rate_mbit, '.1f')} / {_figure(link.measured_rate_mbit, '.1f')}",
            f"{link.configured_loss * 100:.2f} / "
            f"{_figure(None if link.measured_loss is None else link.measured_loss * 100, '.2f')}"
            + (" (modelled)" if link.loss_kind == "modelled" else ""),
            {True: "yes", False: "[red]no[/red]", None: "-"}[link.within_tolerance],
        )
    return table


def metrics(
    controller: ControllerOpt = "http://127.0.0.1:8000",
    json_out: Annotated[bool, typer.Option("--json", help="Parsed samples as JSON.")] = False,
    prefix: Annotated[str, typer.Option(help="Only metrics whose name starts with this.")] = "dlt_",
    token: TokenOpt = None,
) -> None:
    """Show a service's Prometheus metrics (dlt_* by default) as a table or JSON."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _ask(controller, token, lambda c: c.metrics())
    samples: list[dict[str, Any]] = [
        {"name": s.name, "labels": s.labels, "value": s.value}
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith(prefix)
    ]
    if json_out:
        print(json.dumps(samples, indent=2))
        return
    table = Table(title=f"metrics ({prefix}*)")
    for col in ("name", "labels", "value"):
        table.add_column(col)
    for s in samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items()))
        table.add_row(s["name"], labels, f"{s['value']:g}")
    console.print(table)


def register_client_commands(app: typer.Typer) -> None:
    app.command("submit-job")(submit_job)
    app.command("status")(status)
    app.command("metrics")(metrics)
