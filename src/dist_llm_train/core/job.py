"""A job as the parameter server sees it: typed, parsed once at the wire edge.

`JobSpec` is what the PS and its callers work with: the strategy's own config object, the
optimizer the PS runs, the aggregation rule and central DP. `WireJobSpec` is the flat form the
wire protocol has always carried (the fields of `protos/.../paramserver.proto`'s `JobSpec`, also
the ZMQ map and the checkpoint JSON): strategy extensions travel in `options` as strings, so a new
strategy field never needs a wire change. `JobSpec.from_wire` is the only parser of that form; a
misspelt option or an out-of-range value is refused there, naming the field, before any job exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from dist_llm_train.core.codecs import CodecConfig
from dist_llm_train.core.downlink import enabled as downlink_enabled
from dist_llm_train.core.privacy import DPSettings
from dist_llm_train.core.strategies import (
    DEFAULT_STRATEGY,
    StrategyConfig,
    SyncConfig,
    parse_strategy_config,
    strategy_fields,
)
from dist_llm_train.core.strategies.base import OptimizerSpec
from dist_llm_train.core.update_bound import UpdateBoundConfig

OPTIMIZERS = ("sgd", "adam")
OPTIMIZER_OPTIONS = ("nesterov", "adam_beta2", "adam_eps")
PRIVACY_OPTIONS = ("dp_noise_multiplier", "dp_clip", "dp_delta", "dp_seed")
DOWNLINK_OPTION = "downlink"  # the downlink codec config as JSON (`core.downlink`); absent: full pulls
UPDATE_BOUND_OPTION = "update_bound"  # the per-update bound as JSON (`core.update_bound`); absent: the default
# Strategy fields with a proto field of their own; every other strategy field travels in `options`.
_DEDICATED_FIELDS = ("max_staleness", "straggler_timeout_s")


@dataclass(frozen=True)
class WireJobSpec:
    """The job fields on the wire, one to one with the proto message (`mode` is the strategy's name)."""

    job_id: str
    mode: str = DEFAULT_STRATEGY
    max_staleness: int = 5
    straggler_timeout_s: float = 30.0
    optimizer: str = "adam"
    learning_rate: float = 0.003
    momentum: float = 0.9
    aggregation: str = "mean"
    aggregation_params: dict[str, float] = field(default_factory=dict)
    total_steps: int = 200
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    strategy: StrategyConfig = field(default_factory=SyncConfig)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    aggregation: str = "mean"
    aggregation_params: dict[str, float] = field(default_factory=dict)
    total_steps: int = 200
    privacy: DPSettings | None = None  # central DP on the PS (mode "central"); None: off
    privacy_seed: int | None = None  # None: OS entropy (production); a seed only for reproducible tests
    downlink: CodecConfig | None = None  # pulls as compressed deltas (`core.downlink`); None: full pulls
    update_bound: UpdateBoundConfig = field(default_factory=UpdateBoundConfig)  # on unless a job turns it off

    def __post_init__(self) -> None:
        if self.downlink is not None and not downlink_enabled(self.downlink):
            object.__setattr__(self, "downlink", None)  # codec `none` means full pulls: one spelling of it

    @property
    def mode(self) -> str:
        """The strategy's name (the wire's word for it)."""
        return self.strategy.name

    def to_wire(self) -> WireJobSpec:
        strategy = self.strategy.model_dump(exclude={"name"})
        options = {
            k: _option_text(v)
            for k, v in strategy.items()
            if k not in _DEDICATED_FIELDS and v is not None and v != {}  # an empty mapping is the default
        }
        opt = self.optimizer
        if opt.nesterov:
            options["nesterov"] = "true"
        if opt.adam_beta2 != OptimizerSpec.adam_beta2:
            options["adam_beta2"] = repr(opt.adam_beta2)
        if opt.adam_eps != OptimizerSpec.adam_eps:
            options["adam_eps"] = repr(opt.adam_eps)
        if self.privacy is not None:
            options |= {
                "dp_noise_multiplier": repr(self.privacy.noise_multiplier),
                "dp_clip": repr(self.privacy.clip),
                "dp_delta": repr(self.privacy.delta),
            }
            if self.privacy_seed is not None:
                options["dp_seed"] = str(self.privacy_seed)
        if self.downlink is not None:
            options[DOWNLINK_OPTION] = self.downlink.model_dump_json()
        if self.update_bound != UpdateBoundConfig():
            options[UPDATE_BOUND_OPTION] = self.update_bound.model_dump_json()
        defaults = WireJobSpec(job_id="")
        return WireJobSpec(
            job_id=self.job_id,
            mode=self.strategy.name,
            max_staleness=int(strategy.get("max_staleness", defaults.max_staleness)),
            straggler_timeout_s=float(strategy.get("straggler_timeout_s", defaults.straggler_timeout_s)),
            optimizer=opt.name,
            learning_rate=opt.learning_rate,
            momentum=opt.momentum,
            aggregation=self.aggregation,
            aggregation_params=dict(self.aggregation_params),
            total_steps=self.total_steps,
            options=options,
        )

    @classmethod
    def from_wire(cls, w: WireJobSpec) -> JobSpec:
        """Parse and check the wire form; ValueError naming the field for anything unknown or out of range."""
        strategy = _strategy_from_wire(w)
        known = strategy_fields(strategy.name) - {"name", *_DEDICATED_FIELDS}
        known |= {*OPTIMIZER_OPTIONS, *PRIVACY_OPTIONS, DOWNLINK_OPTION, UPDATE_BOUND_OPTION}
        unknown = sorted(set(w.options) - known)
        if unknown:
            raise ValueError(f"spec.options has unknown keys {unknown}; known for {w.mode!r}: {sorted(known)}")
        if w.optimizer not in OPTIMIZERS:
            raise ValueError(f"spec.optimizer must be one of {OPTIMIZERS}, got {w.optimizer!r}")
        if _finite(w.learning_rate, "spec.learning_rate") <= 0:
            raise ValueError("spec.learning_rate must be > 0")
        if not 0.0 <= _finite(w.momentum, "spec.momentum") < 1.0:
            raise ValueError("spec.momentum must be in [0, 1)")
        if not isinstance(w.total_steps, int) or w.total_steps < 1:
            raise ValueError("spec.total_steps must be an integer >= 1")
        for key, value in w.aggregation_params.items():
            _finite(value, f"spec.aggregation_params[{key!r}]")
        optimizer = OptimizerSpec(
            w.optimizer,
            float(w.learning_rate),
            float(w.momentum),
            nesterov=_option(w.options, "nesterov", False, _bool),
            adam_beta2=_option(w.options, "adam_beta2", OptimizerSpec.adam_beta2, float),
            adam_eps=_option(w.options, "adam_eps", OptimizerSpec.adam_eps, float),
        )
        if not 0.0 <= optimizer.adam_beta2 < 1.0 or not optimizer.adam_eps > 0:
            raise ValueError("spec.options: adam_beta2 must be in [0, 1) and adam_eps > 0")
        privacy = None
        if "dp_noise_multiplier" in w.options or "dp_clip" in w.options:
            try:
                privacy = DPSettings(
                    noise_multiplier=_option(w.options, "dp_noise_multiplier", 0.0, float),
                    clip=_option(w.options, "dp_clip", 0.0, float),
                    mode="central",
                    delta=_option(w.options, "dp_delta", 1e-5, float),
                )
            except ValueError as err:
                raise ValueError(f"spec.options (central DP): {err}") from None
        return cls(
            job_id=w.job_id,
            strategy=strategy,
            optimizer=optimizer,
            aggregation=w.aggregation,
            aggregation_params=dict(w.aggregation_params),
            total_steps=w.total_steps,
            privacy=privacy,
            privacy_seed=_option(w.options, "dp_seed", None, int),
            downlink=_downlink(w.options),
            update_bound=_update_bound(w.options),
        )

    def to_dict(self) -> dict[str, Any]:
        """The wire form as a plain map (ZMQ messages, checkpoint metadata)."""
        w = self.to_wire()
        return {f.name: getattr(w, f.name) for f in fields(w)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        return cls.from_wire(WireJobSpec(**d))


def _downlink(options: dict[str, str]) -> CodecConfig | None:
    text = options.get(DOWNLINK_OPTION)
    if text is None:
        return None
    try:
        config = CodecConfig.model_validate_json(text)
    except ValidationError as err:
        raise ValueError(f"spec.options[{DOWNLINK_OPTION!r}] is not a codec config: {err}") from None
    return config


def _update_bound(options: dict[str, str]) -> UpdateBoundConfig:
    text = options.get(UPDATE_BOUND_OPTION)
    if text is None:
        return UpdateBoundConfig()  # jobs (and checkpoints) from before the bound existed get the default: on
    try:
        return UpdateBoundConfig.model_validate_json(text)
    except ValidationError as err:
        raise ValueError(f"spec.options[{UPDATE_BOUND_OPTION!r}] is not an update bound: {err}") from None


def _strategy_from_wire(w: WireJobSpec) -> StrategyConfig:
    try:
        names = strategy_fields(w.mode)
    except ValueError as err:
        raise ValueError(f"spec.mode: {err}") from None
    data: dict[str, Any] = {"name": w.mode}
    for name in sorted(names):
        if name in _DEDICATED_FIELDS:
            data[name] = getattr(w, name)
        elif name != "name" and name in w.options:
            data[name] = _option_value(w.options[name])
    try:
        return parse_strategy_config(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"spec ({w.mode}): {problems}") from None


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True)  # structured fields (e.g. diloco's inner_lr_scale) as JSON
    return repr(value) if isinstance(value, float) else str(value)


def _option_value(text: str) -> Any:
    """A strategy option as its config parses it: JSON for structured fields, else the text (pydantic converts)."""
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text  # the strategy's validation says what is wrong with it
    return text


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _option(options: dict[str, str], key: str, default: Any, kind: Any) -> Any:
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except (TypeError, ValueError):
        raise ValueError(f"spec.options[{key!r}] = {options[key]!r} is not a valid {kind.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"spec.options[{key!r}] must be finite")
    return value


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)
