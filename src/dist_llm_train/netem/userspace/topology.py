"""Which links the userspace backend shapes, and the one-way link each direction of each relay gets.

A shaping topology names the nodes (workers in order, so `$last_worker` resolves), the targets relays forward
to, and the links: `src → dst` for some traffic classes. The standard embedded run is a star
(`ShapingTopology.star`): every worker reaches the controller over three relays (heartbeat, task, telemetry) and
the parameter server over one (ps_sync) — or, with P parameter-server shards, each shard over one, the shards
named as in Compose (`ps_node_names`: `paramserver` for shard 0, `shard-N` for shard N), so a profile's node
overrides reach the same shard in either deployment.

Directions follow the kernel backends' model, where every node shapes its own egress and a node's `ingress`
block shapes what it receives: `src → dst` ("up") is src's egress for the class then dst's ingress extra;
`dst → src` ("down") is dst's egress then src's ingress extra. Two one-way links in series add delays, add
jitter in quadrature (independent draws), combine loss as 1 − (1 − p)(1 − q) and keep the slower rate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_llm_train.netem.profile.classes import TrafficClass
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link
from dist_llm_train.netem.profile.schema import Link, LinkOverride, Profile, ProfileError, RandomLoss, format_error

NodeName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.$-]+$")]
HostPort = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}$")]
CONTROL_CLASSES: tuple[TrafficClass, ...] = ("heartbeat", "task", "telemetry")


class LinkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    src: NodeName
    dst: NodeName
    classes: Annotated[list[TrafficClass], Field(min_length=1, max_length=4)]

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"


class ShapingTopology(BaseModel):
    """Validated like a profile: unknown keys, unknown targets, duplicate (link, class) pairs are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: Annotated[list[NodeName], Field(max_length=1024)] = []
    targets: dict[NodeName, HostPort]
    links: Annotated[list[LinkSpec], Field(min_length=1, max_length=4096)]

    @model_validator(mode="after")
    def _consistent(self) -> ShapingTopology:
        seen: set[tuple[str, str, str]] = set()
        for i, link in enumerate(self.links):
            if link.dst not in self.targets:
                raise ValueError(f"links[{i}].dst {link.dst!r} has no entry in targets")
            for c in link.classes:
                key = (link.src, link.dst, c)
                if key in seen:
                    raise ValueError(f"links[{i}]: {link.name} {c} is listed twice")
                seen.add(key)
        return self

    @classmethod
    def star(cls, workers: list[str], controller: str, paramserver: str) -> ShapingTopology:
        """Every worker → controller (heartbeat, task, telemetry) and → paramserver (ps_sync); `paramserver`
        may list P shards' addresses in shard order, comma-separated: then → each shard (ps_sync)."""
        shards = [a.strip() for a in paramserver.split(",")]
        nodes = ps_node_names(len(shards))
        links = [
            LinkSpec(src=w, dst=d, classes=list(c))
            for w in workers
            for d, c in (("controller", CONTROL_CLASSES), *((n, ("ps_sync",)) for n in nodes))
        ]
        return cls(workers=workers, targets={"controller": controller, **dict(zip(nodes, shards, strict=True))},
                   links=links)

    @property
    def ps_nodes(self) -> list[str]:
        """The parameter-server nodes (shard order) among this topology's targets."""
        names = ps_node_names(len(self.targets))
        return [n for n in names if n in self.targets]

    def target(self, node: str) -> tuple[str, int]:
        host, _, port = self.targets[node].rpartition(":")
        return host.strip("[]"), int(port)


def ps_node_names(shards: int) -> list[str]:
    """Node names of P parameter-server shards, as Compose names them: `paramserver`, then `shard-1`, …"""
    return ["paramserver", *(f"shard-{i}" for i in range(1, shards))]


def parse_topology(data: object, source: str = "<topology>") -> ShapingTopology:
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a topology must be a JSON object, got {type(data).__name__}")
    try:
        return ShapingTopology.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"{source}: {format_error(err)}") from None


def load_topology(path: str | Path) -> ShapingTopology:
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"topology file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ProfileError(f"{p}: cannot parse: {err}") from None
    return parse_topology(data, str(p))


def in_series(first: Link, second: Link | None) -> Link:
    """The one-way link equivalent to `first` followed by `second` (see the module docstring)."""
    if second is None:
        return first
    rates = [r for r in (first.rate_mbit, second.rate_mbit) if r]
    loss: Any = first.loss
    if second.loss_pct:
        p = 1 - (1 - first.loss_pct / 100) * (1 - second.loss_pct / 100)
        loss = second.loss if not first.loss_pct else RandomLoss(pct=round(p * 100, 6))
    return first.model_copy(
        update={
            "delay_ms": first.delay_ms + second.delay_ms,
            "jitter_ms": round(math.hypot(first.jitter_ms, second.jitter_ms), 6),
            "loss": loss,
            "rate_mbit": min(rates) if rates else None,
            "limit_packets": min(first.limit_packets, second.limit_packets),
        }
    )


def directions(
    profile: Profile, topo: ShapingTopology, link: LinkSpec, cls: TrafficClass, segment: LinkOverride | None = None
) -> tuple[Link, Link]:
    """(up, down) one-way links of one relay: src → dst and dst → src."""
    w = topo.workers or None
    up = in_series(egress_links(profile, link.src, w, segment)[cls], ingress_link(profile, link.dst, w))
    down = in_series(egress_links(profile, link.dst, w, segment)[cls], ingress_link(profile, link.src, w))
    return up, down


def summarise(link: Link) -> str:
    """One line in netem's words, for plans and logs."""
    parts = [f"delay {link.delay_ms:g}ms"]
    if link.jitter_ms:
        parts.append(f"jitter {link.jitter_ms:g}ms {link.distribution}")
    if link.loss_pct:
        parts.append(f"loss {link.loss_pct:.4g}% (modelled)")
    parts.append(f"rate {link.rate_mbit:g}mbit" if link.rate_mbit else "rate unlimited")
    return " ".join(parts)
