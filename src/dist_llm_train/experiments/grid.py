"""An experiment grid: one base config, a few axes, and the cartesian product of their values.

A grid file names *what to vary*, not how to run it. Each axis value is either a bare name (mapped to one
config key by `axis_keys`, e.g. `strategy: async` sets `training.strategy.name: async`) or a mapping `{name, set}`
whose `set` holds dotted config keys, so one value can change several settings at once (a codec plus its
ratio, an attack plus how many workers run it). New strategies, codecs and rules therefore work through the
grid as soon as the config accepts them; until then the cell is *refused* when it runs, and recorded as
such, rather than breaking the grid.

Cell ids are a hash of everything that decides what a cell runs (base mapping as written, overrides,
profile, workers, seed, steps), so re-running a grid finds the cells it already finished and an edited grid
re-runs only what changed.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dist_llm_train.config import Config, ConfigError, load_config, parse_config

MAX_CELLS = 10_000
"""A grid larger than this is almost surely a typo (and would run for weeks on embedded)."""

NAMED_AXES = ("strategy", "codec", "aggregation", "attack")
"""Axes whose bare values are written to one config key (see `Grid.axis_keys`)."""

DEFAULT_AXIS_KEYS = {
    "strategy": "training.strategy.name",
    "codec": "training.codec.name",
    "aggregation": "training.aggregation.rule",
    "attack": "training.attack.name",
}
UNSET = "none"
"""A bare `attack: none` or `profile: none` sets nothing: no attack, no shaping."""

CONFIG_SECTIONS = frozenset(Config.model_fields)


class GridError(ValueError):
    """A grid file is invalid; the message names the dotted field path (e.g. `axes.workers.0`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_dotted(key: str) -> str:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"config key {key!r} must be dotted, like training.strategy.name")
    if parts[0] not in CONFIG_SECTIONS:
        raise ValueError(
            f"config key {key!r}: unknown section {parts[0]!r}; sections: {sorted(CONFIG_SECTIONS)}"
        )
    return key


class AxisValue(_Strict):
    """One value of an axis: a label for tables and the config keys it sets."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.+=-]+$")]
    set: dict[str, Any] = {}

    @field_validator("set")
    @classmethod
    def _dotted_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            _check_dotted(key)
        return v


AxisEntry = StrictStr | AxisValue


class Axes(_Strict):
    """The axes of the grid. An omitted axis has one value: whatever the base config says."""

    profile: list[StrictStr | None] | None = None
    strategy: list[AxisEntry] | None = None
    codec: list[AxisEntry] | None = None
    aggregation: list[AxisEntry] | None = None
    attack: list[AxisEntry] | None = None
    workers: list[Annotated[StrictInt, Field(ge=1, le=64)]] | None = None
    seed: list[StrictInt] | None = None
    extra: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], list[AxisValue]] = {}

    @field_validator("profile", "strategy", "codec", "aggregation", "attack", "workers", "seed")
    @classmethod
    def _not_empty(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and not v:
            raise ValueError("an axis needs at least one value (omit it to use the base config's value)")
        return v

    @field_validator("profile")
    @classmethod
    def _profiles_exist(cls, v: list[str | None] | None) -> list[str | None] | None:
        from dist_llm_train.netem.profile.loading import load_profile
        from dist_llm_train.netem.profile.schema import ProfileError

        for name in v or []:
            if name is not None and name != UNSET:
                try:
                    load_profile(name)
                except ProfileError as err:
                    raise ValueError(str(err)) from None
        return v

    @field_validator("extra")
    @classmethod
    def _extra_not_empty(cls, v: dict[str, list[AxisValue]]) -> dict[str, list[AxisValue]]:
        clash = sorted(set(v) & {"profile", "workers", "seed", *NAMED_AXES})
        if clash:
            raise ValueError(f"extra axes may not reuse built-in axis names {clash}")
        for name, values in v.items():
            if not values:
                raise ValueError(f"extra axis {name!r} needs at least one value")
        return v


class Target(_Strict):
    """The loss a run must reach: the corpus' entropy floor plus a margin (nats), or an absolute loss.

    `window` is how many consecutive telemetry rows (all workers interleaved by time) are averaged before
    comparing, so one lucky batch does not count as reaching the target; default two rows per worker.
    """

    floor_plus: Annotated[float, Field(ge=0, le=100)] | None = None
    loss: Annotated[float, Field(gt=0, le=1000)] | None = None
    window: Annotated[int, Field(ge=1, le=10_000)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.floor_plus is None) == (self.loss is None):
            raise ValueError(
                "give exactly one of floor_plus (nats above the entropy floor) or loss (absolute)"
            )
        return self

    def resolve(self, loss_floor: float | None) -> float | None:
        """The target loss for a run whose corpus has this floor; None when the floor is unknown."""
        if self.loss is not None:
            return self.loss
        assert self.floor_plus is not None
        return None if loss_floor is None else loss_floor + self.floor_plus

    def describe(self) -> str:
        if self.loss is not None:
            return f"loss <= {self.loss}"
        return f"loss <= entropy floor + {self.floor_plus}"


class Grid(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    base: dict[str, Any] = {}
    base_config: str | None = None
    steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    repeats: Annotated[int, Field(ge=1, le=100)] = 1
    target: Target = Target(floor_plus=0.10)
    axes: Axes = Axes()
    axis_keys: dict[str, str] = {}
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 1800.0

    @field_validator("axis_keys")
    @classmethod
    def _known_axis_keys(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(NAMED_AXES))
        if unknown:
            raise ValueError(f"unknown axes {unknown}; axis_keys maps {list(NAMED_AXES)}")
        for key in v.values():
            _check_dotted(key)
        return v

    def key_for(self, axis: str) -> str:
        return self.axis_keys.get(axis, DEFAULT_AXIS_KEYS[axis])


@dataclass(frozen=True)
class Cell:
    """One point of the grid, fully resolved: labels for tables and what to change in the base config."""

    cell_id: str
    labels: dict[str, str]
    profile: str | None
    workers: int
    seed: int
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def label(self, varying: list[str] | None = None) -> str:
        """`strategy=sync codec=none ...`, restricted to `varying` axes when given."""
        keys = varying if varying is not None else list(self.labels)
        return " ".join(f"{k}={self.labels[k]}" for k in keys if k in self.labels) or self.cell_id


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if isinstance(nxt, str):  # a sub-config given by its name alone (`strategy: diloco`)
            nxt = node[part] = {"name": nxt}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


@dataclass
class ResolvedGrid:
    """A validated grid plus its base mapping (read from `base_config` and `base`)."""

    grid: Grid
    base: dict[str, Any]
    source: Path | None = None

    def config_for(self, cell: Cell, seed_offset: int = 0) -> Config:
        """The cell's config; ConfigError (naming the field) when the config refuses a value."""
        data = copy.deepcopy(self.base)
        _set_dotted(data, "training.steps", cell.steps)  # an axis value may set its own (e.g. a budget of updates)
        for key, value in cell.overrides.items():
            _set_dotted(data, key, value)
        _set_dotted(data, "training.num_workers", cell.workers)
        _set_dotted(data, "training.seed", cell.seed + seed_offset)
        if cell.profile is not None:
            _set_dotted(data, "network.profile", cell.profile)
        return parse_config(data)

    def varying_axes(self, cells: list[Cell]) -> list[str]:
        """Axes with more than one value in `cells` (what a table needs to tell cells apart)."""
        if not cells:
            return []
        return [k for k in cells[0].labels if len({c.labels.get(k) for c in cells}) > 1]

    def expand(self) -> list[Cell]:
        return expand(self)


def _entries(grid: Grid, axis: str, base: Config) -> list[AxisValue]:
    raw: list[Any] | None = getattr(grid.axes, axis)
    if raw is None:
        current = {
            "strategy": base.training.strategy.name,
            "codec": base.training.codec.name,
            "aggregation": base.training.aggregation.rule,
            "attack": UNSET,
        }[axis]
        return [AxisValue(name=str(current))]
    out = []
    for entry in raw:
        if isinstance(entry, AxisValue):
            out.append(entry)
        elif axis == "attack" and entry == UNSET:
            out.append(AxisValue(name=UNSET))
        else:
            out.append(AxisValue(name=entry, set={grid.key_for(axis): entry}))
    return out


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_id_for(base: dict[str, Any], overrides: dict[str, Any], profile: str | None, workers: int, seed: int,
                steps: int) -> str:
    """12 hex digits of SHA-256 over the cell's resolved values; labels do not enter (renaming keeps ids)."""
    payload = {"base": base, "overrides": overrides, "profile": profile, "workers": workers, "seed": seed,
               "steps": steps}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:12]


def expand(rg: ResolvedGrid) -> list[Cell]:
    """The cartesian product of every axis, in file order; GridError when two axes set the same key."""
    grid = rg.grid
    base_cfg = parse_config(rg.base)
    named: list[tuple[str, list[AxisValue]]] = [(a, _entries(grid, a, base_cfg)) for a in NAMED_AXES]
    named += sorted(grid.axes.extra.items())
    profiles = [None if p in (None, UNSET) else p for p in (grid.axes.profile or [base_cfg.network.profile])]
    workers = grid.axes.workers or [base_cfg.training.num_workers]
    seeds = grid.axes.seed or [base_cfg.training.seed]
    steps = grid.steps or base_cfg.training.steps
    total = len(profiles) * len(workers) * len(seeds)
    for _, values in named:
        total *= len(values)
    if total > MAX_CELLS:
        raise GridError(f"axes: the grid has {total} cells, more than {MAX_CELLS}")
    _check_disjoint(named)
    cells = []
    value_lists = [values for _, values in named]
    for profile, n, seed in itertools.product(profiles, workers, seeds):
        for picks in itertools.product(*value_lists):
            overrides: dict[str, Any] = {}
            labels = {"profile": profile or UNSET}
            for (axis, _), value in zip(named, picks, strict=True):
                overrides.update(value.set)
                labels[axis] = value.name
            labels |= {"workers": str(n), "seed": str(seed)}
            cid = cell_id_for(rg.base, overrides, profile, n, seed, steps)
            cells.append(Cell(cid, labels, profile, n, seed, steps, overrides))
    dupes = sorted(cid for cid, n in Counter(c.cell_id for c in cells).items() if n > 1)
    if dupes:
        raise GridError(f"axes: some cells resolve to identical settings (ids {dupes}); drop repeated values")
    return cells


def _check_disjoint(named: list[tuple[str, list[AxisValue]]]) -> None:
    owner: dict[str, str] = {}
    for axis, values in named:
        for key in {k for v in values for k in v.set}:
            if key in owner and owner[key] != axis:
                raise GridError(f"axes.{owner[key]} and axes.{axis} both set {key}; one key, one axis")
            owner[key] = axis


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("str", "AxisValue", "int", "none"))
        lines.append(f"{prefix}{path or '<root>'}: {e['msg']}")
    return "; ".join(lines)


def parse_grid(data: Any, source: Path | None = None) -> ResolvedGrid:
    """Validate a grid mapping; `base_config` is read relative to the grid file."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise GridError(f"{where}a grid must be a mapping, got {type(data).__name__}")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as err:
        raise GridError(where + _format(err)) from None
    base: dict[str, Any] = {}
    if grid.base_config:
        path = Path(grid.base_config)
        if not path.is_absolute() and source is not None:
            path = source.parent / path
        try:
            load_config(path)
            base = yaml.safe_load(path.read_text()) or {}
        except ConfigError as err:
            raise GridError(f"{where}base_config: {err}") from None
    base = _merge(base, grid.base)
    try:
        parse_config(base)
    except ConfigError as err:
        raise GridError(where + "; ".join(f"base.{part}" for part in str(err).split("; "))) from None
    rg = ResolvedGrid(grid, base, source)
    expand(rg)  # surface axis clashes and size errors at load time
    return rg


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if both else copy.deepcopy(v)
    return out


def load_grid(path: str | Path) -> ResolvedGrid:
    p = Path(path)
    if not p.is_file():
        raise GridError(f"grid file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{p}: cannot parse YAML: {err}") from None
    return parse_grid(data, p)
