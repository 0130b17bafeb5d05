"""Job planning: validate a submitted job config and describe jobs for the API.

A job is a config subset (model, training, network) plus a number of data shards; each
shard becomes one task. The config is validated with the same pydantic models the worker
parses, and stored normalised (defaults filled in), so a job keeps meaning the same thing
even if a later release changes a default.
"""

from __future__ import annotations

from typing import Any

from dist_llm_train.config import Config, ConfigError, TrainingConfig, migrate_legacy_keys, parse_config
from dist_llm_train.controller.errors import BadInput
from dist_llm_train.controller.records import Job, Task

JOB_CONFIG_SECTIONS = ("model", "training", "network")


def validate_job_config(raw: dict[str, Any]) -> Config:
    """Parse a job's config; errors name the field path under `config.`."""
    extra = sorted(set(raw) - set(JOB_CONFIG_SECTIONS))
    if extra:
        allowed = ", ".join(JOB_CONFIG_SECTIONS)
        raise BadInput(f"config.{extra[0]}: not allowed in a job config (allowed sections: {allowed})")
    try:
        return parse_config(raw)  # older flat keys are migrated (and warned about) here, like a config file's
    except ConfigError as err:
        parts = str(err).split("; ")
        raise BadInput("; ".join(f"config.{p}" for p in parts)) from None


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
