"""Typed configuration for every part of the system.

One pydantic model per config section. The seed project's section names and keys
(`controller`, `workers`, `model`, `training`, `tasks`, `simulation`, `network`) are
accepted unchanged so existing configs keep working; new keys sit beside them.
Unknown keys and wrong types are errors that name the dotted field path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SchedulerName = Literal["priority", "gale-shapley", "capability"]
ModeName = Literal["sync", "async", "adaptive", "diloco"]  # training strategies (docs/training_protocol.md)
TransportName = Literal["grpc", "zmq"]
OptimizerName = Literal["sgd", "adam"]
ModelName = Literal["gpt", "lstm", "tiny-lstm", "small-transformer"]


class ConfigError(ValueError):
    """A config file or value is invalid; the message names every bad field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ControllerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    scheduler: SchedulerName = "priority"
    state_db: str = ":memory:"
    heartbeat_interval_s: float = Field(1.0, gt=0, le=300)
    heartbeat_miss_limit: int = Field(3, ge=1, le=100)
    telemetry_alpha: float = Field(0.2, gt=0, le=1)
    auth_token: str | None = None
    # Seed keys kept for compatibility; they feed the training strategy when the
    # `training` section does not set its own value.
    use_async_training: bool | None = None
    max_staleness: int | None = Field(None, ge=0)
    adaptive_staleness: bool = False
    min_staleness: int = Field(5, ge=0)
    max_staleness_multiplier: float = Field(10.0, ge=1)
    use_zmq: bool = False
    gradient_accumulation_size: int = Field(1, ge=1)
    gradient_clip_norm: float = Field(0.0, ge=0)
    enable_differential_privacy: bool = False
    dp_noise_multiplier: float = Field(0.0, ge=0)


class ParamServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535)
    transport: TransportName = "grpc"
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, ge=1)
    max_message_mb: int = Field(256, ge=1, le=2047)
    chunk_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)


class WorkerSpec(_Strict):
    name: str = Field(min_length=1, max_length=128)
    memory: float = Field(16, gt=0)
    flops_per_second: float = Field(100, gt=0)
    network_bandwidth: float = Field(1000, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)
    compute_slowdown: float = Field(1.0, ge=1.0, le=1000)


class ModelConfig(_Strict):
    name: ModelName = "gpt"
    n_layer: int = Field(2, ge=1, le=48)
    n_head: int = Field(2, ge=1, le=64)
    n_embd: int = Field(64, ge=8, le=4096)
    hidden_size: int = Field(128, ge=8, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)

    @property
    def family(self) -> Literal["gpt", "lstm"]:
        return "lstm" if self.name in ("lstm", "tiny-lstm") else "gpt"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.family == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class TrainingConfig(_Strict):
    # Seed keys.
    learning_rate: float = Field(0.003, gt=0, le=10)
    batch_size: int = Field(16, ge=1, le=4096)
    num_epochs: int = Field(1, ge=1)
    num_samples: int = Field(20000, ge=1)
    seq_length: int = Field(32, ge=2, le=4096)
    num_workers: int = Field(2, ge=1, le=1024)
    use_async_training: bool | None = None
    max_staleness: int | None = Field(None, ge=0)
    compression: str = "none"
    compression_ratio: float = Field(0.01, gt=0, le=1)
    aggregation_rule: str = "mean"
    trim_ratio: float | None = Field(None, ge=0, lt=0.5)  # None: f/n from byzantine_f, else 0.3
    krum_f: int | None = Field(None, ge=0)
    bulyan_f: int | None = Field(None, ge=0)
    sync_window: int = Field(1, ge=1)
    sync_max_wait_s: float = Field(30.0, gt=0)
    gradient_clip_norm: float = Field(1.0, ge=0)
    enable_differential_privacy: bool = False
    # New keys.
    steps: int = Field(200, ge=1, le=10_000_000)
    mode: ModeName | None = None
    optimizer: OptimizerName = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    seed: int = 0
    data: Literal["markov", "text"] = "markov"
    text_path: str | None = None
    vocab_size: int = Field(16, ge=2, le=65536)
    markov_concentration: float = Field(0.3, gt=0)
    sharding: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    # 64 batches of 16 x 32 tokens: ~33k held-out tokens, so the eval loss has a standard error of ~0.005 nats.
    eval_batches: int = Field(64, ge=1)
    # --- training strategies (issue 6; docs/training_protocol.md, checks in training/strategies.py) ---
    strategy: ModeName | None = None  # same as `mode`; one of them is enough
    adaptive_staleness: bool | None = None  # seed key (also on controller): async -> adaptive
    min_staleness: int | None = Field(None, ge=0)  # adaptive: the fastest worker's bound
    max_staleness_multiplier: float | None = Field(None, ge=1)  # adaptive: bounds <= min_staleness x this
    staleness_scaling: Literal["none", "inverse", "inverse_sqrt"] = "none"
    diloco_local_steps: int = Field(20, ge=1, le=1_000_000)  # H (paper: 500; scaled for the tiny model)
    diloco_inner_lr: float | None = Field(None, gt=0, le=10)  # inner AdamW lr; None: learning_rate
    diloco_outer_lr: float = Field(0.7, gt=0, le=10)
    diloco_outer_momentum: float = Field(0.9, ge=0, lt=1)
    error_feedback: bool | None = None  # None: on for topk, off for the other codecs
    int8_chunk: int = Field(1024, ge=1, le=1 << 24)
    topk_index: Literal["int32", "delta"] = "delta"  # delta: uint16 index gaps, 6 B per kept value
    byzantine_f: int | None = Field(None, ge=0)  # f for krum / multi_krum / bulyan, f/n for trimmed_mean
    multi_krum_m: int | None = Field(None, ge=1)
    attack: Literal["sign_flip", "gaussian", "alie", "ipm"] | None = None
    attackers: int = Field(0, ge=0)  # the workers holding the last K shards attack
    attacker_workers: list[str] = []  # or these workers, by name
    attack_params: dict[str, float] = {}
    dp_noise_multiplier: float | None = Field(None, ge=0)
    dp_clip: float | None = Field(None, gt=0)  # None: gradient_clip_norm
    dp_mode: Literal["local", "central"] = "local"
    dp_delta: float = Field(1e-5, gt=0, lt=1)

    @property
    def resolved_mode(self) -> ModeName:
        """The strategy: `strategy`, else `mode`, else the seed's use_async_training (+ adaptive_staleness)."""
        if self.strategy is not None:
            return self.strategy
        if self.mode is not None:
            return "adaptive" if self.mode == "async" and self.adaptive_staleness else self.mode
        if self.use_async_training:
            return "adaptive" if self.adaptive_staleness else "async"
        return "sync"

    @model_validator(mode="after")
    def _strategy_preconditions(self) -> TrainingConfig:
        from dist_llm_train.training.strategies import validate_training  # late: strategies imports this module

        validate_training(self)
        return self

    @property
    def resolved_max_staleness(self) -> int:
        return 5 if self.max_staleness is None else self.max_staleness

    @model_validator(mode="after")
    def _text_needs_path(self) -> TrainingConfig:
        if self.data == "text" and not self.text_path:
            raise ValueError("data: text needs text_path")
        return self


class TaskSpec(_Strict):
    id: str = Field(min_length=1)
    model_shard_size: float = Field(1.0, gt=0, le=1)
    data_size: float = Field(0.1, gt=0)
    required_flops: float = Field(1000, ge=0)
    priority: int = 1
    required_memory: float = Field(0, ge=0)


class SimulationConfig(_Strict):
    heartbeat_cycles: int = Field(5, ge=1)
    heartbeat_interval: float = Field(1.0, gt=0)
    scheduling_cycles: int = Field(3, ge=1)
    scheduling_interval: float = Field(2.0, gt=0)


class NetworkConfig(_Strict):
    profile: str | None = None
    shaping: Literal["none", "userspace", "kernel", "auto"] = "none"
    netem_profile: dict[str, Any] | None = None


class Config(_Strict):
    controller: ControllerConfig = ControllerConfig()
    paramserver: ParamServerConfig = ParamServerConfig()
    workers: list[WorkerSpec] = []
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    tasks: list[TaskSpec] = []
    simulation: SimulationConfig = SimulationConfig()
    network: NetworkConfig = NetworkConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_seed_strategy_keys(cls, data: Any) -> Any:
        """Seed strategy/DP keys on `controller` feed `training` before either is validated (training wins)."""
        if not isinstance(data, dict) or not isinstance(data.get("controller"), dict):
            return data
        c, t = data["controller"], dict(data.get("training") or {})
        if not isinstance(data.get("training", {}), dict):
            return data
        for key in ("adaptive_staleness", "min_staleness", "max_staleness_multiplier", "enable_differential_privacy"):
            if key in c and key not in t:
                t[key] = c[key]
        if t.get("enable_differential_privacy") and "dp_noise_multiplier" in c and "dp_noise_multiplier" not in t:
            t["dp_noise_multiplier"] = c["dp_noise_multiplier"]
        return {**data, "training": t}

    @model_validator(mode="after")
    def _merge_seed_controller_keys(self) -> Config:
        # The seed put async/staleness on the controller; the training section wins when both are set.
        t, c = self.training, self.controller
        if t.use_async_training is None and c.use_async_training is not None:
            t.use_async_training = c.use_async_training
        if t.max_staleness is None and c.max_staleness is not None:
            t.max_staleness = c.max_staleness
        if c.use_zmq and self.paramserver.transport == "grpc" and "transport" not in self.paramserver.model_fields_set:
            self.paramserver.transport = "zmq"
        names = [w.name for w in self.workers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"workers: duplicate names {dupes}")
        return self


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{path}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any] | None) -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config_text(text: str) -> Config:
    """Parse YAML or JSON text (JSON is valid YAML, but JSON errors read better)."""
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped.startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections (controller, training, ...)")
    return parse_config(data)


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return load_config_text(p.read_text())


def config_json_schema() -> dict[str, Any]:
    return Config.model_json_schema()
