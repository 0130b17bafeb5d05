"""Profiles: what a WAN link looks like, per traffic class, per node and over time — and where files come from.

    schema.py    the pydantic models (`Profile`, `Link`, overrides, schedules); unknown keys are errors
    loading.py   a name, a path, inline JSON/YAML or a mapping → `Profile` (repo, `$DLT_NETEM_PROFILE_DIR`, wheel)
    trace.py     Mahimahi packet-delivery traces → rate segments of a schedule
    resolve.py   round trip → one way, and the link one node shapes per class (default ← class ← node ← segment)
    classes.py   the four traffic classes and their DSCP marks; `mark_socket` is what services call

Names below are imported on first use, so `import dist_llm_train.netem.profile.classes` (the parameter server
does) costs no more than that module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dist_llm_train.netem._lazy import lazy_attribute

if TYPE_CHECKING:
    from dist_llm_train.netem.profile.classes import DSCP, TRAFFIC_CLASSES, TrafficClass, mark_socket, tos_byte
    from dist_llm_train.netem.profile.loading import available_profiles, load_profile
    from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, to_one_way
    from dist_llm_train.netem.profile.schema import (
        Link,
        LinkOverride,
        NodeOverride,
        Profile,
        ProfileError,
        Schedule,
        Segment,
    )

__all__ = [
    "DSCP",
    "TRAFFIC_CLASSES",
    "Link",
    "LinkOverride",
    "NodeOverride",
    "Profile",
    "ProfileError",
    "Schedule",
    "Segment",
    "TrafficClass",
    "available_profiles",
    "egress_links",
    "ingress_link",
    "load_profile",
    "mark_socket",
    "to_one_way",
    "tos_byte",
]
_SOURCES = {
    **dict.fromkeys(("DSCP", "TRAFFIC_CLASSES", "TrafficClass", "mark_socket", "tos_byte"), "classes"),
    **dict.fromkeys(("available_profiles", "load_profile"), "loading"),
    **dict.fromkeys(("egress_links", "ingress_link", "to_one_way"), "resolve"),
    **dict.fromkeys(("Link", "LinkOverride", "NodeOverride", "Profile", "ProfileError", "Schedule", "Segment"),
                    "schema"),
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _SOURCES, name)
