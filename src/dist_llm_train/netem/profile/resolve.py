"""From a profile file to the one-way link each backend configures on one node.

Round trip → one way (applied when `figures: round_trip`):
  * delay and jitter are halved: both directions are shaped identically, so the two one-way delays add back to
    the quoted round trip, and a ±J figure stays ±J because each half contributes ±J/2;
  * probabilities (loss, duplicate, reorder, corrupt) become p₁ = 1 − √(1 − p): the chance that a request *or*
    its reply is hit is then exactly the quoted p; Gilbert–Elliott splits its per-state loss the same way;
  * rate, limit, distribution and correlations are per direction already and are copied.

Who shapes what: every node shapes its **own egress** with the one-way link, so a path A→B is shaped once (by A)
and a round trip A→B→A crosses two one-way links. A node override's `ingress` block adds shaping on that node's
ingress (asymmetric links). Order of overrides, later wins: default link ← class override ← node link ← schedule
segment.
"""

from __future__ import annotations

import math
from typing import Any

from dist_llm_train.netem.profile.classes import TRAFFIC_CLASSES, TrafficClass
from dist_llm_train.netem.profile.schema import Link, LinkOverride, Profile

_PROBABILITIES = ("duplicate_pct", "reorder_pct", "corrupt_pct")


def one_way_pct(round_trip_pct: float) -> float:
    """p₁ with 1 − (1 − p₁)² = p: the per-direction probability giving round-trip probability p."""
    p = round_trip_pct / 100.0
    return round((1.0 - math.sqrt(1.0 - p)) * 100.0, 6)


def _split_fields(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for key in ("delay_ms", "jitter_ms"):
        if out.get(key) is not None:
            out[key] = out[key] / 2.0
    for key in _PROBABILITIES:
        if out.get(key) is not None:
            out[key] = one_way_pct(out[key])
    loss = out.get("loss")
    if loss is not None:
        loss = dict(loss)
        if loss.get("model", "random") == "random":
            loss["pct"] = one_way_pct(loss.get("pct", 0.0))
        else:
            for key in ("bad_loss_pct", "good_loss_pct"):
                if key in loss:
                    loss[key] = one_way_pct(loss[key])
        out["loss"] = loss
    return out


def to_one_way(profile: Profile) -> Profile:
    """The same profile with every figure expressed per direction (idempotent for one-way profiles)."""
    if profile.figures == "one_way":
        return profile
    data = profile.model_dump(exclude_unset=True)
    data["figures"] = "one_way"
    data["link"] = _split_fields(profile.link.model_dump())
    data["classes"] = {c: _split_fields(o.model_dump(exclude_unset=True)) for c, o in profile.classes.items()}
    nodes = {}
    for name, node in profile.nodes.items():
        n = node.model_dump(exclude_unset=True)
        for key in ("link", "ingress"):
            sub = getattr(node, key)
            if sub is not None:
                n[key] = _split_fields(sub.model_dump(exclude_unset=True))
        nodes[name] = n
    data["nodes"] = nodes
    if profile.schedule is not None:
        sched = profile.schedule.model_dump(exclude_unset=True)
        sched["segments"] = [
            {**s.model_dump(exclude_unset=True), "link": _split_fields(s.link.model_dump(exclude_unset=True))}
            for s in profile.schedule.segments
        ]
        data["schedule"] = sched
    return Profile.model_validate(data)


def egress_links(
    profile: Profile,
    node: str | None = None,
    workers: list[str] | None = None,
    segment: LinkOverride | None = None,
) -> dict[TrafficClass | None, Link]:
    """One-way egress link per class for `node`; key None is the default (unmarked) class."""
    p = to_one_way(profile)
    override = p.node_override(node, workers)
    node_link = override.link if override else None
    out: dict[TrafficClass | None, Link] = {None: p.link.merged(node_link).merged(segment)}
    for c in TRAFFIC_CLASSES:
        out[c] = p.link.merged(p.classes.get(c)).merged(node_link).merged(segment)
    return out


def ingress_link(profile: Profile, node: str | None = None, workers: list[str] | None = None) -> Link | None:
    """Extra one-way shaping on `node`'s ingress, or None when the profile is symmetric for this node."""
    p = to_one_way(profile)
    override = p.node_override(node, workers)
    if override is None or override.ingress is None:
        return None
    return Link().merged(override.ingress)


def classes_differ(links: dict[TrafficClass | None, Link]) -> bool:
    """True when some class is shaped differently from the default (per-class trees are then needed)."""
    return any(link != links[None] for link in links.values())
