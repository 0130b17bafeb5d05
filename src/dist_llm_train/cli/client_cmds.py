"""Commands that talk to a running controller: submit-job, status, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from dist_llm_train.cli.common import console, load_or_exit

ControllerOpt = Annotated[
    str, typer.Option("--controller", envvar="DLT_CONTROLLER", help="Controller base URL.")
]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="DLT_AUTH_TOKEN", help="Shared API token.")]


def _client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10)


def _get(url: str, token: str | None, path: str) -> Any:
    try:
        with _client(url, token) as http:
            resp = http.get(path)
    except httpx.TransportError as err:
        console.print(f"[red]cannot reach controller at {url}[/red]: {err}")
        raise typer.Exit(1) from None
    if resp.status_code >= 400:
        console.print(f"[red]{path} -> {resp.status_code}[/red]: {resp.text}")
        raise typer.Exit(1)
    return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text


def submit_job(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config with model/training sections.")],
    controller: ControllerOpt = "http://127.0.0.1:8000",
    name: Annotated[str, typer.Option(help="Job name.")] = "job",
    num_tasks: Annotated[int | None, typer.Option(min=1, help="Data shards (default: training.num_workers).")] = None,
    priority: Annotated[int, typer.Option(help="Scheduling priority.")] = 1,
    token: TokenOpt = None,
) -> None:
    """Submit a training job to a running controller."""
    cfg = load_or_exit(config)
    body: dict[str, Any] = {
        "name": name,
        "priority": priority,
        "config": {
            "model": cfg.model.model_dump(mode="json"),
            "training": cfg.training.model_dump(mode="json", exclude_none=True),
            "network": cfg.network.model_dump(mode="json", exclude_none=True),
        },
    }
    if num_tasks is not None:
        body["num_tasks"] = num_tasks
    try:
        with _client(controller, token) as http:
            resp = http.post("/v1/jobs", json=body)
    except httpx.TransportError as err:
        console.print(f"[red]cannot reach controller at {controller}[/red]: {err}")
        raise typer.Exit(1) from None
    if resp.status_code >= 400:
        console.print(f"[red]refused ({resp.status_code})[/red]: {resp.text}")
        raise typer.Exit(1)
    print(json.dumps(resp.json()))


def status(
    controller: ControllerOpt = "http://127.0.0.1:8000",
    json_out: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
    token: TokenOpt = None,
) -> None:
    """Show a controller's /status: jobs, workers and links."""
    data = _get(controller, token, "/status")
    if json_out:
        print(json.dumps(data, indent=2))
        return
    jobs = Table(title="jobs")
    for col in ("job_id", "state", "step", "loss", "tokens/s"):
        jobs.add_column(col)
    for j in data.get("jobs", []):
        loss = j.get("loss")
        jobs.add_row(
            str(j.get("job_id")), str(j.get("state")), str(j.get("step")),
            f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            f"{float(j.get('tokens_per_s') or 0):,.0f}",
        )
    workers = Table(title="workers")
    for col in ("name", "state", "heartbeat age (s)", "tasks", "throughput"):
        workers.add_column(col)
    for w in data.get("workers", []):
        age = w.get("last_heartbeat_age_s")
        workers.add_row(
            str(w.get("name")), str(w.get("state")),
            f"{age:.1f}" if isinstance(age, int | float) else "-",
            str(len(w.get("tasks", []))), f"{float(w.get('throughput_ewma') or 0):,.1f}",
        )
    console.print(jobs)
    console.print(workers)


def metrics(
    controller: ControllerOpt = "http://127.0.0.1:8000",
    json_out: Annotated[bool, typer.Option("--json", help="Parsed samples as JSON.")] = False,
    prefix: Annotated[str, typer.Option(help="Only metrics whose name starts with this.")] = "dlt_",
    token: TokenOpt = None,
) -> None:
    """Show a service's Prometheus metrics (dlt_* by default) as a table or JSON."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(controller, token, "/metrics")
    samples: list[dict[str, Any]] = [
        {"name": s.name, "labels": s.labels, "value": s.value}
        for fam in text_string_to_metric_families(str(text))
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
