"""Typed configuration for every part of the system, nested by owner.

One pydantic model per config section (`controller`, `paramserver`, `workers`, `model`,
`training`, `tasks`, `simulation`, `network`, `availability`); inside `training`, each part of the algorithm
is a sub-config owned by its concept (`training.strategy`, `.codec`, `.aggregation`,
`.attack`, `.dp`). Unknown keys and wrong types are errors that name the dotted field path.

Older configs (the seed project's flat keys such as `use_async_training`, `compression`,
`aggregation_rule`, `bulyan_f`, `enable_differential_privacy`, also under `controller`) still
load: `migrate_legacy_keys` moves each to its new path once, in `parse_config`, with one
`LegacyConfigWarning` naming every move. Runtime code only ever sees the new names.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dist_llm_train.core.aggregation import AggregationConfig, validate_aggregator
from dist_llm_train.core.attacks import AttackConfig
from dist_llm_train.core.availability import (
    AvailabilityTrace,
    GeneratorSpec,
    Session,
    TraceError,
    build_trace,
    generate,
    parse_csv,
    parse_mapping,
)
from dist_llm_train.core.codecs import CodecConfig
from dist_llm_train.core.credentials import check_secret
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.privacy import DPSettings, PrivacyConfig, dp_report
from dist_llm_train.core.strategies import (
    DEFAULT_STRATEGY,
    JobPlan,
    OptimizerSpec,
    Strategy,
    StrategyField,
    SyncConfig,
    WorkerLedger,
    build_strategy,
    legacy_strategy_name,
    strategy_fields,
)
from dist_llm_train.core.update_bound import UpdateBoundConfig
from dist_llm_train.core.worker_update import WorkerUpdate

SchedulerName = Literal["priority", "gale-shapley", "capability"]
TransportName = Literal["grpc", "zmq"]
OptimizerName = Literal["sgd", "adam"]
ModelName = Literal["gpt", "lstm", "tiny-lstm", "small-transformer"]
# Entries of a markov-hard chain's (V^k, V) transition table: 2^24 float64 is 128 MiB.
MAX_TRANSITION_ENTRIES = 1 << 24


class ConfigError(ValueError):
    """A config file or value is invalid; the message names every bad field path."""


class LegacyConfigWarning(UserWarning):
    """A config used keys from before the nested layout; the message names each key's new path."""


class _Strict(BaseModel):
    # Every float finite: `Infinity` is valid YAML and (to Python's json) JSON, and meaningless in every field here.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


DATA_DIR_ENV = "DLT_DATA_DIR"
"""Where `training.text_path` files may be read from; default `data` under the working directory."""


def data_root() -> Path:
    """The directory training data files must lie in: $DLT_DATA_DIR, else ./data (absolute, symlinks resolved)."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data").resolve()


def resolve_data_path(text_path: str, root: Path | None = None) -> Path:
    """`text_path` (relative to the data root, or absolute inside it) as the file to read; ValueError when it
    names anything outside the root, by `..`, by an absolute path or through a symlink. A job's config comes
    from the network: without this a job could make every worker read (and train on) /etc/passwd."""
    base = data_root() if root is None else root.resolve()
    if not text_path or "\x00" in text_path:
        raise ValueError("text_path must be a non-empty path without NUL characters")
    given = Path(text_path)
    candidate = Path(os.path.normpath(given if given.is_absolute() else base / given))
    if not candidate.is_relative_to(base) or not candidate.resolve().is_relative_to(base):
        raise ValueError(
            f"text_path {text_path!r} is outside the data directory {base} (set {DATA_DIR_ENV} to allow another)"
        )
    return candidate.resolve()


class ControllerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    scheduler: SchedulerName = "priority"
    state_db: str = ":memory:"
    heartbeat_interval_s: float = Field(1.0, gt=0, le=300)
    heartbeat_miss_limit: int = Field(3, ge=1, le=100)
    # Heartbeats per second the controller plans for: a larger fleet is told a longer interval (a whole
    # multiple of heartbeat_interval_s) so it stays under this rate; None = always heartbeat_interval_s.
    # 1,000/s is what 2 cores sustain with a p99 under 50 ms (benchmarks/controller_load.py).
    heartbeat_max_rate: float | None = Field(1000.0, gt=0, le=1e6)
    telemetry_alpha: float = Field(0.2, gt=0, le=1)
    # Security (docs/security.md). With `cluster_secret` the controller issues each worker its own
    # credential at registration and refuses any request without a valid one.
    cluster_secret: str | None = Field(None, repr=False, description="HMAC key material of the cluster's tokens")
    auth_token: str | None = Field(None, repr=False, description="A static operator (admin) token, besides minted ones")
    worker_token_ttl_s: float = Field(7 * 86400.0, ge=0, description="Lifetime of a worker credential; 0 = none")
    public_metrics: bool = Field(False, description="Serve /metrics without a credential (e.g. for Prometheus)")
    public_docs: bool = Field(False, description="Serve /docs, /redoc and /openapi.json without a credential")

    @field_validator("cluster_secret")
    @classmethod
    def _long_enough(cls, secret: str | None) -> str | None:
        return check_secret(secret) if secret is not None else None
    # Seed keys with no effect on the controller, accepted so the seed's configs load.
    gradient_accumulation_size: int = Field(1, ge=1)
    gradient_clip_norm: float = Field(0.0, ge=0)


class ParamServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535)
    transport: TransportName = "grpc"
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, ge=1)
    max_message_mb: int = Field(256, ge=1, le=2047)
    chunk_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    # Security (docs/security.md): tokens checked on every call with `cluster_secret` (and ZMQ CURVE);
    # gRPC over TLS with `tls_cert` + `tls_key`, mutual TLS with `tls_client_ca`.
    cluster_secret: str | None = Field(None, repr=False, description="HMAC key material of the cluster's tokens")
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    reflection: bool = Field(False, description="Serve gRPC reflection (lists the PS's methods to anyone)")

    @field_validator("cluster_secret")
    @classmethod
    def _long_enough(cls, secret: str | None) -> str | None:
        return check_secret(secret) if secret is not None else None

    @model_validator(mode="after")
    def _tls_pair(self) -> ParamServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.tls_cert and self.transport != "grpc":
            raise ValueError("TLS is for the grpc transport; zmq is encrypted with CURVE when cluster_secret is set")
        return self


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
    ngram_order: int = Field(
        0, ge=0, le=4,
        description="GPT only. 0: off; n >= 1: add a learned logit vector per n-gram of the last n input tokens "
        "to the output ((V+1)^n x V parameters, training.models.NGramLogits): parameters that cost a lookup, "
        "not FLOPs",
    )

    @property
    def family(self) -> Literal["gpt", "lstm"]:
        return "lstm" if self.name in ("lstm", "tiny-lstm") else "gpt"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.family == "gpt" and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @model_validator(mode="after")
    def _ngram_logits_are_gpt_only(self) -> ModelConfig:
        if self.ngram_order and self.family != "gpt":
            raise ValueError(f"ngram_order is a GPT option; model {self.name!r} is an LSTM")
        return self


class TrainingConfig(_Strict):
    """What is trained and how. The algorithm's parts are sub-configs owned by their concept:
    `strategy` (core.strategies), `codec` (core.codecs), `aggregation` (core.aggregation),
    `attack` (core.attacks) and `dp` (core.privacy)."""

    learning_rate: float = Field(0.003, gt=0, le=10, description="Local / server learning rate")
    batch_size: int = Field(16, ge=1, le=4096)
    num_epochs: int = Field(1, ge=1, le=1_000_000)
    num_samples: int = Field(20000, ge=1, le=100_000_000)
    seq_length: int = Field(32, ge=2, le=4096)
    num_workers: int = Field(2, ge=1, le=1024)
    sync_window: int = Field(1, ge=1, le=1_000_000)
    gradient_clip_norm: float = Field(1.0, ge=0, le=1e6)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where each worker computes: auto uses CUDA where torch sees a GPU, else the CPU"
    )
    autocast: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Mixed precision of the forward pass (fp16 with dynamic loss scaling); updates on "
        "the wire stay float32",
    )
    steps: int = Field(
        200,
        ge=1,
        le=10_000_000,
        description="Step budget: per worker for sync and diloco (inner steps); applied updates in all for "
        "async, adaptive and buffered_async",
    )
    optimizer: OptimizerName = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds model init and data (numpy takes no negative seed)")
    data: Literal["markov", "markov-hard", "text"] = Field(
        "markov",
        description="markov: first-order chain (the fast default); markov-hard: a sparse order-k chain with many "
        "contexts to learn (training.corpora.HigherOrderMarkovCorpus); text: characters of text_path",
    )
    text_path: str | None = Field(
        None, max_length=4096, description=f"text data: a file inside the data directory (${DATA_DIR_ENV}, else ./data)"
    )
    vocab_size: int = Field(16, ge=2, le=65536)
    markov_concentration: float = Field(
        0.3, gt=0, le=1e6, description="Dirichlet concentration of each row (markov data)"
    )
    markov_order: int = Field(
        2, ge=2, le=4, description="markov-hard only: how many previous tokens the next token depends on"
    )
    sharding: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0, le=1e6)
    # 64 batches of 16 x 32 tokens: ~33k held-out tokens, so the eval loss has a standard error of ~0.005 nats.
    eval_batches: int = Field(64, ge=1, le=100_000)
    strategy: StrategyField = Field(default_factory=SyncConfig, description="The training strategy")
    codec: CodecConfig = CodecConfig()
    downlink: CodecConfig = Field(
        CodecConfig(),
        description="How the PS sends new versions to workers: `none` sends the full model each pull; any other "
        "codec sends compressed deltas with server-side error feedback (core.downlink)",
    )
    aggregation: AggregationConfig = AggregationConfig()
    attack: AttackConfig | None = None
    dp: PrivacyConfig | None = None
    update_bound: UpdateBoundConfig = Field(
        UpdateBoundConfig(),
        description="The PS clips every pushed update to factor x the median norm of recent ones (core.update_bound)",
    )

    @model_validator(mode="after")
    def _text_needs_path(self) -> TrainingConfig:
        if self.data == "text" and not self.text_path:
            raise ValueError("data: text needs text_path")
        if self.text_path is not None:
            resolve_data_path(self.text_path)  # ValueError for anything outside the data directory
        return self

    @model_validator(mode="after")
    def _markov_hard_fits(self) -> TrainingConfig:
        if self.data != "markov-hard":
            return self
        entries = self.vocab_size ** (self.markov_order + 1)
        if entries > MAX_TRANSITION_ENTRIES:
            raise ValueError(
                f"data: markov-hard with vocab_size {self.vocab_size} and markov_order {self.markov_order} needs a "
                f"transition table of {self.vocab_size}^{self.markov_order + 1} = {entries:,} entries; at most "
                f"{MAX_TRANSITION_ENTRIES:,} (lower vocab_size or markov_order)"
            )
        return self

    @model_validator(mode="after")
    def _algorithm_preconditions(self) -> TrainingConfig:
        """Cross-field rules of the algorithm's parts, with the keys and numbers in the message."""
        n = self.num_workers
        try:
            validate_aggregator(self.aggregation.rule, n, **self.aggregation.params(n))
        except ValueError as err:
            raise ValueError(f"{err} (n = training.num_workers)") from None
        attack, built = self.attack, None
        if attack is not None:
            if attack.count == 0:
                raise ValueError(f"attack {attack.name!r} needs attackers: K (the last K shards' workers) or workers")
            if attack.count >= n:
                raise ValueError(f"{attack.count} attackers among n={n} workers leaves no honest worker")
            built = attack.build(n)  # its parameters are checked here
        try:
            privacy = self.privacy
        except ValueError as err:
            raise ValueError(f"dp: {err}") from None
        if privacy is not None and privacy.mode == "central" and self.aggregation.label != "mean":
            raise ValueError(
                f"central DP calibrates noise to the mean of clipped updates; aggregation rule "
                f"{self.aggregation.label!r} has another sensitivity (use dp.mode: local with robust rules)"
            )
        if self.aggregation.worker_momentum > 0 and self.build_strategy().update_kind != "gradient":
            raise ValueError(
                f"aggregation.worker_momentum smooths gradients; strategy {self.strategy.name!r} sends "
                f"{self.build_strategy().update_kind} updates"
            )
        plan = JobPlan(
            num_workers=n,
            steps=self.steps,
            aggregation=self.aggregation.rule,
            attack=built.name if built is not None else None,
            attack_needs_spread=bool(built is not None and built.needs_spread and built.samples > 1),
            aggregation_params=self.aggregation.params(n),
            central_dp=privacy is not None and privacy.mode == "central",
            codec=self.codec.name,
            error_feedback=self.codec.uses_error_feedback,
        )
        self.build_strategy().validate(plan)
        return self

    # -- what the rest of the system derives from it ------------------------------------------
    def build_strategy(self) -> Strategy:
        return build_strategy(self.strategy)

    @property
    def privacy(self) -> DPSettings | None:
        """Validated DP settings, or None when DP is off."""
        return None if self.dp is None else self.dp.settings(self.gradient_clip_norm)

    @property
    def initial_staleness_bound(self) -> int:
        """The staleness a worker's updates may have before the PS has measured anything (rounds: 0)."""
        return self.build_strategy().staleness_bound("", WorkerLedger(), None)

    @property
    def versions(self) -> int:
        """PS versions the job runs for: its strategy's reading of the step budget."""
        return self.build_strategy().versions(self.steps)

    def job_spec(self, job_id: str, dp_seed: int | None = None) -> JobSpec:
        """The PS job for this config (the worker that creates the job sends it with InitJob).

        `dp_seed` fixes central DP's noise on the PS for tests and in-process simulations; real jobs
        leave it None so the PS draws noise from OS entropy."""
        strategy = self.build_strategy()
        privacy = self.privacy
        central = privacy if privacy is not None and privacy.mode == "central" else None
        requested = OptimizerSpec(self.optimizer, self.learning_rate, self.momentum)
        return JobSpec(
            job_id=job_id,
            strategy=self.strategy,
            optimizer=strategy.server_optimizer(requested),
            aggregation=self.aggregation.rule,
            aggregation_params=self.aggregation.params(self.num_workers),
            total_steps=strategy.versions(self.steps),
            privacy=central,
            privacy_seed=dp_seed if central is not None else None,
            downlink=self.downlink,
            update_bound=self.update_bound,
        )

    def worker_update(
        self,
        *,
        worker_name: str = "",
        shard_ids: Sequence[int] = (),
        num_shards: int = 1,
        dp_seed: int | None = None,
    ) -> WorkerUpdate:
        """One worker's update pipeline (strategy, attack, local DP, codec) for this config."""
        return WorkerUpdate(
            self.build_strategy(),
            self.codec,
            num_workers=self.num_workers,
            seed=self.seed,
            attack=self.attack,
            privacy=self.privacy,
            worker_name=worker_name,
            shard_ids=shard_ids,
            num_shards=num_shards,
            dp_seed=dp_seed,
            momentum=self.aggregation.worker_momentum,
        )

    def describe(self, releases: int) -> dict[str, Any]:
        """What `/status` and the run report say about the algorithm.

        `releases` is the most updates any one worker has sent so far (it bounds every worker's
        privacy loss: with local DP each sent update is a release, with central DP each round is)."""
        strategy = self.build_strategy()
        return {
            "strategy": strategy.name,
            "strategy_params": strategy.describe(),
            "codec": self.codec.name,
            "error_feedback": self.codec.uses_error_feedback,
            "downlink": self.downlink.name,
            "aggregation": self.aggregation.label,
            "aggregation_params": self.aggregation.params(self.num_workers),
            "worker_momentum": self.aggregation.worker_momentum,
            "attack": None
            if self.attack is None
            else {"name": self.attack.name, "attackers": self.attack.count, **self.attack.params},
            "dp": dp_report(self.privacy, releases, strategy.max_releases(self.steps)),
        }


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


class AvailabilityConfig(_Strict):
    """Churn of transient workers: when each worker is there (docs/simulation.md, "Churn of transient workers").

    Exactly one of `trace` (a file: CSV rows `worker,join_s,leave_s`, or YAML `sessions:`), `sessions` (the
    same rows inline) or `generator` (`{kind: exponential | diurnal | preemption, ..., seed}`). Times are
    seconds after the job starts; the simulator and `dist-llm-train run` both apply it."""

    trace: str | None = None
    sessions: list[Session] | None = None
    generator: GeneratorSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AvailabilityConfig:
        given = [k for k in ("trace", "sessions", "generator") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of trace, sessions or generator (got {given or 'none'})")
        return self

    def resolve(self, workers: int) -> AvailabilityTrace:
        """The trace for a run of `workers` workers; a bad row raises ConfigError naming it."""
        try:
            if self.trace is not None:
                return read_trace(self.trace, workers)
            if self.sessions is not None:
                labels = [f"availability.sessions.{i}" for i in range(len(self.sessions))]
                return build_trace([s.model_dump() for s in self.sessions], workers, labels, "inline sessions")
            assert self.generator is not None
            return generate(self.generator, workers)
        except TraceError as err:
            raise ConfigError(f"availability: {err}") from None


def read_trace(path: str | Path, workers: int) -> AvailabilityTrace:
    """A trace file: `.csv` rows, or YAML/JSON sessions (a file holding an availability section with a
    generator is generated)."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() == ".csv":
        return parse_csv(text, workers, source=str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TraceError(f"{p}: cannot parse: {err}") from None
    section = _availability_section(data)
    if section is not None:
        if section.trace is not None:
            raise TraceError(f"{p}: names another trace file ({section.trace}); point at that file")
        try:
            return section.resolve(workers)
        except ConfigError as err:
            raise TraceError(f"{p}: {err}") from None
    try:
        return parse_mapping(data, workers, source=str(p))
    except TraceError as err:
        raise TraceError(f"{p}: {err}") from None


def _availability_section(data: Any) -> AvailabilityConfig | None:
    """The availability section a YAML file holds (as a run config's `availability:` or on its own), if any."""
    if isinstance(data, dict) and isinstance(data.get("availability"), dict):
        data = data["availability"]
    if isinstance(data, dict) and "generator" in data:
        try:
            return AvailabilityConfig.model_validate(data)
        except ValidationError as err:
            raise TraceError(format_validation_error(err)) from None
    return None


def load_availability_file(path: str | Path) -> AvailabilityConfig:
    """What `--availability FILE` means: a generator section in the file is used as such (so the run's config
    records the generator), anything else is a trace file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"availability file not found: {p}")
    if p.suffix.lower() != ".csv":
        try:
            section = _availability_section(yaml.safe_load(p.read_text()))
        except (yaml.YAMLError, TraceError) as err:
            raise ConfigError(f"{p}: {err}") from None
        if section is not None:
            return section
    return AvailabilityConfig(trace=str(p))


class Config(_Strict):
    controller: ControllerConfig = ControllerConfig()
    paramserver: ParamServerConfig = ParamServerConfig()
    workers: list[WorkerSpec] = []
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    tasks: list[TaskSpec] = []
    simulation: SimulationConfig = SimulationConfig()
    network: NetworkConfig = NetworkConfig()
    availability: AvailabilityConfig | None = None

    @model_validator(mode="after")
    def _unique_worker_names(self) -> Config:
        names = [w.name for w in self.workers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"workers: duplicate names {dupes}")
        return self


# -- the seed's flat keys, moved once to their nested homes --------------------------------------
# training.<old> -> (sub-config, field). Strategy fields move only when the chosen strategy has them.
LEGACY_TRAINING_KEYS: dict[str, tuple[str, str]] = {
    "compression": ("codec", "name"),
    "compression_ratio": ("codec", "ratio"),
    "error_feedback": ("codec", "error_feedback"),
    "int8_chunk": ("codec", "int8_chunk"),
    "topk_index": ("codec", "topk_index"),
    "aggregation_rule": ("aggregation", "rule"),
    "trim_ratio": ("aggregation", "trim_ratio"),
    "multi_krum_m": ("aggregation", "m"),
    "max_staleness": ("strategy", "max_staleness"),
    "min_staleness": ("strategy", "min_staleness"),
    "max_staleness_multiplier": ("strategy", "max_staleness_multiplier"),
    "staleness_scaling": ("strategy", "staleness_scaling"),
    "sync_max_wait_s": ("strategy", "straggler_timeout_s"),
    "diloco_local_steps": ("strategy", "local_steps"),
    "diloco_inner_lr": ("strategy", "inner_lr"),
    "diloco_outer_lr": ("strategy", "outer_lr"),
    "diloco_outer_momentum": ("strategy", "outer_momentum"),
    "attackers": ("attack", "attackers"),
    "attacker_workers": ("attack", "workers"),
    "attack_params": ("attack", "params"),
    "dp_noise_multiplier": ("dp", "noise_multiplier"),
    "dp_clip": ("dp", "clip"),
    "dp_mode": ("dp", "mode"),
    "dp_delta": ("dp", "delta"),
}
# Seed keys the controller section used to carry for the training strategy.
_CONTROLLER_TO_TRAINING = (
    "use_async_training",
    "max_staleness",
    "adaptive_staleness",
    "min_staleness",
    "max_staleness_multiplier",
    "enable_differential_privacy",
    "dp_noise_multiplier",
)
LEGACY_STRATEGY_SELECTORS = ("mode", "use_async_training", "adaptive_staleness")
_F_KEYS = ("byzantine_f", "krum_f", "bulyan_f")


def migrate_legacy_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Move the seed's flat keys to the nested layout; returns (new data, "old -> new" notes).

    New-style keys win where both are given. The input is not modified."""
    notes: list[str] = []
    out = dict(data)
    controller = dict(out["controller"]) if isinstance(out.get("controller"), dict) else None
    if not isinstance(out.get("training", {}), dict):
        return data, notes
    t = dict(out.get("training") or {})
    dp_given_new_style = isinstance(t.get("dp"), dict)
    if controller is not None:
        for key in _CONTROLLER_TO_TRAINING:
            if key in controller:
                value = controller.pop(key)
                if key not in t:
                    t[key] = value
                notes.append(f"controller.{key} -> training")
        if controller.pop("use_zmq", False):
            ps = dict(out.get("paramserver") or {})
            ps.setdefault("transport", "zmq")
            out["paramserver"] = ps
            notes.append("controller.use_zmq -> paramserver.transport: zmq")
        out["controller"] = controller

    strategy = t.get("strategy")
    # an explicit `strategy` wins over the seed's async keys
    legacy_name = legacy_strategy_name(t.get("mode"), t.get("use_async_training"), t.get("adaptive_staleness"))
    legacy_mode = t.get("mode")
    for key in LEGACY_STRATEGY_SELECTORS:
        if key in t:
            t.pop(key)
            notes.append(f"training.{key} -> training.strategy.name")
    if isinstance(strategy, str) or strategy is None:
        if isinstance(strategy, str) and legacy_mode is not None and legacy_mode != strategy:
            raise ConfigError(f"training.strategy {strategy!r} and training.mode {legacy_mode!r} disagree; set one")
        strategy = {"name": strategy or legacy_name or DEFAULT_STRATEGY}
    elif isinstance(strategy, dict):
        strategy = dict(strategy)
    sub: dict[str, dict[str, Any]] = {"strategy": strategy}
    for name in ("codec", "aggregation", "attack", "dp"):
        current = t.get(name)
        sub[name] = dict(current) if isinstance(current, dict) else {}
    if isinstance(t.get("attack"), str):
        sub["attack"] = {"name": t.pop("attack")}
        notes.append("training.attack -> training.attack.name")

    strategy_fields = _strategy_fields(strategy)
    for old, (owner, new) in LEGACY_TRAINING_KEYS.items():
        if old not in t:
            continue
        value = t.pop(old)
        if owner == "strategy" and strategy_fields is not None and new not in strategy_fields:
            notes.append(f"training.{old} dropped (strategy {strategy.get('name')!r} has no {new})")
            continue
        sub[owner].setdefault(new, value)
        notes.append(f"training.{old} -> training.{owner}.{new}")
    f_given = {k: t.pop(k) for k in _F_KEYS if k in t}
    if f_given:
        rule = sub["aggregation"].get("rule", "mean")
        specific = {"krum": "krum_f", "multi_krum": "krum_f", "bulyan": "bulyan_f"}.get(rule)
        f = f_given.get(specific) if specific in f_given else f_given.get("byzantine_f")
        if f is not None:
            sub["aggregation"].setdefault("f", f)
        notes.extend(f"training.{k} -> training.aggregation.f" for k in f_given)
    enabled = t.pop("enable_differential_privacy", None)
    if enabled is not None:
        notes.append("training.enable_differential_privacy -> training.dp (present: on)")
    if not enabled and not dp_given_new_style:  # the seed's DP was opt-in
        if sub["dp"].get("noise_multiplier") or sub["dp"].get("clip") is not None:
            raise ConfigError(
                "dp_noise_multiplier / dp_clip are set but enable_differential_privacy is false: "
                "turn DP on, or drop them"
            )
        sub["dp"] = {}
    elif enabled:
        sub["dp"].setdefault("noise_multiplier", 0.0)

    if sub["attack"] and "name" not in sub["attack"]:
        raise ConfigError(
            "attackers / attacker_workers / attack_params are set but no attack is chosen (training.attack)"
        )
    t["strategy"] = strategy
    for name in ("codec", "aggregation", "attack", "dp"):
        if sub[name] or name in t:
            t[name] = sub[name] or t.get(name)
    if "training" in out or notes:
        out["training"] = t
    return out, notes


def _strategy_fields(strategy: Any) -> set[str] | None:
    if not isinstance(strategy, dict):
        return None  # not a name or a mapping: validation reports it with its path
    try:
        return strategy_fields(str(strategy.get("name", DEFAULT_STRATEGY)))
    except ValueError:
        return None  # an unknown name: validation reports it with its path


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{path}: {e['msg']}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any] | None) -> Config:
    """The one place a config mapping becomes a `Config`: legacy keys are migrated here, with one warning."""
    migrated, notes = migrate_legacy_keys(data or {})
    if notes:
        warnings.warn(
            "config uses legacy keys, read as their new paths: " + "; ".join(notes),
            LegacyConfigWarning,
            stacklevel=2,
        )
    try:
        return Config.model_validate(migrated)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def parse_config_text(text: str) -> dict[str, Any]:
    """YAML or JSON text as a mapping of sections (JSON is valid YAML, but JSON errors read better)."""
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped.startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse config: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections (controller, training, ...)")
    return data or {}


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's mapping as written (before migration and validation)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return parse_config_text(p.read_text())


def load_config_text(text: str) -> Config:
    return parse_config(parse_config_text(text))


def load_config(path: str | Path | None) -> Config:
    return Config() if path is None else parse_config(read_config_mapping(path))


def config_json_schema() -> dict[str, Any]:
    return Config.model_json_schema()
