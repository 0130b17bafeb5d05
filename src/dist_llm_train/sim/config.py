"""What a simulation is: the seed's `simulation` section plus the models the simulator samples from.

`SimConfig` embeds the project's `SimulationConfig` unchanged (heartbeat_interval, heartbeat_cycles,
scheduling_interval, scheduling_cycles keep their meaning, see docs/simulation.md) and adds what a virtual run
needs that a real run measures instead: how long a step computes, how workers fail and join, how big a
message is. `SimConfig.from_config` derives every field it can from a real run's `Config`, so one YAML file
drives both a real run and its simulation; anything else is set on the command line or in a `--sim-config`
file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from dist_llm_train.config import (
    AvailabilityConfig,
    Config,
    ModelConfig,
    SchedulerName,
    SimulationConfig,
    TrainingConfig,
)
from dist_llm_train.core.availability import AvailabilityTrace
from dist_llm_train.core.strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    Strategy,
    StrategyConfig,
    build_strategy,
    parse_strategy_config,
    strategy_names,
)

Positive = Annotated[float, Field(gt=0)]


class SimConfigError(ValueError):
    """A simulation config is invalid; the message names the dotted field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComputeModel(_Strict):
    """Time one worker needs for one step, before its slow-down factors.

    `kind`: constant (always `mean_s`), exponential (memoryless, mean `mean_s`), lognormal (mean `mean_s`,
    log-space standard deviation `sigma`: the usual shape of measured step times, a floor and a long tail) or
    empirical (resampled from `samples_s`, e.g. a real run's `compute_time_s` column, so a simulation of a
    measured run is about the network and the round rule, not about a guessed compute distribution; `mean_s`
    is then the samples' mean). `speed_sigma` gives each worker a fixed lognormal speed factor (mean 1), i.e.
    a heterogeneous fleet.
    """

    kind: Literal["constant", "exponential", "lognormal", "empirical"] = "lognormal"
    mean_s: Positive = 0.05
    sigma: Annotated[float, Field(ge=0, le=5)] = 0.25
    speed_sigma: Annotated[float, Field(ge=0, le=5)] = 0.0
    samples_s: Annotated[list[Positive], Field(max_length=1_000_000)] = []

    @model_validator(mode="before")
    @classmethod
    def _mean_of_samples(cls, data: Any) -> Any:
        # An empirical model's mean is its samples' mean; set here so every later use of mean_s agrees.
        if isinstance(data, dict) and data.get("kind") == "empirical":
            samples = data.get("samples_s")
            numbers = isinstance(samples, list) and all(isinstance(x, int | float) for x in samples)
            if numbers and samples and all(x > 0 for x in samples):
                data = {**data, "mean_s": sum(samples) / len(samples)}
        return data

    @model_validator(mode="after")
    def _samples_match_kind(self) -> ComputeModel:
        if self.kind == "empirical" and not self.samples_s:
            raise ValueError("samples_s: an empirical compute model needs at least one sample")
        if self.kind != "empirical" and self.samples_s:
            raise ValueError(f"samples_s: only used by kind 'empirical' (kind is '{self.kind}')")
        return self


class Kill(_Strict):
    """A scripted crash: worker slot `worker` (0-based, as in `worker-<n>`) dies at virtual time `at_s`."""

    worker: Annotated[int, Field(ge=0)]
    at_s: Annotated[float, Field(ge=0)]


class FailureModel(_Strict):
    """Crashes: random (exponential lifetimes with mean `mtbf_s` per worker) and scripted (`kills`).

    A crashed worker re-registers `rejoin_after_s` later when set (crash-recovery churn), under the same name,
    and gets a fresh lifetime. `false_suspicion` models live workers declared dead because their heartbeats
    stalled in TCP retransmission backoff on a lossy link (see docs/simulation.md).
    """

    mtbf_s: Positive | None = None
    rejoin_after_s: Annotated[float, Field(ge=0)] | None = None
    kills: list[Kill] = []
    false_suspicion: bool = True


class ChurnModel(_Strict):
    """New workers arriving as a Poisson process of rate `join_rate_per_s`, at most `max_joins` of them."""

    join_rate_per_s: Annotated[float, Field(ge=0)] = 0.0
    max_joins: Annotated[int, Field(ge=0, le=1_000_000)] = 0

    @model_validator(mode="after")
    def _both_or_neither(self) -> ChurnModel:
        if (self.join_rate_per_s > 0) != (self.max_joins > 0):
            raise ValueError("join_rate_per_s and max_joins must both be set (or both 0)")
        return self


class PayloadModel(_Strict):
    """Message sizes. `params` defaults to the model config's exact parameter count (see `estimate_params`).

    Update bytes come from running the real codec on a vector of that size; `header_bytes` is the per-message
    framing (gRPC/HTTP2 + protobuf header) and `control_bytes` one heartbeat or assignment exchange.
    """

    params: Annotated[int, Field(ge=1, le=100_000_000_000)] | None = None
    codec: str = "none"
    codec_ratio: Annotated[float, Field(gt=0, le=1)] = 0.01
    codec_params: dict[
        str, int | float | str
    ] = {}  # e.g. int8/int4/int2 `chunk`, topk `index`, sparseloco `chunk` and `bits`, as training passes them
    # Pulls: `none` sends the full float32 model; another codec sends one compressed delta per version
    # (core.downlink). Round-based strategies pull exactly one version's delta; async may be behind by
    # several versions and then receives several deltas, which this size (one delta) undercounts.
    downlink_codec: str = "none"
    downlink_ratio: Annotated[float, Field(gt=0, le=1)] = 0.01
    downlink_params: dict[str, int | float | str] = {}
    header_bytes: Annotated[int, Field(ge=0, le=1 << 20)] = 256
    control_bytes: Annotated[int, Field(ge=1, le=1 << 20)] = 400

    @model_validator(mode="after")
    def _known_codec(self) -> PayloadModel:
        from dist_llm_train.core.codecs import get_codec  # numpy only, like the PS

        get_codec(self.codec, ratio=self.codec_ratio, **self.codec_params)  # ValueError names what is wrong
        get_codec(self.downlink_codec, ratio=self.downlink_ratio, **self.downlink_params)
        return self


class TransportModel(_Strict):
    """How links carry messages: which shaper's semantics, and the TCP constants of the loss model.

    `shaper: kernel` (default) is a kernel qdisc on every node's own interface (Compose): a message is one
    delay draw plus serialisation plus TCP's loss recovery, and all pulls share the PS's egress queue.
    `shaper: userspace` is the embedded launcher's relays (`netem/userspace/relay.py`): each worker's PS connection has
    its own relay, so there is no shared PS egress (`shared_ps_egress` defaults to false and may not be true),
    a bulk message leaves in ~5 ms pieces that each draw a delay and are delivered in order, and a lost
    segment stalls its piece (one RTT, or an RTO near the message's tail) without slowing the rest down.

    `early_pull` (default true, the gRPC worker): with a round barrier (sync, DiLoCo …) the worker sends its
    waiting pull alongside its push, so the pull request reaches the PS with the push, not a reply and a
    request later (`worker/training_loop.py`). False is the ZMQ worker, whose calls run one after another.
    """

    shaper: Literal["kernel", "userspace"] = "kernel"
    mss_bytes: Annotated[int, Field(ge=500, le=65_000)] = 1448
    rto_min_s: Annotated[float, Field(gt=0, le=10)] = 0.2
    max_retries: Annotated[int, Field(ge=1, le=30)] = 15
    shared_ps_egress: bool = True
    early_pull: bool = True

    @model_validator(mode="before")
    @classmethod
    def _userspace_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("shaper") == "userspace" and "shared_ps_egress" not in data:
            data = {**data, "shared_ps_egress": False}
        return data

    @model_validator(mode="after")
    def _userspace_is_per_worker(self) -> TransportModel:
        if self.shaper == "userspace" and self.shared_ps_egress:
            raise ValueError(
                "shared_ps_egress: the userspace shaper relays each worker's PS connection on its own, "
                "so there is no shared PS egress (set it false or leave it out)"
            )
        return self


# Strategy fields the simulation has a field of its own for (SimConfig's name: the strategy's name).
_STRATEGY_FIELDS = {
    "max_staleness": "max_staleness",
    "adaptive_min_staleness": "min_staleness",
    "adaptive_multiplier": "max_staleness_multiplier",
    "local_steps": "local_steps",
    "straggler_timeout_s": "straggler_timeout_s",
}


class SimConfig(_Strict):
    """One simulated run. `mode` is the PS strategy: sync and diloco work in rounds (DiLoCo's workers run
    `local_steps` steps per update and push a pseudo-gradient); async and adaptive apply each update on
    arrival within the staleness bound (adaptive: per worker, from its measured speed, between
    `adaptive_min_staleness` and that × `adaptive_multiplier`); buffered_async publishes a version per
    `strategy_options.buffer_size` accepted updates. A strategy's other fields are `strategy_options`."""

    simulation: SimulationConfig = SimulationConfig()
    workers: Annotated[int, Field(ge=1, le=1_000_000)] = 3
    rounds: Annotated[int, Field(ge=0, le=100_000_000)] = 100
    mode: str = DEFAULT_STRATEGY  # the strategy's name (core.strategies registry); its fields are the ones below
    profile: str | None = "good"
    scheduler: SchedulerName = "priority"
    heartbeat_miss_limit: Annotated[int, Field(ge=1, le=100)] = 3
    telemetry_alpha: Annotated[float, Field(gt=0, le=1)] = 0.2
    straggler_timeout_s: Positive = 30.0
    max_staleness: Annotated[int, Field(ge=0)] = 5
    adaptive_min_staleness: Annotated[int, Field(ge=0)] = 5
    adaptive_multiplier: Annotated[float, Field(ge=1)] = 10.0
    local_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 16
    seq_length: Annotated[int, Field(ge=1)] = 32
    tasks: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    aggregation_base_s: Annotated[float, Field(ge=0)] = 0.0
    aggregation_per_update_s: Annotated[float, Field(ge=0)] = 0.0
    seed: int = 0
    engine: Literal["auto", "vectorised", "exact"] = "auto"
    max_virtual_s: Positive = 1e9
    compute: ComputeModel = ComputeModel()
    failures: FailureModel = FailureModel()
    churn: ChurnModel = ChurnModel()
    payload: PayloadModel = PayloadModel()
    transport: TransportModel = TransportModel()
    model: ModelConfig = ModelConfig()
    vocab_size: Annotated[int, Field(ge=2)] = 16
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    """The strategy's fields without a field of their own above, as `training.strategy` spells them (e.g.
    buffered_async's `buffer_size`, async's `staleness_scaling`, DiLoCo's `outer_lr`); checked against `mode`."""
    availability: AvailabilityConfig | None = None
    """Churn of transient workers: when each of the initial `workers` is there (a trace or a generator)."""
    _trace_cache: tuple[tuple[int, str], AvailabilityTrace] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _availability_resolves(self) -> SimConfig:
        self.availability_trace()  # a bad row or an unknown worker is an error now, naming the row
        return self

    def availability_trace(self) -> AvailabilityTrace | None:
        """The availability trace for this run's workers (resolved once: a generator may make 10⁵ sessions)."""
        if self.availability is None:
            return None
        key = (self.workers, self.availability.model_dump_json())
        if self._trace_cache is None or self._trace_cache[0] != key:
            self._trace_cache = (key, self.availability.resolve(self.workers))
        return self._trace_cache[1]

    @model_validator(mode="after")
    def _kills_in_range(self) -> SimConfig:
        bad = [k.worker for k in self.failures.kills if k.worker >= self.capacity]
        if bad:
            raise ValueError(f"failures.kills: worker slots {bad} do not exist (slots 0..{self.capacity - 1})")
        return self

    @field_validator("mode")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; choose one of {strategy_names()}")
        return value

    @model_validator(mode="after")
    def _strategy_options_fit(self) -> SimConfig:
        known = set(STRATEGIES[self.mode].Config.model_fields) - {"name"}
        own = sorted(set(self.strategy_options) & set(_STRATEGY_FIELDS.values()))
        if own:
            raise ValueError(f"strategy_options: {own} are simulation fields of their own; set them there")
        unknown = sorted(set(self.strategy_options) - known)
        if unknown:
            raise ValueError(f"strategy_options: strategy {self.mode!r} has no field {unknown}; it has {sorted(known)}")
        try:
            self.strategy_config  # noqa: B018 - parse now, so a bad value is an error naming the field
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise ValueError(f"strategy_options ({self.mode}): {problems}") from None
        return self

    @property
    def strategy_config(self) -> StrategyConfig:
        """The strategy's own config from the fields here that it has, and `strategy_options`."""
        known = STRATEGIES[self.mode].Config.model_fields
        fields = {key: getattr(self, own) for own, key in _STRATEGY_FIELDS.items() if key in known}
        return parse_strategy_config({"name": self.mode, **fields, **self.strategy_options})

    @property
    def strategy(self) -> Strategy:
        return build_strategy(self.strategy_config)

    @property
    def steps_per_push(self) -> int:
        """Local steps behind one update: DiLoCo's H, 1 for a gradient."""
        return self.strategy.steps_per_update()

    @property
    def capacity(self) -> int:
        """Worker slots the run can ever use: the initial workers plus every possible joiner."""
        return self.workers + self.churn.max_joins

    @property
    def num_tasks(self) -> int:
        return self.tasks if self.tasks is not None else self.workers

    @property
    def heartbeat_interval_s(self) -> float:
        return self.simulation.heartbeat_interval

    @property
    def param_count(self) -> int:
        if self.payload.params is not None:
            return self.payload.params
        return estimate_params(self.model, self.vocab_size, self.seq_length)

    @property
    def min_duration_s(self) -> float:
        """The seed's control-plane horizon: enough virtual time for its heartbeat and scheduling cycles."""
        s = self.simulation
        return max(s.heartbeat_cycles * s.heartbeat_interval, s.scheduling_cycles * s.scheduling_interval)

    @classmethod
    def from_config(cls, cfg: Config, **overrides: Any) -> SimConfig:
        """A simulation of the run `cfg` describes; `overrides` (dotted paths allowed: 'compute.mean_s')."""
        t: TrainingConfig = cfg.training
        c = cfg.controller
        strategy = t.strategy
        data: dict[str, Any] = {
            "simulation": cfg.simulation.model_dump(),
            "workers": t.num_workers,
            "rounds": t.versions,  # PS versions: DiLoCo publishes one per H local steps
            "mode": strategy.name,
            "profile": cfg.network.profile or "good",
            "scheduler": c.scheduler,
            "heartbeat_miss_limit": c.heartbeat_miss_limit,
            "telemetry_alpha": c.telemetry_alpha,
            **{
                sim_key: getattr(strategy, key)
                for sim_key, key in _STRATEGY_FIELDS.items()
                if key != "max_staleness" and hasattr(strategy, key)
            },
            "batch_size": t.batch_size,
            "seq_length": t.seq_length,
            "seed": t.seed,
            "model": cfg.model.model_dump(),
            "vocab_size": t.vocab_size,
            "payload": {
                "codec": t.codec.name,
                "codec_ratio": t.codec.ratio,
                "codec_params": t.codec.codec_params(),
                "downlink_codec": t.downlink.name,
                "downlink_ratio": t.downlink.ratio,
                "downlink_params": t.downlink.codec_params(),
            },
        }
        # A round-based config has no staleness bound (it reads as 0); carrying that 0 over would make
        # `--strategy async` on such a config refuse every stale update. Then SimConfig's default holds.
        if not t.build_strategy().rounds:
            data["max_staleness"] = t.initial_staleness_bound
        if cfg.network.shaping == "userspace":  # the embedded launcher's relays, not a kernel qdisc
            data["transport"] = {"shaper": "userspace"}
        if cfg.availability is not None:
            data["availability"] = cfg.availability.model_dump(exclude_none=True)
        if overrides.get("availability") is not None:
            data.pop("availability", None)  # a trace given for the simulation replaces the run config's
        merged = merge_dotted(data, overrides)
        # The run's other strategy fields carry over where the simulated strategy has them, like those above
        # (an override of `mode` keeps what the new strategy shares with the run's, and drops the rest).
        mode = merged.get("mode")
        fields = STRATEGIES[mode].Config.model_fields if isinstance(mode, str) and mode in STRATEGIES else {}
        carried = strategy.model_dump(exclude={"name", *_STRATEGY_FIELDS.values()}, exclude_none=True)
        given = merged.get("strategy_options", {})
        if isinstance(given, dict):  # anything else is refused by the validation below, naming the field
            merged["strategy_options"] = {k: v for k, v in carried.items() if k in fields} | given
        return build_sim_config(merged)


def estimate_params(model: ModelConfig, vocab_size: int, block_size: int) -> int:
    """The length of the flat parameter vector `training.models.build_model` creates (no torch needed).

    GPT (tied head): V·E + S·E + L·(12E² + 13E) + 2E, + (V+1)^n·V with order-n n-gram logits.
    LSTM: V·E + Σ layers 4H·(in + H) + 8H, + H·V + V. A unit test checks both against the real torch modules.
    """
    v, e = vocab_size, model.n_embd
    if model.family == "gpt":
        ngram = (v + 1) ** model.ngram_order * v if model.ngram_order else 0
        return v * e + block_size * e + ngram + model.n_layer * (12 * e * e + 13 * e) + 2 * e
    h = model.hidden_size
    lstm = sum(4 * h * ((e if i == 0 else h) + h) + 8 * h for i in range(model.n_layer))
    return v * e + lstm + h * v + v


def merge_dotted(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` deep-merged; keys may be dotted ("failures.mtbf_s"); None values skipped."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        existing = node.get(parts[-1])
        node[parts[-1]] = (
            merge_dotted(existing, value) if isinstance(value, dict) and isinstance(existing, dict) else value
        )
    return out


def _format(err: ValidationError) -> str:
    def one(e: Any) -> str:
        msg = str(e["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        return f"{loc}: {msg}" if loc else msg  # a cross-field check's message names its fields itself

    return "; ".join(one(e) for e in err.errors())


def build_sim_config(data: dict[str, Any]) -> SimConfig:
    try:
        return SimConfig.model_validate(data)
    except ValidationError as err:
        raise SimConfigError(_format(err)) from None


def load_sim_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON mapping of SimConfig fields (validated later, together with everything else)."""
    p = Path(path)
    if not p.is_file():
        raise SimConfigError(f"simulation config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SimConfigError(f"{p}: cannot parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SimConfigError(f"{p}: a simulation config must be a mapping of SimConfig fields")
    return data
