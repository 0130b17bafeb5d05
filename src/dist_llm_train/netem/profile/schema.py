"""The profile schema: what a WAN link looks like, per traffic class, per node, over time.

Field names follow netem's own vocabulary (delay, jitter, distribution, correlation, loss, duplicate, reorder,
corrupt, rate, limit) with the unit in the name, so a profile reads like the `tc` line it becomes. Every model
forbids unknown keys and range-checks values; `ProfileError` messages name the dotted field path.

Figures in a profile file are **round-trip** by default (`figures: round_trip`) because that is what people quote
for a network ("cellular: 80 ms"). Backends shape one direction at a time, so `resolve.to_one_way` splits them —
see profile/resolve.py for the exact rule.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dist_llm_train.netem.profile.classes import TRAFFIC_CLASSES, TrafficClass

Pct = Annotated[float, Field(ge=0, le=100)]
Distribution = Literal["uniform", "normal", "pareto", "paretonormal"]
LAST_WORKER = "$last_worker"
"""Node-override key that means 'the last worker of the run' (the straggler profile's default)."""


class ProfileError(ValueError):
    """A profile is invalid or cannot be found; the message names the field or the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandomLoss(_Strict):
    """Independent (Bernoulli) loss, optionally correlated with the previous packet as netem does."""

    model: Literal["random"] = "random"
    pct: Pct = 0.0
    correlation_pct: Pct = 0.0


class GilbertElliottLoss(_Strict):
    """Two-state bursty loss (netem `loss gemodel p r 1-h 1-k`).

    p: good→bad transition %, r: bad→good %, bad_loss_pct (1-h): loss in bad state, good_loss_pct (1-k).
    """

    model: Literal["gilbert_elliott"]
    p_pct: Pct
    r_pct: Annotated[float, Field(gt=0, le=100)]
    bad_loss_pct: Pct = 100.0
    good_loss_pct: Pct = 0.0

    @property
    def mean_loss_pct(self) -> float:
        """Stationary loss rate: π_bad·(1-h) + π_good·(1-k)."""
        pi_bad = self.p_pct / (self.p_pct + self.r_pct)
        return pi_bad * self.bad_loss_pct + (1 - pi_bad) * self.good_loss_pct


Loss = Annotated[RandomLoss | GilbertElliottLoss, Field(discriminator="model")]


class Link(_Strict):
    """One direction (or, in a file, the round trip) of a link. Defaults describe a perfect link."""

    delay_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    jitter_ms: Annotated[float, Field(ge=0, le=60_000)] = 0.0
    distribution: Distribution = "normal"
    delay_correlation_pct: Pct = 0.0
    loss: Loss = RandomLoss()
    duplicate_pct: Pct = 0.0
    reorder_pct: Pct = 0.0
    reorder_correlation_pct: Pct = 0.0
    corrupt_pct: Pct = 0.0
    rate_mbit: Annotated[float, Field(gt=0, le=100_000)] | None = None
    limit_packets: Annotated[int, Field(ge=1, le=1_000_000)] = 1000

    @model_validator(mode="after")
    def _reorder_needs_delay(self) -> Link:
        if self.reorder_pct and not self.delay_ms:
            raise ValueError("reorder_pct needs delay_ms > 0 (netem reorders by sending some packets undelayed)")
        return self

    @property
    def loss_pct(self) -> float:
        """Mean loss rate whatever the model."""
        return self.loss.pct if isinstance(self.loss, RandomLoss) else self.loss.mean_loss_pct

    def merged(self, override: LinkOverride | None) -> Link:
        """This link with the fields the override sets replaced (unset fields are inherited)."""
        if override is None:
            return self
        data = self.model_dump()
        # None means "not set" in an override (so a stored, fully-dumped override still merges correctly).
        data.update({k: v for k, v in override.model_dump(exclude_unset=True).items() if v is not None})
        return Link.model_validate(data)


class LinkOverride(_Strict):
    """A partial `Link`: only the fields written are changed."""

    delay_ms: Annotated[float, Field(ge=0, le=60_000)] | None = None
    jitter_ms: Annotated[float, Field(ge=0, le=60_000)] | None = None
    distribution: Distribution | None = None
    delay_correlation_pct: Pct | None = None
    loss: Loss | None = None
    duplicate_pct: Pct | None = None
    reorder_pct: Pct | None = None
    reorder_correlation_pct: Pct | None = None
    corrupt_pct: Pct | None = None
    rate_mbit: Annotated[float, Field(gt=0, le=100_000)] | None = None
    limit_packets: Annotated[int, Field(ge=1, le=1_000_000)] | None = None


class NodeOverride(_Strict):
    """How one node's access link differs from the default.

    `link` replaces fields of the node's egress for every class. `ingress` (optional) shapes what arrives at the
    node *in addition to* the sender's egress shaping — this is what makes a link asymmetric and, with the
    tc_netem backend, puts an IFB device on the node's ingress. `compute_slowdown` is read by the worker, not by
    the network backends.
    """

    link: LinkOverride | None = None
    ingress: LinkOverride | None = None
    compute_slowdown: Annotated[float, Field(ge=1, le=1000)] = 1.0


class Segment(_Strict):
    duration_s: Annotated[float, Field(gt=0, le=86_400)]
    link: LinkOverride = LinkOverride()
    label: str = ""


class TraceSchedule(_Strict):
    """A Mahimahi packet-delivery trace: each line is a millisecond at which one MTU-sized packet may leave.

    The trace is turned into rate segments of `window_ms` (see profile/trace.py) and repeats, as Mahimahi's does.
    """

    file: str | None = None
    inline: list[int] | None = None
    window_ms: Annotated[int, Field(ge=10, le=60_000)] = 1000
    mtu_bytes: Annotated[int, Field(ge=64, le=65_535)] = 1500

    @model_validator(mode="after")
    def _one_source(self) -> TraceSchedule:
        if (self.file is None) == (self.inline is None):
            raise ValueError("give exactly one of file or inline")
        return self


class Schedule(_Strict):
    """Time-varying link: `segments` played once (then the last holds) or as a `cycle`, or a delivery `trace`."""

    kind: Literal["segments", "cycle", "trace"]
    segments: list[Segment] = []
    trace: TraceSchedule | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Schedule:
        if self.kind == "trace":
            if self.trace is None or self.segments:
                raise ValueError("kind trace needs `trace` and no `segments`")
        elif not self.segments or self.trace is not None:
            raise ValueError(f"kind {self.kind} needs at least one segment and no `trace`")
        return self


class Profile(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    figures: Literal["round_trip", "one_way"] = "round_trip"
    link: Link = Link()
    classes: dict[TrafficClass, LinkOverride] = {}
    nodes: dict[str, NodeOverride] = {}
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _known_classes(self) -> Profile:
        unknown = set(self.classes) - set(TRAFFIC_CLASSES)
        if unknown:
            raise ValueError(f"unknown traffic classes {sorted(unknown)}")
        return self

    def node_override(self, node: str | None, workers: list[str] | None = None) -> NodeOverride | None:
        """The override for `node`; `$last_worker` matches the last of `workers` (or a node named so)."""
        if node is None:
            return None
        if node in self.nodes:
            return self.nodes[node]
        if LAST_WORKER in self.nodes and workers and node == workers[-1]:
            return self.nodes[LAST_WORKER]
        return None


def format_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the dotted field path (e.g. `link.loss.pct`)."""
    out = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("random", "gilbert_elliott"))
        out.append(f"{prefix}{path or '<root>'}: {e['msg']}")
    return "; ".join(out)


def parse_profile(data: object, source: str = "<inline>") -> Profile:
    """Validate a mapping as a Profile, raising ProfileError that names the source and field."""
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile must be a mapping, got {type(data).__name__}")
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(f"{source}: {format_error(err)}") from None
