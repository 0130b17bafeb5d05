"""Training strategies: from the `training` config to a PS job, and what a worker does each step.

One strategy per job (`training.strategy`, or the seed keys `mode` / `use_async_training` /
`adaptive_staleness`):

* `sync`: every member pushes a gradient on version v; the PS aggregates the round with the
  job's rule and steps its optimizer (barrier with straggler timeout).
* `async`: each gradient is applied on arrival unless its base is more than `max_staleness`
  versions old (bounded staleness).
* `adaptive`: async with a per-worker bound from each worker's measured speed (the PS side is
  `paramserver.staleness`).
* `diloco` (Douillard et al., 2023): each worker runs H local AdamW steps from the pulled
  parameters and pushes the pseudo-gradient params_before - params_after; the PS averages a
  round of them and applies SGD with Nesterov momentum (the outer optimizer). For DiLoCo,
  `training.steps` is the per-worker budget of inner steps, so rounds = ceil(steps / H) and the
  sample budget matches the other strategies' at equal `steps`.

Every strategy's update goes through the same pipeline on the worker: honest update ->
(attack, if this worker is a configured attacker) -> (local DP clip + noise) -> codec with
error feedback. `validate_training` is the config-time check (it runs inside `parse_config`),
so bad combinations are refused before anything starts.

No torch at import time: the controller validates configs with this module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_llm_train.paramserver.types import JobSpec, JobStats
from dist_llm_train.training.aggregation import validate_aggregator
from dist_llm_train.training.attacks import Attacker, get_attack, is_attacker
from dist_llm_train.training.codecs import Codec, Encoded, ErrorFeedback, get_codec
from dist_llm_train.training.dp import DPSettings, LocalDP, dp_report

if TYPE_CHECKING:
    from dist_llm_train.config import Config, TrainingConfig
    from dist_llm_train.paramserver.inprocess import Produced, SimResult
    from dist_llm_train.training.trainer import LocalTrainer

STRATEGIES = ("sync", "async", "adaptive", "diloco")
ROUND_STRATEGIES = ("sync", "diloco")
DEFAULT_TRIM_RATIO = 0.3  # the seed's trim_ratio default


# -- config-time ---------------------------------------------------------------------------
def trim_ratio(t: TrainingConfig) -> float:
    """trimmed_mean's beta: `trim_ratio` if set, else f/n from `byzantine_f`, else the seed default 0.3."""
    if t.trim_ratio is not None:
        return t.trim_ratio
    if t.byzantine_f is not None:
        return t.byzantine_f / t.num_workers
    return DEFAULT_TRIM_RATIO


def aggregation_params(t: TrainingConfig) -> dict[str, float]:
    """The rule's parameters; rule-specific seed keys (krum_f, bulyan_f) win over `byzantine_f`."""
    rule, f = t.aggregation_rule, t.byzantine_f
    if rule == "trimmed_mean":
        return {"beta": trim_ratio(t)}
    params: dict[str, float] = {}
    rule_f = {"krum": t.krum_f, "multi_krum": t.krum_f, "bulyan": t.bulyan_f}.get(rule)
    if rule in ("krum", "multi_krum", "bulyan") and (rule_f if rule_f is not None else f) is not None:
        params["f"] = float(rule_f if rule_f is not None else f)  # type: ignore[arg-type]
    if rule == "multi_krum" and t.multi_krum_m is not None:
        params["m"] = float(t.multi_krum_m)
    return params


def attack_count(t: TrainingConfig) -> int:
    """How many workers attack (shard-chosen plus explicitly named)."""
    return t.attackers + len(t.attacker_workers)


def dp_settings(t: TrainingConfig) -> DPSettings | None:
    """The job's DP settings, or None when DP is off; ValueError for settings that make no sense."""
    if not t.enable_differential_privacy:
        if t.dp_noise_multiplier or t.dp_clip is not None:
            raise ValueError(
                "dp_noise_multiplier / dp_clip are set but enable_differential_privacy is false: "
                "turn DP on, or drop them"
            )
        return None
    clip = t.dp_clip if t.dp_clip is not None else t.gradient_clip_norm
    if clip <= 0:
        raise ValueError("differential privacy needs a clip bound: set dp_clip (gradient_clip_norm is 0)")
    return DPSettings(t.dp_noise_multiplier or 0.0, clip, t.dp_mode, t.dp_delta)


def codec_for(t: TrainingConfig) -> Codec:
    """The job's codec with its parameters (ratio for topk, chunk for int8, topk's index coding)."""
    return get_codec(t.compression, ratio=t.compression_ratio, chunk=t.int8_chunk, index=t.topk_index)


def outer_rounds(t: TrainingConfig) -> int:
    """PS versions the job runs for: `steps`, or for DiLoCo the rounds its inner-step budget buys."""
    if t.resolved_mode == "diloco":
        return math.ceil(t.steps / t.diloco_local_steps)
    return t.steps


def validate_training(t: TrainingConfig) -> None:
    """Every cross-field rule of the strategy keys; ValueError naming the keys and the numbers."""
    strategy = t.resolved_mode
    if t.strategy is not None and t.mode is not None and t.strategy != t.mode:
        raise ValueError(f"strategy {t.strategy!r} and mode {t.mode!r} disagree; set one of them")
    try:
        codec_for(t)
    except ValueError as err:
        raise ValueError(f"compression: {err}") from None
    if strategy not in ROUND_STRATEGIES and t.aggregation_rule != "mean":
        raise ValueError(
            f"aggregation rule {t.aggregation_rule!r} combines a round of updates, but strategy {strategy!r} "
            "applies each update on its own: use sync or diloco with robust aggregation"
        )
    try:
        validate_aggregator(t.aggregation_rule, t.num_workers, **aggregation_params(t))
    except ValueError as err:
        raise ValueError(f"{err} (n = training.num_workers)") from None
    _validate_attack(t, strategy)
    dp = dp_settings(t)
    if dp is not None and dp.mode == "central" and t.aggregation_rule != "mean":
        raise ValueError(
            f"central DP calibrates noise to the mean of clipped updates; aggregation rule "
            f"{t.aggregation_rule!r} has another sensitivity (use dp_mode: local with robust rules)"
        )
    if strategy == "diloco" and t.diloco_local_steps > t.steps:
        raise ValueError(
            f"diloco_local_steps H={t.diloco_local_steps} exceeds the inner-step budget steps={t.steps}: "
            "not one round fits"
        )


def _validate_attack(t: TrainingConfig, strategy: str) -> None:
    k = attack_count(t)
    if t.attack is None:
        if k:
            raise ValueError("attackers / attacker_workers are set but no attack is chosen (training.attack)")
        if t.attack_params:
            raise ValueError("attack_params are set but no attack is chosen (training.attack)")
        return
    if k == 0:
        raise ValueError(
            f"attack {t.attack!r} needs attackers: K (the last K shards' workers) or attacker_workers"
        )
    if k >= t.num_workers:
        raise ValueError(f"{k} attackers among n={t.num_workers} workers leaves no honest worker")
    attack = get_attack(t.attack, t.attack_params, n=t.num_workers, f=k)
    if strategy == "diloco" and attack.samples > 1 and t.attack == "alie":
        raise ValueError(
            "alie estimates the honest spread from several updates; "
            "a diloco attacker has one pseudo-gradient "
            "per round (use sign_flip, gaussian or ipm)"
        )


def job_spec_for(job_id: str, t: TrainingConfig, dp_seed: int | None = None) -> JobSpec:
    """The PS job for this training config (the worker that creates the job sends it with InitJob).

    `dp_seed` fixes central DP's noise on the PS (the `dp_seed` job option) for tests and in-process
    simulations; real jobs leave it None so the PS draws noise from OS entropy.
    """
    strategy = t.resolved_mode
    options: dict[str, str] = {}
    if t.staleness_scaling != "none":
        options["staleness_scaling"] = t.staleness_scaling
    if strategy == "adaptive":
        options["min_staleness"] = str(
            t.min_staleness if t.min_staleness is not None else t.resolved_max_staleness
        )
        options["max_staleness_multiplier"] = repr(t.max_staleness_multiplier or 10.0)
    optimizer, lr, momentum = t.optimizer, t.learning_rate, t.momentum
    if strategy == "diloco":
        optimizer, lr, momentum = "sgd", t.diloco_outer_lr, t.diloco_outer_momentum
        options["nesterov"] = "true"
    dp = dp_settings(t)
    if dp is not None and dp.mode == "central":
        options |= {
            "dp_noise_multiplier": repr(dp.noise_multiplier),
            "dp_clip": repr(dp.clip),
            "dp_delta": repr(dp.delta),
        }
        if dp_seed is not None:
            options["dp_seed"] = str(dp_seed)
    return JobSpec(
        job_id=job_id,
        mode=strategy,
        max_staleness=t.resolved_max_staleness,
        straggler_timeout_s=t.sync_max_wait_s,
        optimizer=optimizer,
        learning_rate=lr,
        momentum=momentum,
        aggregation=t.aggregation_rule,
        aggregation_params=aggregation_params(t),
        total_steps=outer_rounds(t),
        options=options,
    )


def planned_releases(t: TrainingConfig) -> int:
    """Updates each worker sends over the job (sync/diloco: exactly; async: at most, if none is refused)."""
    return outer_rounds(t)


def strategy_view(t: TrainingConfig, releases: int) -> dict[str, Any]:
    """What `/status` and the run report say about the job's strategy, codec, rule, attack and privacy.

    `releases` is the most updates any one worker has sent so far (it bounds every worker's
    privacy loss: with local DP each sent update is a release, with central DP each round is).
    """
    dp = dp_settings(t)
    return {
        "strategy": t.resolved_mode,
        "codec": t.compression,
        "error_feedback": t.error_feedback if t.error_feedback is not None else t.compression == "topk",
        "aggregation": t.aggregation_rule,
        "aggregation_params": aggregation_params(t),
        "staleness_scaling": t.staleness_scaling,
        "diloco_local_steps": t.diloco_local_steps if t.resolved_mode == "diloco" else None,
        "attack": None
        if t.attack is None
        else {"name": t.attack, "attackers": attack_count(t), **t.attack_params},
        "dp": dp_report(dp, releases, planned_releases(t)),
    }


def wire_bytes(stats: JobStats | None) -> dict[str, int]:
    """Bytes per class as the PS counted them: updates in (by kind, and uncompressed), params out."""
    c = stats.counters if stats is not None else {}
    keys = (
        "bytes_received_gradient",
        "raw_bytes_gradient",
        "bytes_received_pseudo_gradient",
        "raw_bytes_pseudo_gradient",
        "params_bytes_sent",
    )
    return {k: int(c.get(k, 0)) for k in keys}


def strategy_summary(
    t: TrainingConfig, stats: JobStats | None, rows: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The run report's strategy section: `strategy_view` + wire bytes per class + per-worker acceptance."""
    releases = max([stats.version if stats else 0, *(int(r.get("step") or 0) for r in rows)])
    workers = [
        {**asdict(w), "acceptance_rate": w.acceptance_rate}
        for w in (stats.workers if stats is not None else [])
    ]
    return {**strategy_view(t, releases), "wire_bytes": wire_bytes(stats), "workers": workers}


# -- worker-time ---------------------------------------------------------------------------
@dataclass
class Update:
    vec: np.ndarray
    kind: str  # "gradient" | "pseudo_gradient"
    loss: float
    samples: int


def _seed(base: int, worker_name: str, shard_ids: Sequence[int]) -> int:
    seq = np.random.SeedSequence([base, zlib.crc32(worker_name.encode()), *sorted(shard_ids)])
    return int(seq.generate_state(1)[0])


class WorkerStrategy:
    """What one worker does per step under the job's strategy; built once per job from the config."""

    def __init__(
        self,
        t: TrainingConfig,
        *,
        worker_name: str = "",
        shard_ids: Sequence[int] = (),
        num_shards: int = 1,
        dp_seed: int | None = None,
    ) -> None:
        self.strategy = t.resolved_mode
        self.kind = "pseudo_gradient" if self.strategy == "diloco" else "gradient"
        self.local_steps = t.diloco_local_steps
        self.inner_lr = t.diloco_inner_lr if t.diloco_inner_lr is not None else t.learning_rate
        self.codec: Codec = codec_for(t)
        use_feedback = t.error_feedback if t.error_feedback is not None else self.codec.name == "topk"
        self.feedback = ErrorFeedback(self.codec) if use_feedback else None
        seed = _seed(t.seed, worker_name, shard_ids)
        self.attacker: Attacker | None = None
        if t.attack is not None and is_attacker(
            worker_name, shard_ids, num_shards, t.attackers, t.attacker_workers
        ):
            attack = get_attack(t.attack, t.attack_params, n=t.num_workers, f=attack_count(t))
            self.attacker = Attacker(attack, seed)
        dp = dp_settings(t)
        # An attacker ignores the protocol, privacy included; central DP happens on the PS. A real worker
        # passes no `dp_seed`, so noise comes from OS entropy: a restarted worker must never replay the
        # noise of earlier releases. Tests and in-process simulations pass one to make a run repeatable;
        # each worker then draws from its own stream, derived like the attacker's.
        local = dp is not None and dp.mode == "local" and self.attacker is None
        noise_seed = None if dp_seed is None else _seed(dp_seed, worker_name, shard_ids)
        self.dp = LocalDP(dp, noise_seed) if local and dp is not None else None

    def compute(self, trainer: LocalTrainer) -> Update:
        """The update to push, computed at the trainer's current parameters."""
        if self.strategy == "diloco":
            vec, loss, samples = trainer.local_steps(self.local_steps, self.inner_lr)
        else:
            vec, loss, samples = trainer.compute_gradient()
        if self.attacker is not None:
            estimates = [vec]
            if self.strategy != "diloco":  # more draws of the honest gradient, on the attacker's own data
                estimates += [trainer.compute_gradient()[0] for _ in range(self.attacker.samples - 1)]
            vec = self.attacker.craft(np.stack(estimates))
        elif self.dp is not None:
            vec = self.dp.privatize(vec)
        return Update(np.asarray(vec, dtype=np.float32), self.kind, loss, samples)

    def encode(self, vec: np.ndarray) -> Encoded:
        return self.feedback.compress(vec) if self.feedback is not None else self.codec.encode(vec)

    def next_min_version(self, version: int) -> int:
        """Round strategies wait for the round they pushed to close; the others pull at once."""
        return version + 1 if self.strategy in ROUND_STRATEGIES else 0


class TrainerSource:
    """A `LocalTrainer` plus its `WorkerStrategy` as an update source for `paramserver.inprocess`."""

    def __init__(self, trainer: LocalTrainer, strategy: WorkerStrategy) -> None:
        self.trainer = trainer
        self.strategy = strategy

    def produce(self, params: np.ndarray, version: int) -> Produced:
        from dist_llm_train.paramserver.inprocess import Produced

        self.trainer.set_params(np.array(params, dtype=np.float32))  # the store's arrays are read-only
        update = self.strategy.compute(self.trainer)
        enc = self.strategy.encode(update.vec)
        return Produced(
            enc.payload, self.strategy.codec.name, enc.meta, update.kind, update.loss, update.samples
        )

    def next_min_version(self, version: int) -> int:
        return self.strategy.next_min_version(version)


def simulate(
    cfg: Config,
    step_times: Sequence[float] | None = None,
    job_id: str = "inprocess",
    dp_seed: int | None = None,
) -> tuple[SimResult, list[TrainerSource]]:
    """Train `cfg` with `training.num_workers` simulated workers in this process (no sockets).

    Worker i is named `worker-i`, holds shard i and takes `step_times[i]` virtual seconds per
    update (1.0 each by default). Returns the driver's result and the workers' sources (their
    strategies keep attack / DP / error-feedback state for inspection).

    Everything but DP noise is a function of the config (weights, batches, attacks, the virtual
    clock). DP noise follows production and comes from OS entropy unless `dp_seed` is given; with
    it, local noise (per worker) and central noise (on the PS) are seeded and a DP run repeats
    exactly.
    """
    from dist_llm_train.paramserver.inprocess import InProcessCluster, SimMember
    from dist_llm_train.training.data import make_dataset
    from dist_llm_train.training.flat import flatten_params, layout_of
    from dist_llm_train.training.trainer import LocalTrainer

    t = cfg.training
    n = t.num_workers
    times = list(step_times) if step_times is not None else [1.0] * n
    if len(times) != n:
        raise ValueError(f"step_times has {len(times)} entries for {n} workers")
    dataset = make_dataset(t)
    sources = []
    for i in range(n):
        trainer = LocalTrainer(cfg.model, t, dataset, [i], num_shards=n)
        strategy = WorkerStrategy(t, worker_name=f"worker-{i}", shard_ids=[i], num_shards=n, dp_seed=dp_seed)
        sources.append(TrainerSource(trainer, strategy))
    members = [SimMember(f"worker-{i}", sources[i], times[i]) for i in range(n)]
    model = sources[0].trainer.model
    cluster = InProcessCluster(members)
    result = cluster.run(job_spec_for(job_id, t, dp_seed), layout_of(model), flatten_params(model))
    return result, sources
