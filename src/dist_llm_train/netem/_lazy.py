"""Re-exporting a package's public names without importing their modules until a name is first used (PEP 562).

Why: the parameter server imports `dist_llm_train.netem.profile.classes` to mark its sockets, and importing
any module first runs every parent package's `__init__`. Those must stay as cheap as the module itself — no
pydantic models, asyncio relays or numpy pulled in just because a package lists what it offers.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any


def lazy_attribute(package: str, sources: Mapping[str, str], name: str) -> Any:
    """`package.name`, imported from the submodule `sources[name]` names; cached on the package afterwards."""
    module = sources.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{module}"), name)
    setattr(sys.modules[package], name, value)
    return value
