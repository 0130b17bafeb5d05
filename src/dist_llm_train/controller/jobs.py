"""Job planning: validate a submitted job config and describe jobs for the API.

A job is a config subset (model, training, network) plus a number of data shards; each
shard becomes one task. The config is validated with the same pydantic models the worker
parses (and that the OpenAPI document describes), and stored normalised (defaults filled
in), so a job keeps meaning the same thing even if a later release changes a default.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from dist_llm_train.config import Config, ConfigError, TrainingConfig, format_validation_error, migrate_legacy_keys
from dist_llm_train.controller.errors import BadInput
from dist_llm_train.controller.records import Job, Task
from dist_llm_train.core.strategies import parse_strategy_config

log = logging.getLogger(__name__)

JOB_CONFIG_SECTIONS = ("model", "training", "network")


def validate_job_config(raw: dict[str, Any]) -> Config:
    """Parse a job's config; errors name the field path under `config.`."""
    extra = sorted(set(raw) - set(JOB_CONFIG_SECTIONS))
    if extra:
        allowed = ", ".join(JOB_CONFIG_SECTIONS)
        raise BadInput(f"config.{extra[0]}: not allowed in a job config (allowed sections: {allowed})")
    try:
        # The seed's flat keys are moved to their new paths, as for a config file (the OpenAPI document lists
        # only the new ones).
        migrated, legacy = migrate_legacy_keys(raw)
    except ConfigError as err:
        raise BadInput(f"config: {err}") from None
    if legacy:
        log.warning("job config uses legacy keys, read as their new paths: %s", "; ".join(legacy))
    else:
        migrated = raw  # exactly what the document describes (migration also fills in e.g. `strategy: null`)
    try:
        # Strict JSON types, as the OpenAPI document states them (a config file's YAML is read laxly instead).
        cfg = Config.model_validate(migrated, strict=True)
        strategy = migrated.get("training", {}).get("strategy")
        if isinstance(strategy, dict):  # parsed by its own validator, which strict mode does not reach
            parse_strategy_config(strategy, strict=True)
    except ValidationError as err:
        raise BadInput("; ".join(f"config.{p}" for p in format_validation_error(err).split("; "))) from None
    return cfg


def normalised_sections(cfg: Config) -> dict[str, Any]:
    return {
        "model": cfg.model.model_dump(mode="json"),
        "training": cfg.training.model_dump(mode="json"),
        "network": cfg.network.model_dump(mode="json"),
    }


def training_of(job: Job) -> TrainingConfig:
    """A stored job's training section (jobs stored before the nested layout are migrated on read)."""
    migrated, _ = migrate_legacy_keys({"training": job.config.get("training", {})})
    return TrainingConfig.model_validate(migrated["training"])


def task_view(task: Task, worker_names: dict[str, str]) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "shard_id": task.shard_id,
        "state": task.state,
        "worker_id": task.worker_id,
        "worker_name": worker_names.get(task.worker_id or ""),
        "attempts": task.attempts,
        "last_error": task.last_error,
    }


def job_view(
    job: Job, tasks: list[Task], worker_names: dict[str, str], step: int, loss: float | None
) -> dict[str, Any]:
    """The job as GET /v1/jobs/{id} shows it: config, tasks with their workers, progress."""
    counts = {s: sum(1 for t in tasks if t.state == s) for s in ("pending", "assigned", "completed")}
    training = training_of(job)
    step = min(step, training.versions)  # no PS version past the job's last (legacy telemetry may claim one)
    return {
        "job_id": job.job_id,
        "name": job.name,
        "state": job.state,
        "priority": job.priority,
        "num_tasks": job.num_tasks,
        "required_flops": job.required_flops,
        "required_memory_gb": job.required_memory_gb,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "error": job.error,
        "config": job.config,
        "tasks": [task_view(t, worker_names) for t in tasks],
        "progress": {
            "tasks_total": len(tasks),
            "tasks_pending": counts["pending"],
            "tasks_assigned": counts["assigned"],
            "tasks_completed": counts["completed"],
            "step": step,
            "total_steps": training.steps,
            "fraction": min(1.0, step / training.steps),
            "loss": loss,
        },
    }
