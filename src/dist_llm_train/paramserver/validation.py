"""Checks every request must pass before it may touch a job.

Each function raises `PSError(INVALID_ARGUMENT, ...)` naming the offending field, and has no
side effects, so the store can run them all before it changes anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from dist_llm_train.paramserver.types import ErrorCode, JobSpec, PSError, PushHeader, TensorSpec

# Job ids become checkpoint file names, so they are restricted to a filename-safe alphabet.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_NAME_LEN = 256
MAX_MEMBERS = 100_000
MAX_WAIT_S = 3600.0
MODES = ("sync", "async", "adaptive", "diloco")
ROUND_MODES = ("sync", "diloco")  # a barrier per version; the others apply each update on arrival
# The kind of update each strategy's workers push; DiLoCo's are pseudo-gradients (before - after).
KIND_OF_MODE = {"sync": "gradient", "async": "gradient", "adaptive": "gradient", "diloco": "pseudo_gradient"}
OPTIMIZERS = ("sgd", "adam")
KINDS = ("gradient", "pseudo_gradient")


def invalid(message: str) -> PSError:
    return PSError(ErrorCode.INVALID_ARGUMENT, message)


def check_job_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise invalid(f"job_id {job_id!r} must match {JOB_ID_RE.pattern}")


def check_worker_id(worker_id: str, field: str = "worker_id") -> None:
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > MAX_NAME_LEN:
        raise invalid(f"{field} must be a non-empty string of at most {MAX_NAME_LEN} characters")


def _finite(value: float, field: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise invalid(f"{field} must be a finite number, got {value!r}")
    return float(value)


def check_spec(spec: JobSpec) -> None:
    check_job_id(spec.job_id)
    if spec.mode not in MODES:
        raise invalid(f"spec.mode must be one of {MODES}, got {spec.mode!r}")
    if spec.optimizer not in OPTIMIZERS:
        raise invalid(f"spec.optimizer must be one of {OPTIMIZERS}, got {spec.optimizer!r}")
    if _finite(spec.learning_rate, "spec.learning_rate") <= 0:
        raise invalid("spec.learning_rate must be > 0")
    if not 0.0 <= _finite(spec.momentum, "spec.momentum") < 1.0:
        raise invalid("spec.momentum must be in [0, 1)")
    if _finite(spec.straggler_timeout_s, "spec.straggler_timeout_s") <= 0:
        raise invalid("spec.straggler_timeout_s must be > 0")
    if not isinstance(spec.max_staleness, int) or spec.max_staleness < 0:
        raise invalid("spec.max_staleness must be an integer >= 0")
    if not isinstance(spec.total_steps, int) or spec.total_steps < 1:
        raise invalid("spec.total_steps must be an integer >= 1")
    for key, value in spec.aggregation_params.items():
        _finite(value, f"spec.aggregation_params[{key!r}]")


def check_layout(layout: Sequence[TensorSpec], num_params: int) -> None:
    """Every tensor lies inside the vector, names are unique and tensors do not overlap."""
    if num_params < 1:
        raise invalid(f"num_params must be >= 1, got {num_params}")
    if not layout:
        raise invalid("layout must name at least one tensor")
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for t in layout:
        if not t.name or len(t.name) > MAX_NAME_LEN:
            raise invalid(f"layout tensor name {t.name!r} must be 1..{MAX_NAME_LEN} characters")
        if t.name in names:
            raise invalid(f"layout names tensor {t.name!r} twice")
        names.add(t.name)
        if any(d < 0 for d in t.shape):
            raise invalid(f"layout tensor {t.name!r} has a negative dimension {t.shape}")
        if t.offset < 0 or t.offset + t.size > num_params:
            raise invalid(
                f"layout tensor {t.name!r} [{t.offset}, {t.offset + t.size}) lies outside "
                f"the {num_params}-element vector"
            )
        spans.append((t.offset, t.offset + t.size, t.name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise invalid(f"layout tensors {a!r} and {b!r} overlap")


def check_members(members: Iterable[str]) -> list[str]:
    """Validate and de-duplicate (keeping first-seen order)."""
    out: list[str] = []
    seen: set[str] = set()
    for m in members:
        check_worker_id(m, "members[]")
        if m not in seen:
            seen.add(m)
            out.append(m)
    if len(out) > MAX_MEMBERS:
        raise invalid(f"at most {MAX_MEMBERS} members")
    return out


def check_header(h: PushHeader) -> None:
    check_job_id(h.job_id)
    check_worker_id(h.worker_id)
    if h.step < 0:
        raise invalid(f"step must be >= 0, got {h.step}")
    if h.base_version < 0:
        raise invalid(f"base_version must be >= 0, got {h.base_version}")
    if h.payload_bytes < 0 or h.num_samples < 0:
        raise invalid("payload_bytes and num_samples must be >= 0")
    if h.kind not in KINDS:
        raise invalid(f"kind must be one of {KINDS}, got {h.kind!r}")
    _finite(h.loss, "loss")


def check_wait(min_version: int, wait_timeout_s: float) -> float:
    if min_version < 0:
        raise invalid(f"min_version must be >= 0, got {min_version}")
    wait = _finite(wait_timeout_s, "wait_timeout_s")
    if wait < 0:
        raise invalid("wait_timeout_s must be >= 0")
    return min(wait, MAX_WAIT_S)
