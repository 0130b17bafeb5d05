"""Schedulers by name (`controller.scheduler` in the config): one short module each."""

from __future__ import annotations

from collections.abc import Callable

from dist_llm_train.controller.schedulers.base import (
    Assignment,
    Scheduler,
    TaskView,
    Telemetry,
    WorkerView,
    balanced_assign,
)
from dist_llm_train.controller.schedulers.capability import CapabilityScheduler
from dist_llm_train.controller.schedulers.gale_shapley import GaleShapleyScheduler
from dist_llm_train.controller.schedulers.priority import PriorityScheduler

SCHEDULERS: dict[str, Callable[[], Scheduler]] = {
    "priority": PriorityScheduler,
    "gale-shapley": GaleShapleyScheduler,
    "capability": CapabilityScheduler,
}


def get_scheduler(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}") from None


__all__ = [
    "SCHEDULERS",
    "Assignment",
    "Scheduler",
    "TaskView",
    "Telemetry",
    "WorkerView",
    "balanced_assign",
    "get_scheduler",
]
