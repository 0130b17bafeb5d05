"""Pick the best backend that works here — netem, then the fallback, then userspace — and say why."""

from __future__ import annotations

import logging

from dist_llm_train.netem.backends.base import REGISTRY, ShapingBackend, get_backend

log = logging.getLogger(__name__)
ORDER = ("tc_netem", "kernel_fallback", "userspace")


def choose(kernel_only: bool = False) -> tuple[ShapingBackend, list[str]]:
    """The first available backend in ORDER, with one reason line per backend tried (for logs and /status)."""
    get_backend("tc_netem")  # ensure registration
    reasons: list[str] = []
    for name in ORDER:
        if name not in REGISTRY or (kernel_only and name == "userspace"):
            continue
        ok, why = REGISTRY[name].available()
        reasons.append(f"{name}: {'yes' if ok else 'no'} — {why}")
        if ok:
            log.info("netem auto chose %s (%s)", name, "; ".join(reasons))
            return REGISTRY[name](), reasons
    from dist_llm_train.netem.backends.base import ShapingError

    raise ShapingError("no shaping backend works here: " + "; ".join(reasons))
