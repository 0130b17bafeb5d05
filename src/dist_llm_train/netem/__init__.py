"""WAN emulation: shape every link of a run like a real network, and measure what the traffic actually saw.

    profile/     what a link looks like (schema, loading, resolution per class/node/schedule, traffic classes)
    backends.py  the `ShapingBackend` interface, its registry, and `auto` (the best backend that works here)
    kernel/      `tc_netem` and `kernel_fallback`: real packets on a real interface
    userspace/   `userspace`: asyncio TCP relays, no root; the shaper service embedded runs start
    sampling.py  per-packet delay and loss draws, shared by the fallback's delayer and the relays
    measure/     probes, the workers' link monitor, fidelity checks

The CLI is `dist-llm-train netem …` (src/dist_llm_train/cli/netem.py), also `python -m dist_llm_train.netem`.
See docs/netem.md. Names below are imported on first use, so importing a submodule stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_llm_train.netem._lazy import lazy_attribute

if TYPE_CHECKING:
    from dist_llm_train.netem.backends import (
        ShapingBackend,
        ShapingError,
        choose_shaping_backend,
        get_shaping_backend,
        register,
    )
    from dist_llm_train.netem.profile.loading import load_profile
    from dist_llm_train.netem.profile.schema import Profile, ProfileError

__all__ = [
    "Profile",
    "ProfileError",
    "ShapingBackend",
    "ShapingError",
    "choose_shaping_backend",
    "get_shaping_backend",
    "load_profile",
    "register",
]
_SOURCES = {
    **dict.fromkeys(
        ("ShapingBackend", "ShapingError", "choose_shaping_backend", "get_shaping_backend", "register"), "backends"
    ),
    "load_profile": "profile.loading",
    "Profile": "profile.schema",
    "ProfileError": "profile.schema",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _SOURCES, name)
