"""The one interface every shaping backend implements, and the registry that picks one by name.

A backend turns (profile, node, device) into shaping on that device and can undo it. Kernel backends keep a
small state file per (network namespace, device) so that `clear` — possibly run by a later process, e.g. from
`ip netns exec NS dist-llm-train netem clear --dev IF` — knows exactly what was added and what was there before.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from dist_llm_train.netem.profile import Profile


class ShapingError(RuntimeError):
    """Shaping could not be applied, cleared or inspected; the message says which command and why."""


class ShapingBackend(ABC):
    """apply / clear / describe, plus `plan` (the exact commands, for a dry run) and `available` (can it run here)."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this backend works on this machine, and the reason either way."""

    @abstractmethod
    def plan(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None) -> list[list[str]]:
        """The commands `apply` would run, in order, without running them."""

    @abstractmethod
    def apply(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None) -> dict[str, Any]:
        """Shape `dev` for `node` under `profile`; on failure undo what was done and raise ShapingError."""

    @abstractmethod
    def clear(self, dev: str) -> list[list[str]]:
        """Remove everything this backend added on `dev`; returns the commands run. Idempotent."""

    @abstractmethod
    def describe(self, dev: str) -> dict[str, Any]:
        """What is configured on `dev` now: backend, profile, per-class links, live kernel state."""


REGISTRY: dict[str, type[ShapingBackend]] = {}


def register(cls: type[ShapingBackend]) -> type[ShapingBackend]:
    REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str) -> ShapingBackend:
    """Instantiate a backend by name (importing the modules registers them)."""
    from dist_llm_train.netem import backends  # noqa: F401  (registers every backend)

    if name not in REGISTRY:
        raise ShapingError(f"unknown backend {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()
