"""Real numerics on the virtual clock: the simulator's network and control plane, with a model that learns.

The per-event engine (`actor_engine.ActorEngine`) decides *when* every pull, compute and push happens —
link delay, jitter, loss stalls and rate from the profile, compute from the declared or measured step-time
model, crashes and churn through the real controller. `RealNumerics` decides *what* each update is: the
worker's real pipeline (`core.worker_update`: strategy, attack, local DP, codec with error feedback) run by
a real `LocalTrainer` on the parameters the worker pulled, pushed into the real PS job (`JobState`: version
rule, aggregation rule, server optimizer, central DP). So a simulated run reports what an embedded run
reports — loss against step, wall clock and bytes, time and bytes to target, the final eval loss — in
virtual time, for a few dozen workers on two cores.

What stays a model: each worker's compute *time* (`SimConfig.compute`, not the time torch took here), and
which data a worker trains on (worker slot i holds shard i mod tasks, also after a rejoin; the real
controller may hand a dead worker's shard to another worker). A new life of a worker (a rejoin after a
crash or a churn trace's leave) starts from a fresh trainer, as a restarted process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from dist_llm_train.config import Config
from dist_llm_train.core.downlink import params_digest
from dist_llm_train.core.types import PSError, PushHeader
from dist_llm_train.paramserver.job import JobState
from dist_llm_train.sim import adapters
from dist_llm_train.sim.config import SimConfig, SimConfigError
from dist_llm_train.sim.network import worker_name
from dist_llm_train.sim.runner import SimResult, simulate

if TYPE_CHECKING:
    from dist_llm_train.core.worker_update import WorkerUpdate
    from dist_llm_train.training.trainer import LocalTrainer

Progress = Callable[[int, float], None]
"""Called with (PS version, latest training loss) whenever the simulated PS publishes a version."""

MAX_TRAINED_WORKERS = 256
"""Real numerics hold one model and optimizer state per live worker; past this, use the free numerics."""


def training_config_for(base: Config, sim: SimConfig) -> Config:
    """`base` with the simulation's choices written into its training section (workers, strategy, steps...).

    The simulation is resolved from files and flags (`sim.request`); the trainers must train exactly that
    job, so what the simulation decided wins. Settings the simulation cannot honour with a real model — a
    parameter count or a codec ratio other than the model's own — are refused."""
    if sim.workers > MAX_TRAINED_WORKERS:
        raise SimConfigError(
            f"{sim.workers} workers is too many to train for real in one process (at most "
            f"{MAX_TRAINED_WORKERS}); simulate without --train for the infrastructure figures"
        )
    t = base.training
    strategy = sim.strategy_config.model_dump()
    steps = sim.strategy.steps_for_versions(sim.rounds)  # the step budget that gives `rounds` versions
    codec = t.codec.model_dump()
    codec["name"] = sim.payload.codec
    training = {
        **t.model_dump(),
        "num_workers": sim.workers,
        "steps": steps,
        "seed": sim.seed,
        "batch_size": sim.batch_size,
        "strategy": strategy,
        "codec": codec,
    }
    data = base.model_dump()
    data["training"] = training
    data["model"] = sim.model.model_dump()
    return Config.model_validate(data)


class _Life:
    """One life of a worker: its trainer and update pipeline, and the update it has computed but not sent."""

    def __init__(self, trainer: LocalTrainer, pipeline: WorkerUpdate, own_digest: bytes) -> None:
        self.trainer = trainer
        self.pipeline = pipeline
        self.header: dict[str, Any] | None = None
        self.payload = b""
        self.loss = float("nan")
        self.held: tuple[int, int] = (0, 0)  # (epoch, version) of the parameters it holds; epoch 0: none
        # Its first pull names the parameters it initialised, as a real worker's does (`core.downlink`).
        self.own_digest = own_digest


@dataclass(frozen=True)
class EvalPoint:
    """The global model's held-out loss at one PS version, with the virtual time and wire bytes spent by then."""

    version: int
    virtual_s: float
    wire_bytes: int  # every update that reached the PS and every pull it sent, as its counters have them
    loss: float


WIRE_COUNTERS = (
    "bytes_received_gradient",
    "bytes_received_pseudo_gradient",
    "params_bytes_sent",
    "params_delta_bytes_sent",
)


class RealNumerics:
    """`engine.Numerics` that trains: every update is the real worker pipeline's, applied by the real PS job.

    With `eval_every` it also evaluates what a pull returns (the published parameters) on the held-out set each
    time the job crosses a multiple of that many versions: loss against virtual time and bytes for the global
    model, rather than the workers' own training losses (which, after local steps, run ahead of it)."""

    def __init__(
        self,
        cfg: Config,
        sim: SimConfig,
        dp_seed: int | None = None,
        progress: Progress | None = None,
        eval_every: int | None = None,
    ) -> None:
        from dist_llm_train.training.data import make_dataset
        from dist_llm_train.training.flat import flatten_params, layout_of
        from dist_llm_train.training.trainer import LocalTrainer

        self.cfg = cfg
        self.tasks = sim.num_tasks
        self.dp_seed = dp_seed
        self.progress = progress
        t = cfg.training
        self.dataset = make_dataset(t)
        self._trainer_cls = LocalTrainer
        self.evaluator = LocalTrainer(cfg.model, t, self.dataset, [0], num_shards=self.tasks)
        self.layout = layout_of(self.evaluator.model)
        self.initial_params = flatten_params(self.evaluator.model)
        if sim.payload.params is not None and sim.payload.params != self.initial_params.size:
            raise SimConfigError(
                f"payload.params = {sim.payload.params} cannot be trained: the model has "
                f"{self.initial_params.size} parameters (drop --params, or change the model)"
            )
        self.spec = t.job_spec(adapters.JOB_ID, dp_seed)
        if self.spec.total_steps != sim.rounds:
            raise SimConfigError(
                f"the trained job has {self.spec.total_steps} versions but the simulation asks for {sim.rounds}"
            )
        self.lives: dict[int, _Life] = {}
        self.js: JobState | None = None
        self.published = 0
        if eval_every is not None and eval_every < 1:
            raise SimConfigError(f"eval_every must be >= 1 version, got {eval_every}")
        self.eval_every = eval_every
        self.eval_curve: list[EvalPoint] = []

    # -- engine.Numerics -------------------------------------------------------------------------------
    def job_state(self, clock: Callable[[], float]) -> JobState:
        self.js = adapters.make_job_state(self.spec, [], clock, self.layout, self.initial_params)
        return self.js

    def begin_life(self, agent: int, slot: int) -> None:
        t = self.cfg.training
        shard = slot % self.tasks
        pipeline = t.worker_update(
            worker_name=worker_name(slot), shard_ids=[shard], num_shards=self.tasks, dp_seed=self.dp_seed
        )
        attackers = t.attack.attackers if t.attack is not None else 0
        shards = pipeline.train_shards([shard], lambda: self.dataset.mimic_target(self.tasks, attackers))
        trainer = self._trainer_cls(self.cfg.model, t, self.dataset, shards, num_shards=self.tasks)
        from dist_llm_train.training.flat import flatten_params

        self.lives[agent] = _Life(trainer, pipeline, params_digest(flatten_params(trainer.model)))

    def pulled(self, js: JobState, agent: int, version: int) -> None:
        if js.version != version:  # the engine serves only the job's current version; anything else is a bug
            raise RuntimeError(f"served version {version} while the job is at {js.version}")
        life = self.lives[agent]
        # The job's own read: it counts the pull's bytes (deltas from what this life holds, or the full
        # model) and returns what a real worker holds afterwards — θ̂ with a downlink codec, bit-identical
        # to applying the deltas, else θ. The job's array is read-only, hence the copy.
        got = js.read(*life.held, have_digest=b"" if life.held[0] else life.own_digest)
        life.held = (got.epoch, got.version)
        update = life.pipeline.after_pull(life.trainer, np.array(got.params, dtype=np.float32), got.version)
        enc = life.pipeline.encode(update.vec, update.slot)
        life.payload = enc.payload
        life.loss = update.loss
        life.header = {
            "codec": life.pipeline.codec.name,
            "codec_meta": msgpack.packb(enc.meta),
            "num_samples": update.samples,
            "loss": update.loss,
            "kind": update.kind,
        }

    def push(self, js: JobState, worker_id: str, step: int, agent: int, base_version: int) -> tuple[str, int]:
        life = self.lives[agent]
        if life.header is None:
            raise RuntimeError(f"agent {agent} pushed without having pulled")
        header = PushHeader(
            job_id=self.spec.job_id,
            worker_id=worker_id,
            step=step,
            base_version=base_version,
            payload_bytes=len(life.payload),
            **life.header,
        )
        life.header = None
        before = js.version
        try:
            result = js.push(header, life.payload)
        except PSError as err:
            return err.code.value, js.version - base_version
        if js.version != before:
            if self.progress is not None:
                self.progress(js.version, life.loss)
            every = self.eval_every
            if every is not None and js.version // every > before // every:
                self.record_eval(js)
        return result.outcome.value, result.staleness

    def record_eval(self, js: JobState) -> None:
        counters = js.counters
        wire = sum(int(counters.get(key, 0)) for key in WIRE_COUNTERS)
        loss = self.evaluate(js.published)
        self.eval_curve.append(EvalPoint(js.version, js._clock(), wire, loss))

    def loss(self, agent: int) -> float:
        life = self.lives.get(agent)
        return life.loss if life is not None else float("nan")

    def end_life(self, agent: int) -> None:
        self.lives.pop(agent, None)

    # -- after the run -----------------------------------------------------------------------------------
    def evaluate(self, params: np.ndarray) -> float:
        """Held-out loss of `params`, as the embedded launcher measures it."""
        return self.evaluator.evaluate(np.array(params, dtype=np.float32), self.cfg.training.eval_batches)

    @property
    def loss_floor(self) -> float | None:
        return self.dataset.loss_floor


@dataclass
class Trained:
    """What real numerics add to a simulation's result."""

    initial_loss: float
    final_loss: float
    loss_floor: float | None
    final_params: np.ndarray
    strategy: dict[str, Any]
    """The run report's strategy section (`embedded.report.strategy_summary`): what ran, wire bytes per class
    as the PS counted them, per-worker acceptance."""
    eval_curve: list[EvalPoint] = field(default_factory=list)
    """With `eval_every`: the global model's held-out loss as it trained."""


def simulate_trained(
    base: Config,
    sim: SimConfig,
    progress: Progress | None = None,
    dp_seed: int | None = None,
    eval_every: int | None = None,
) -> SimResult:
    """Simulate `sim` with real numerics: the job `base` describes, trained by `sim.workers` virtual workers.

    Same seed, same result (DP noise too when `dp_seed` is given). The result carries `trained`: initial
    and final eval loss, the corpus's loss floor, the final parameters and the strategy section, and with
    `eval_every` the global model's held-out loss every that many versions (`EvalPoint`)."""
    from dist_llm_train.embedded.report import strategy_summary

    cfg = training_config_for(base, sim)
    numerics = RealNumerics(cfg, sim, dp_seed=dp_seed, progress=progress, eval_every=eval_every)
    initial_loss = numerics.evaluate(numerics.initial_params)
    result = simulate(sim, telemetry=True, numerics=numerics)
    js = numerics.js
    if js is None:  # pragma: no cover - simulate always asks for the job first
        raise RuntimeError("the simulation never created its job")
    stats = js.stats()
    result.trained = Trained(
        initial_loss=initial_loss,
        # What a pull returns, as the embedded launcher evaluates it: θ̂ with a downlink codec, else θ.
        final_loss=numerics.evaluate(js.published),
        loss_floor=numerics.loss_floor,
        final_params=np.array(js.published),
        strategy=strategy_summary(cfg.training, stats, []),
        eval_curve=numerics.eval_curve,
    )
    return result
