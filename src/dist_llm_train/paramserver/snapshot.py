"""What a job checkpoint holds: a consistent picture of one job at one version."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dist_llm_train.paramserver.types import JobSpec, TensorSpec


@dataclass
class JobSnapshot:
    """Everything a checkpoint holds; arrays are shared references that are never mutated."""

    spec: JobSpec
    layout: list[TensorSpec]
    params: np.ndarray
    version: int
    members: list[str]
    open_membership: bool  # True until SetMembers: workers join by pushing
    counters: dict[str, int]
    last_loss: float
    optimizer_arrays: dict[str, np.ndarray]
    optimizer_scalars: dict[str, float | int]
    seen_steps: dict[str, list[int]] = field(default_factory=dict)
