"""The one interface every shaping backend implements, the registry that picks one by name, and `auto`.

A backend turns (profile, node, device) into shaping on that device and can undo it. Backends keep a small JSON
state file (under `$DLT_NETEM_STATE_DIR`) describing what they applied, so that `clear` — possibly run by a later
process, e.g. `ip netns exec NS dist-llm-train netem clear --dev IF` — knows exactly what was added and what was
there before. The built-in backends are `tc_netem` and `kernel_fallback` (netem/kernel/) and `userspace`
(netem/userspace/); `choose_shaping_backend` tries them in that order and says why it took the one it took.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dist_llm_train.netem.profile.schema import Profile

log = logging.getLogger(__name__)

STATE_DIR_ENV = "DLT_NETEM_STATE_DIR"
DEFAULT_STATE_DIR = "/run/dist-llm-train/netem"
AUTO_ORDER = ("tc_netem", "kernel_fallback", "userspace")
"""`auto`'s preference: real netem, then the kernel without netem, then relays (which shape only what they carry)."""
# Imported on first use rather than at the top: each of these modules subclasses ShapingBackend from this one.
_BUILTIN_MODULES = (
    "dist_llm_train.netem.kernel.tc_netem",
    "dist_llm_train.netem.kernel.fallback",
    "dist_llm_train.netem.userspace.backend",
)


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


# -- the registry -------------------------------------------------------------------------------------------
REGISTRY: dict[str, type[ShapingBackend]] = {}


BackendT = TypeVar("BackendT", bound=ShapingBackend)


def register(cls: type[BackendT]) -> type[BackendT]:
    """Make a backend selectable by its name (usable as a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def _register_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_shaping_backend(name: str) -> ShapingBackend:
    """Instantiate a backend by name."""
    _register_builtins()
    if name not in REGISTRY:
        raise ShapingError(f"unknown backend {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


def choose_shaping_backend(kernel_only: bool = False) -> tuple[ShapingBackend, list[str]]:
    """The first available backend in AUTO_ORDER, with one reason line per backend tried (for logs and /status)."""
    _register_builtins()
    reasons: list[str] = []
    for name in AUTO_ORDER:
        if name not in REGISTRY or (kernel_only and name == "userspace"):
            continue
        ok, why = REGISTRY[name].available()
        reasons.append(f"{name}: {'yes' if ok else 'no'} — {why}")
        if ok:
            log.info("netem auto chose %s (%s)", name, "; ".join(reasons))
            return REGISTRY[name](), reasons
    raise ShapingError("no shaping backend works here: " + "; ".join(reasons))


# -- what backends record, and the daemons they leave running -------------------------------------------------
def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))


def read_state_file(path: Path) -> dict[str, Any] | None:
    """A JSON state file, or None when absent; a corrupt one is an error that names it."""
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ShapingError(f"corrupt state file {path}; inspect it and delete it") from None
    return data


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def runs_module(pid: int, module: str) -> bool:
    """True while `pid` is a live (not zombie) `python -m module` — so a recycled pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return module.encode() in cmdline and ") Z " not in stat


def reap(pid: int) -> None:
    """Collect `pid`'s exit status if it is our exited child (a no-op otherwise)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
