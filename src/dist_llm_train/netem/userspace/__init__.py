"""Userspace shaping: asyncio TCP relays per (link, traffic class) — no root, what embedded runs use.

    topology.py   which links are shaped (`ShapingTopology`) and the one-way link each relay direction gets
    relay.py      the engine: arrival → token-bucket bottleneck → drawn delay and modelled loss, in order
    shaper.py     the service: every relay of a topology under one profile, its schedule, its ports document
    backend.py    the `userspace` shaping backend: the service as a daemon behind apply / show / clear
    embedded.py   what `dist-llm-train run --profile P` starts and hands each worker

Names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_llm_train.netem._lazy import lazy_attribute

if TYPE_CHECKING:
    from dist_llm_train.netem.userspace.backend import UserspaceBackend, is_topology_spec
    from dist_llm_train.netem.userspace.embedded import EmbeddedShaping
    from dist_llm_train.netem.userspace.relay import Relay, make_relay
    from dist_llm_train.netem.userspace.shaper import ShaperService
    from dist_llm_train.netem.userspace.topology import LinkSpec, ShapingTopology

__all__ = [
    "EmbeddedShaping",
    "LinkSpec",
    "Relay",
    "ShaperService",
    "ShapingTopology",
    "UserspaceBackend",
    "is_topology_spec",
    "make_relay",
]
_SOURCES = {
    "EmbeddedShaping": "embedded",
    "LinkSpec": "topology",
    "Relay": "relay",
    "ShaperService": "shaper",
    "ShapingTopology": "topology",
    "UserspaceBackend": "backend",
    "is_topology_spec": "backend",
    "make_relay": "relay",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _SOURCES, name)
