"""The simulator's real-numerics side: N workers training for real against one real `ParameterStore`.

This is how strategies are compared without sockets: the store, its rounds, staleness
bounds, aggregation and optimizer are the production code; the workers run the real model,
strategy, attack, DP and codec pipeline (`core.worker_update`); only the transport is replaced
by direct calls, and time is a discrete-event clock, so a run is fast and bit-for-bit
reproducible. Each member has a virtual step time; it pulls, produces an update from what
it pulled, and pushes `step_time_s` later. Round strategies wait for the next version before
pulling again, exactly like the worker loop; a round whose members cannot all push is closed
by the store's straggler timeout on the virtual clock.

`InProcessCluster` needs only numpy (any `UpdateSource` will do); `simulate_training` builds
torch trainers, imported when it is called.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import numpy as np

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import JobStats, PushHeader, TensorSpec
from dist_llm_train.core.worker_update import WorkerUpdate
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.sim.events import VirtualClock

if TYPE_CHECKING:
    from dist_llm_train.config import Config
    from dist_llm_train.training.trainer import LocalTrainer


@dataclass
class Produced:
    """One encoded update, as a worker would put it on the wire."""

    payload: bytes
    codec: str
    meta: dict[str, Any]
    kind: str
    loss: float
    samples: int


class UpdateSource(Protocol):
    def produce(self, params: np.ndarray, version: int) -> Produced:
        """The update a worker computes on `params` (version `version`)."""
        ...

    def next_min_version(self, version: int) -> int:
        """The version to wait for before the next pull (0: pull at once)."""
        ...


@dataclass
class SimMember:
    worker_id: str
    source: UpdateSource
    step_time_s: float = 1.0


@dataclass
class TrainingResult:
    params: np.ndarray
    version: int
    virtual_seconds: float
    bytes_pushed: int = 0  # update payloads
    bytes_pulled: int = 0  # parameters pulled: 4 bytes per parameter, or the deltas sent instead (core.downlink)
    pushes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    losses: list[float] = field(default_factory=list)  # training loss of every push, in push order
    stats: JobStats | None = None  # the store's view at the end: counters, per-worker bounds
    store: ParameterStore | None = None  # for inspection after the run (e.g. the job's central DP state)

    @property
    def bytes_total(self) -> int:
        return self.bytes_pushed + self.bytes_pulled


class InProcessCluster:
    """Runs members against a fresh job in `store` until the job completes (or `max_pushes`)."""

    def __init__(self, members: list[SimMember], clock: VirtualClock | None = None) -> None:
        if not members:
            raise ValueError("an in-process cluster needs at least one member")
        names = [m.worker_id for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member ids must be unique, got {names}")
        for m in members:
            if not m.step_time_s > 0:
                raise ValueError(f"{m.worker_id}: step_time_s must be > 0, got {m.step_time_s}")
        self.members = members
        self.clock = clock or VirtualClock()
        self.store = ParameterStore(clock=self.clock)

    def run(
        self, spec: JobSpec, layout: list[TensorSpec], params: np.ndarray, max_pushes: int = 1_000_000
    ) -> TrainingResult:
        store, job_id = self.store, spec.job_id
        store.init_job(spec, layout, params, [m.worker_id for m in self.members])
        size = int(params.shape[0])
        result = TrainingResult(params=params, version=0, virtual_seconds=0.0)
        events: list[tuple[float, int, Produced, int]] = []  # (push time, member index, update, base version)
        waiting: dict[int, int] = {}  # member index -> min version it waits for
        steps = [0] * len(self.members)
        held = [(0, 0)] * len(self.members)  # (epoch, version) each member holds: pulls send deltas, as a worker's

        def start(i: int) -> None:
            pulled = store.pull(job_id, self.members[i].worker_id, have_epoch=held[i][0], have_version=held[i][1])
            held[i] = (pulled.epoch, pulled.version)
            result.bytes_pulled += 4 * size if pulled.delta is None else pulled.delta.nbytes
            if pulled.job_complete:
                return
            update = self.members[i].source.produce(pulled.params, pulled.version)
            heapq.heappush(events, (self.clock.now + self.members[i].step_time_s, i, update, pulled.version))

        for i in range(len(self.members)):
            start(i)
        while result.pushes < max_pushes:  # bounded: each pass pushes once or closes a round or stops
            if not events:
                deadline = store.next_deadline()
                if deadline is None or not waiting:
                    break
                self.clock.advance(max(self.clock.now, deadline))
                store.expire_rounds()
            else:
                t, i, update, base = heapq.heappop(events)
                self.clock.advance(t)
                member = self.members[i]
                header = PushHeader(
                    job_id=job_id,
                    worker_id=member.worker_id,
                    step=steps[i],
                    base_version=base,
                    codec=update.codec,
                    codec_meta=msgpack.packb(update.meta),
                    payload_bytes=len(update.payload),
                    num_samples=update.samples,
                    loss=update.loss,
                    kind=update.kind,
                )
                steps[i] += 1
                outcome = store.push(header, update.payload)
                result.pushes += 1
                result.bytes_pushed += len(update.payload)
                result.outcomes[outcome.outcome.value] += 1
                result.losses.append(update.loss)
                waiting[i] = member.source.next_min_version(base)
            version = store.stats(job_id)[0].version
            complete = store.stats(job_id)[0].complete
            for j, want in sorted(waiting.items()):
                if version >= want or complete:
                    del waiting[j]
                    start(j)
            if complete and not events:
                break
        final = store.pull(job_id, "in-process-driver")
        result.params, result.version = final.params, final.version
        result.virtual_seconds = self.clock.now
        result.stats = store.stats(job_id)[0]
        result.store = store
        return result


class TrainerSource:
    """A torch trainer plus its worker's update pipeline, as an update source for `InProcessCluster`."""

    def __init__(self, trainer: LocalTrainer, pipeline: WorkerUpdate) -> None:
        self.trainer = trainer
        self.pipeline = pipeline

    def produce(self, params: np.ndarray, version: int) -> Produced:
        # The store's arrays are read-only, hence the copy.
        update = self.pipeline.after_pull(self.trainer, np.array(params, dtype=np.float32), version)
        enc = self.pipeline.encode(update.vec, update.slot)
        return Produced(enc.payload, self.pipeline.codec.name, enc.meta, update.kind, update.loss, update.samples)

    def next_min_version(self, version: int) -> int:
        return self.pipeline.next_min_version(version)


def simulate_training(
    cfg: Config,
    step_times: Sequence[float] | None = None,
    job_id: str = "inprocess",
    dp_seed: int | None = None,
) -> tuple[TrainingResult, list[TrainerSource]]:
    """Train `cfg` with `training.num_workers` simulated workers in this process (no sockets).

    Worker i is named `worker-i`, holds shard i and takes `step_times[i]` virtual seconds per
    update (1.0 each by default). Returns the driver's result and the workers' sources (their
    pipelines keep attack / DP / error-feedback state for inspection).

    Everything but DP noise is a function of the config (weights, batches, attacks, the virtual
    clock). DP noise follows production and comes from OS entropy unless `dp_seed` is given; with
    it, local noise (per worker) and central noise (on the PS) are seeded and a DP run repeats
    exactly.
    """
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
    attackers = t.attack.attackers if t.attack is not None else 0
    for i in range(n):
        pipeline = t.worker_update(worker_name=f"worker-{i}", shard_ids=[i], num_shards=n, dp_seed=dp_seed)
        shards = pipeline.train_shards([i], lambda: dataset.mimic_target(n, attackers))
        trainer = LocalTrainer(cfg.model, t, dataset, shards, num_shards=n)
        sources.append(TrainerSource(trainer, pipeline))
    members = [SimMember(f"worker-{i}", sources[i], times[i]) for i in range(n)]
    model = sources[0].trainer.model
    cluster = InProcessCluster(members)
    result = cluster.run(t.job_spec(job_id, dp_seed), layout_of(model), flatten_params(model))
    return result, sources
