"""The worker's blocking training loop: pull parameters, compute an update, push it.

It runs in a thread (torch and the blocking PS client both release the GIL for their
heavy parts) while the asyncio agent keeps heartbeats and telemetry flowing. The loop
is a plain function of its inputs, so tests can drive it without a controller.

For every strategy the loop is receive(pull) → [compute → push ‖ overlap → receive(pull)]*:
a strategy with `overlap_steps` (Streaming DiLoCo) keeps training on this thread while the
push and the next pull run on a second one, so communication hides behind compute.

With a barrier per version (`Strategy.rounds`: sync, DiLoCo …) the next version cannot close without this
worker's push, so the waiting pull is sent while the push is still on the wire (`early_pulls`, on a client
whose calls overlap: gRPC) instead of after its reply: a round then pays one round trip on the link, not two
(80 ms of a cellular round's ~1 s).
A strategy whose next pull does not wait for its own push (async) pulls after the reply, as before, so its
pull always includes the update it just pushed.

A parameter server that restarts from its last checkpoint is a pause, not a failure (`ServerRestarts`):
calls retry while it is unreachable; an update refused because its base version is ahead of the
restarted server (`ErrorCode.ABORTED`) is dropped and the worker pulls again; and after an outage the
worker first asks where the server is now before waiting for a version the server may have lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgpack
import numpy as np

from dist_llm_train.config import Config
from dist_llm_train.core.types import (
    ErrorCode,
    PSError,
    PulledParams,
    PushHeader,
    PushOutcome,
    PushResult,
)
from dist_llm_train.paramserver.transport.client import PSClient, connect
from dist_llm_train.paramserver.transport.security import PSCredentials
from dist_llm_train.training.data import make_dataset
from dist_llm_train.training.flat import flatten_params, layout_of
from dist_llm_train.training.trainer import LocalTrainer

log = logging.getLogger(__name__)

# A restarted worker keeps its worker id, so its push sequence numbers must never repeat
# an earlier incarnation's: they start at (start time in ms) * STEP_BASE.
STEP_BASE = 1_000_000


@dataclass
class TrainingContext:
    job_id: str
    worker_id: str
    config: Config
    ps_transport: str
    ps_address: str
    shard_ids: set[int]
    num_shards: int
    compute_slowdown: float = 1.0
    telemetry_every: int = 1
    members: list[str] = field(default_factory=list)
    worker_name: str = ""  # attackers may be chosen by name (training.attacker_workers)
    ps_credentials: PSCredentials | None = None  # this job's PS credential (from the assignment) and TLS files


@dataclass
class ServerRestarts:
    """What this worker saw of parameter-server restarts; `outages` only grows, so a caller can tell whether the
    server was away since it last looked."""

    outages: int = 0  # calls that found the server unreachable (each retry counts)
    rebases: int = 0  # updates refused as ahead of a restarted server, then pulled again (no task attempt spent)
    resends: int = 0  # acknowledged updates sent again to a server that came back at their base version

    def saw_outage(self) -> None:
        self.outages += 1


@dataclass
class TrainingOutcome:
    steps: int = 0
    job_complete: bool = False
    stopped: bool = False
    last_version: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    restarts: ServerRestarts = field(default_factory=ServerRestarts)


def _retry_unavailable(
    fn: Callable[[], Any], stop: threading.Event, what: str, give_up_s: float = 120.0,
    on_retry: Callable[[], None] | None = None,
) -> Any:
    """Call fn, retrying with backoff while the PS is unreachable (e.g. restarting from a checkpoint)."""
    delay, waited = 0.1, 0.0
    while True:
        try:
            return fn()
        except PSError as err:
            if not err.unreachable or waited >= give_up_s:
                raise
            if on_retry is not None:
                on_retry()
            if stop.wait(delay):
                raise
            waited += delay
            log.info("paramserver unavailable during %s; retrying in %.1fs", what, delay)
            delay = min(delay * 2, 2.0)  # a supervised PS is back within seconds: find it soon after


def run_training(
    ctx: TrainingContext,
    stop: threading.Event,
    current_shards: Callable[[], set[int]],
    emit: Callable[[dict[str, Any]], None],
    client: PSClient | None = None,
) -> TrainingOutcome:
    cfg = ctx.config
    dataset = make_dataset(cfg.training)
    # Strategy, attack, local DP, codec + error feedback: one pipeline, fixed for the job.
    pipeline = cfg.training.worker_update(
        worker_name=ctx.worker_name, shard_ids=sorted(ctx.shard_ids), num_shards=ctx.num_shards
    )
    attack = cfg.training.attack
    # A mimic attacker trains on the shard of the worker it copies; everyone else on its own shards.
    shards = pipeline.train_shards(
        sorted(ctx.shard_ids), lambda: dataset.mimic_target(ctx.num_shards, attack.attackers if attack else 0)
    )
    trainer = LocalTrainer(cfg.model, cfg.training, dataset, shards, num_shards=ctx.num_shards)
    owned = set(ctx.shard_ids)
    spec = cfg.training.job_spec(ctx.job_id)
    ps = client or connect(ctx.ps_transport, ctx.ps_address, credentials=ctx.ps_credentials)
    out = TrainingOutcome()
    restarts = out.restarts
    step_base = int(time.time() * 1000) * STEP_BASE
    pushes = 0  # push sequence: an update refused by a restarted server is recomputed under a new step number
    overlapping = pipeline.overlap_steps > 0
    comms = ThreadPoolExecutor(1, thread_name_prefix="ps-sync") if overlapping else None
    # Two threads: a pull left waiting after a failed push (bounded by its wait timeout) never holds up the next.
    pull_alongside = pipeline.strategy.rounds and ps.overlaps_calls  # a ZMQ client's calls queue behind one another
    early_pulls = ThreadPoolExecutor(2, thread_name_prefix="ps-pull") if pull_alongside else None

    def retrying(fn: Callable[[], Any], what: str) -> Any:
        return _retry_unavailable(fn, stop, what, on_retry=restarts.saw_outage)

    def pull_now(own: np.ndarray | None = None) -> PulledParams:
        """The server's current parameters in full, without waiting for any version; with `own` (the parameters
        this worker initialised), only the deltas since them when they are what the job started from."""
        return retrying(lambda: ps.pull(ctx.job_id, ctx.worker_id, own=own), "pull")

    def waiting_pull(held: PulledParams) -> Callable[[], PulledParams]:
        """One pull that waits for the version to compute on next after `held`."""
        return partial(
            ps.pull,
            ctx.job_id,
            ctx.worker_id,
            min_version=pipeline.next_min_version(held.version),
            wait_timeout_s=pipeline.strategy.pull_wait_s(),
            have=held,  # a job that publishes deltas sends only those since (core.downlink)
        )

    def pull_next(header: PushHeader, payload: bytes, held: PulledParams, outages_before: int,
                  outages_at_ack: int) -> PulledParams:
        """The version to compute on next. When the server was away since `held` was pulled it may have restarted
        from a checkpoint behind `held`: ask where it is before waiting for a version it may never reach.
        `outages_before` / `outages_at_ack`: `restarts.outages` before the push, and when its reply came."""
        want = pipeline.next_min_version(held.version)
        waiting = waiting_pull(held)
        if restarts.outages == outages_before:
            try:
                return waiting()
            except PSError as err:
                if not err.unreachable:
                    raise
                restarts.saw_outage()
        now = pull_now()
        if now.version < held.version or now.version >= want or now.job_complete:
            if now.version < held.version:
                log.warning("paramserver is back at version %d, behind the %d held here: continuing from it",
                            now.version, held.version)
            return now
        if now.version == held.version and restarts.outages > outages_at_ack:
            # Back exactly at this update's base, and away since it acknowledged the update: that acknowledgement
            # may have come from the server that died.
            # Sending it again is safe (a server that has it answers DUPLICATE) and saves a straggler timeout.
            restarts.resends += 1
            try:
                retrying(partial(ps.push, header, payload), "push")
            except PSError as err:
                if err.unreachable:
                    raise
                log.info("resent update not taken (%s); waiting for the next version", err)
        return retrying(waiting, "pull")

    def sync(header: PushHeader, payload: bytes, held: PulledParams) -> tuple[PushResult, PulledParams, float]:
        """Push, and pull the version to compute on next (the same call order on either thread). With a round
        barrier the pull goes out alongside the push; its answer is used only when the push went through with
        no outage in between, else the pull is made again the careful way (`pull_next`)."""
        outages_before = restarts.outages
        early = early_pulls.submit(waiting_pull(held)) if early_pulls is not None else None
        push_t0 = time.perf_counter()  # netem: push timing gives the ps_sync link's measured rate
        result: PushResult = retrying(partial(ps.push, header, payload), "push")
        push_s = time.perf_counter() - push_t0
        if result.outcome is PushOutcome.JOB_COMPLETE:
            return result, held, push_s
        if early is not None and restarts.outages == outages_before:
            try:
                return result, early.result(), push_s
            except PSError as err:
                if not err.unreachable:
                    raise
                restarts.saw_outage()
        return result, pull_next(header, payload, held, outages_before, restarts.outages), push_s

    try:
        initial = flatten_params(trainer.model)
        retrying(lambda: ps.init_job(spec, layout_of(trainer.model), initial, ctx.members), "init_job")
        pulled: PulledParams = pull_now(own=initial)
        pipeline.receive(trainer, pulled.params, pulled.version)
        while not stop.is_set() and not pulled.job_complete:
            new = current_shards() - owned
            if new:
                log.info("took over shards %s", sorted(new))
                trainer.add_shards(sorted(new))
                owned |= new
            t0 = time.perf_counter()
            update = pipeline.compute(trainer)
            loss, n_samples = update.loss, update.samples
            compute_s = time.perf_counter() - t0
            if ctx.compute_slowdown > 1.0:
                # Emulated slow hardware (straggler profiles): stretch the real compute time.
                stop.wait(compute_s * (ctx.compute_slowdown - 1.0))
            encoded = pipeline.encode(update.vec, update.slot)
            header = PushHeader(
                job_id=ctx.job_id,
                worker_id=ctx.worker_id,
                step=step_base + pushes,
                base_version=pulled.version,
                codec=pipeline.codec.name,
                codec_meta=msgpack.packb(encoded.meta),
                payload_bytes=len(encoded.payload),
                num_samples=n_samples,
                loss=loss,
                kind=update.kind,
            )
            pushes += 1
            try:
                if comms is not None:
                    in_flight = comms.submit(sync, header, encoded.payload, pulled)
                    overlap_t0 = time.perf_counter()
                    pipeline.overlap(trainer)  # the steps that hide the sync; they count as compute time
                    overlap_s = time.perf_counter() - overlap_t0
                    result, nxt, push_s = in_flight.result()
                    compute_s += overlap_s
                else:
                    result, nxt, push_s = sync(header, encoded.payload, pulled)
            except PSError as err:
                if err.code is not ErrorCode.ABORTED:
                    raise
                # The server restarted from a checkpoint older than this update's base: the update is lost (a
                # checkpoint interval at most), the task is not. Continue from the version the server has.
                restarts.rebases += 1
                log.warning("update refused by a restarted paramserver (%s); pulling again", err.message)
                pulled = pull_now()
                pipeline.receive(trainer, pulled.params, pulled.version)
                continue
            out.outcomes[result.outcome.value] = out.outcomes.get(result.outcome.value, 0) + 1
            out.steps += 1
            if result.outcome is PushOutcome.JOB_COMPLETE:
                out.job_complete = True
                break
            pulled = nxt
            pipeline.receive(trainer, pulled.params, pulled.version)
            step_s = time.perf_counter() - t0
            if out.steps % ctx.telemetry_every == 0:
                tokens = n_samples * cfg.training.seq_length
                emit(
                    {
                        "job_id": ctx.job_id,
                        "step": out.steps,
                        "ps_version": pulled.version,
                        "loss": loss,
                        "step_time_s": step_s,
                        "compute_time_s": compute_s,
                        "samples_per_s": n_samples / step_s if step_s > 0 else 0.0,
                        "tokens_per_s": tokens / step_s if step_s > 0 else 0.0,
                        "bytes_sent": ps.bytes_sent,
                        "bytes_received": ps.bytes_received,
                        "wall_time": time.time(),
                        "push_outcome": result.outcome.value,
                        "push_time_s": push_s,
                        "push_bytes": len(encoded.payload),
                    }
                )
        out.job_complete = out.job_complete or pulled.job_complete
        out.stopped = stop.is_set()
        out.last_version = pulled.version
    finally:
        if comms is not None:
            comms.shutdown(wait=True)  # a sync in flight finishes (its retries watch `stop`)
        if early_pulls is not None:
            early_pulls.shutdown(wait=False, cancel_futures=True)  # a pull left waiting ends at its timeout
        out.bytes_sent, out.bytes_received = ps.bytes_sent, ps.bytes_received
        if client is None:
            ps.close()
    return out
