"""Training strategies: one file per algorithm, registered here, chosen by `training.strategy.name`.

Adding a strategy is one new file: subclass `Strategy` (or `RoundStrategy`), give it a
`StrategyConfig` subclass with a `Literal` name, and `register` it (the built-in ones are
registered below). Config parsing, the PS, the worker, the simulator and the reports all go
through this registry; nothing else switches on a strategy's name.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SerializeAsAny, WithJsonSchema

from dist_llm_train.core.strategies.adaptive import Adaptive, AdaptiveConfig
from dist_llm_train.core.strategies.asynchronous import Async, AsyncConfig
from dist_llm_train.core.strategies.base import (
    UPDATE_KINDS,
    HonestUpdate,
    JobPlan,
    JobView,
    OptimizerSpec,
    RoundBarrier,
    RoundStrategy,
    StalenessGate,
    Strategy,
    StrategyConfig,
    Trainer,
    UpdateKind,
    VersionRule,
    WorkerLedger,
)
from dist_llm_train.core.strategies.buffered_async import BufferedAsync, BufferedAsyncConfig, StalenessBuffer
from dist_llm_train.core.strategies.diloco import DiLoCo, DiLoCoConfig
from dist_llm_train.core.strategies.sparseloco import SparseLoCo, SparseLoCoConfig
from dist_llm_train.core.strategies.streaming_diloco import StreamingDiLoCo, StreamingDiLoCoConfig
from dist_llm_train.core.strategies.sync import Sync, SyncConfig

__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "UPDATE_KINDS",
    "Adaptive",
    "AdaptiveConfig",
    "Async",
    "AsyncConfig",
    "BufferedAsync",
    "BufferedAsyncConfig",
    "DiLoCo",
    "DiLoCoConfig",
    "HonestUpdate",
    "JobPlan",
    "JobView",
    "OptimizerSpec",
    "RoundBarrier",
    "RoundStrategy",
    "StalenessBuffer",
    "StalenessGate",
    "Strategy",
    "StrategyConfig",
    "SparseLoCo",
    "SparseLoCoConfig",
    "StrategyField",
    "StreamingDiLoCo",
    "StreamingDiLoCoConfig",
    "Sync",
    "SyncConfig",
    "Trainer",
    "UpdateKind",
    "VersionRule",
    "WorkerLedger",
    "build_strategy",
    "legacy_strategy_name",
    "parse_strategy_config",
    "register",
    "strategy_fields",
    "strategy_names",
]

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make a strategy selectable by its name (usable as a class decorator)."""
    name = cls.Config.model_fields["name"].default
    if name != cls.name:
        raise ValueError(f"{cls.__name__}: Config's default name {name!r} differs from the strategy's {cls.name!r}")
    existing = STRATEGIES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"strategy {cls.name!r} is already registered by {existing.__name__}")
    STRATEGIES[cls.name] = cls
    return cls


for _builtin in (Sync, Async, Adaptive, BufferedAsync, DiLoCo, SparseLoCo, StreamingDiLoCo):
    register(_builtin)


DEFAULT_STRATEGY = Sync.name


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def legacy_strategy_name(mode: Any, use_async_training: Any, adaptive_staleness: Any) -> str | None:
    """The strategy the seed project's selector keys chose, or None when they say nothing.

    The seed had `mode` (a name) or `use_async_training`, and `adaptive_staleness` turned async
    into per-worker bounds; `config.migrate_legacy_keys` reads old configs through this."""
    if mode is not None:
        return Adaptive.name if mode == Async.name and adaptive_staleness else str(mode)
    if use_async_training:
        return Adaptive.name if adaptive_staleness else Async.name
    if use_async_training is not None or adaptive_staleness is not None:
        return Sync.name
    return None


def strategy_fields(name: str) -> set[str]:
    """The config fields of the strategy called `name` (`name` included); ValueError for an unknown name."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    return set(cls.Config.model_fields)


def parse_strategy_config(value: Any, strict: bool = False) -> StrategyConfig:
    """A strategy config from its name, a mapping with `name`, or an existing config; ValueError otherwise.
    `strict`: JSON types as declared (the controller's API); the PS wire carries options as strings, laxly."""
    if isinstance(value, StrategyConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"a strategy is a name or a mapping with `name`, got {type(value).__name__}")
    name = value.get("name", DEFAULT_STRATEGY)
    cls = STRATEGIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    return cls.Config.model_validate({**value, "name": name}, strict=strict)


def build_strategy(config: StrategyConfig | str | dict[str, Any]) -> Strategy:
    """The strategy object for a config (or a name / mapping, parsed first)."""
    parsed = parse_strategy_config(config)
    return STRATEGIES[parsed.name](parsed)


def _json_schema() -> dict[str, Any]:
    return {
        "anyOf": [{"type": "string", "enum": strategy_names()}]
        + [cls.Config.model_json_schema() for cls in STRATEGIES.values()],
        "description": "The training strategy: its name, or a mapping with `name` and the strategy's own fields",
    }


StrategyField = Annotated[
    SerializeAsAny[StrategyConfig],
    BeforeValidator(parse_strategy_config),
    WithJsonSchema(_json_schema()),
]
"""A config field holding any registered strategy's config (accepts `"diloco"` or `{name: diloco, ...}`)."""
