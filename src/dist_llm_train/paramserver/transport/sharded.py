"""One client for P parameter-server shards, with the interface of one server (`client.PSClient`).

    ps = connect("grpc", "10.0.0.1:50051,10.0.0.2:50051,10.0.0.3:50051")   # three shards

Each shard is an ordinary parameter server that holds one contiguous slice of the flat vector
(`core.sharding.ShardPlan`) as its whole job: its own versions, optimizer state, update bound, checkpoints. This
client cuts every init and push into the P slices and sends them in parallel (one thread per shard: both
transports release the GIL while they wait), and joins the P pulled slices into one vector.

A version is complete when every shard has it: a pull reports the lowest version among the shards (and
waits on each for `min_version`), the job is complete when every shard says so. Shards advance in step because
every worker pushes to all of them; a shard that restarted from an older checkpoint catches up by itself (sync:
it refuses pushes based ahead of it with ABORTED, the worker pulls the lowest version, the shards that are
ahead drop that round as late and the restarted one applies it, until all agree again).

A push is answered with the most telling of the shards' outcomes (a refusal before a buffered update before an
applied one before a duplicate); JOB_COMPLETE only when every shard says it. A refusal by any shard is raised:
a server-side refusal first, then ABORTED, then unreachable; the worker's retry of the whole push is safe since
shards that already took it answer DUPLICATE.

Downlink deltas (a job with a downlink codec, `core.downlink`) work per shard: each shard publishes deltas of its
own slice. The client keeps the per-shard pieces of the last few vectors it returned (`HELD_PER_JOB`), so a
pull that passes one of them as `have` sends each shard the piece that shard sent, and each answers with its
deltas since; `own` (the parameters a worker initialised) is cut by the job's split and each shard checks its
piece's digest. A `have` this client did not return (or no longer holds) gets a full pull: more bytes, same
parameters. Each shard quantises its own slice, so a compressed downlink's chunks start at slice bounds: the same
maths as one PS up to where chunk scales fall, not bit for bit.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

import msgpack
import numpy as np

from dist_llm_train.core.codecs import get_codec
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.sharding import MAX_SHARDS, ShardPlan, check_shardable
from dist_llm_train.core.types import (
    ErrorCode,
    InitResult,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushOutcome,
    PushResult,
    TensorSpec,
)
from dist_llm_train.paramserver.numerics import Buffer, decode_update, unpack_meta
from dist_llm_train.paramserver.transport.client import PSClient, as_float32

T = TypeVar("T")

# Which outcome a push reports when the shards disagree: the first of these any shard gave.
_OUTCOME_ORDER = (
    PushOutcome.STALE_REJECTED,
    PushOutcome.LATE_DROPPED,
    PushOutcome.BUFFERED,
    PushOutcome.APPLIED,
    PushOutcome.DUPLICATE,
    PushOutcome.JOB_COMPLETE,
)


def parse_addresses(address: str) -> list[str]:
    """`host:port[,host:port...]` as a list; ValueError for an empty entry or more than MAX_SHARDS."""
    parts = [a.strip() for a in address.split(",")]
    if any(not a for a in parts):
        raise ValueError(f"PS address {address!r} has an empty entry (want host:port[,host:port...])")
    if len(parts) > MAX_SHARDS:
        raise ValueError(f"PS address names {len(parts)} shards; at most {MAX_SHARDS}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"PS address {address!r} names a shard twice")
    return parts


def split_update(header: PushHeader, payload: Buffer, plan: ShardPlan) -> list[tuple[PushHeader, memoryview]]:
    """One pushed update as P per-shard pushes carrying the same values, cut by its codec (`Codec.split`): each
    shard gets its slice as compressed as the worker sent it (the same codes and scales, not a re-encoding).

    `none` and `fp16` payloads are cut as bytes, no copy, once their length is right (each value stands alone and
    each shard checks its own). Any other payload is decoded here first, so one that does not decode is refused
    before any shard sees it (PSError(INVALID_ARGUMENT), nothing sent). A payload whose chunks straddle a bound
    (a chunk size that does not divide `sharding.ALIGN`, or a vector too small to align) goes to each shard as its
    slice of the decoded values, `none`: the same values at float32's wire size (docs/architecture.md)."""
    data = memoryview(payload).cast("B")
    try:
        codec = get_codec(header.codec)
    except ValueError as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, str(err)) from None
    vec = None
    if codec.element_bytes is not None:
        if len(data) != codec.element_bytes * plan.num_params:
            raise PSError(ErrorCode.INVALID_ARGUMENT, f"{header.codec} payload is {len(data)} bytes; "
                          f"{plan.num_params} elements need {codec.element_bytes * plan.num_params}")
    else:
        vec = decode_update(header.codec, header.codec_meta, data, plan.num_params)
    meta = unpack_meta(header.codec_meta)
    cut = codec.split(data, meta, plan.bounds)
    if cut is not None:
        return [
            (replace(header, codec_meta=header.codec_meta if piece_meta is meta else msgpack.packb(piece_meta),
                     payload_bytes=len(piece)), memoryview(piece).cast("B"))
            for piece, piece_meta in cut
        ]
    assert vec is not None  # fixed-width codecs cut anywhere
    out = []
    for part in plan.split(np.ascontiguousarray(vec, dtype="<f4")):
        piece = memoryview(part.tobytes())
        out.append((replace(header, codec="none", codec_meta=b"", payload_bytes=len(piece)), piece))
    return out


def _raise_first(errors: list[PSError]) -> None:
    """Raise the error the caller should act on: a refusal, else ABORTED, else unreachable."""
    if not errors:
        return
    refusals = [e for e in errors if not e.unreachable and e.code is not ErrorCode.ABORTED]
    aborted = [e for e in errors if e.code is ErrorCode.ABORTED]
    raise (refusals or aborted or errors)[0]


HELD_PER_JOB = 2
"""Joined pulls per job whose per-shard pieces are kept for delta pulls: the vector a worker computes on and
the one it pulled alongside its push (which it may discard and pull again from the first)."""


class ShardedPSClient(PSClient):
    """P per-shard clients behind the one-server interface (see the module docstring)."""

    def __init__(self, shards: list[PSClient]) -> None:
        super().__init__()
        if not 1 <= len(shards) <= MAX_SHARDS:
            raise ValueError(f"a sharded client needs 1..{MAX_SHARDS} shard clients, got {len(shards)}")
        self.shards = shards
        # Two calls at a time per shard: a long-waiting pull from one thread must not queue another thread's push.
        self._pool = ThreadPoolExecutor(2 * len(shards), thread_name_prefix="ps-shard")
        self._plans: dict[str, ShardPlan] = {}  # job id -> its split (from init_job or the first pull)
        self._layouts: dict[str, list[TensorSpec]] = {}  # job id -> the full layout given to init_job
        # job id -> (a joined PulledParams we returned, weakly; the shards' pieces of it), newest last
        self._held: dict[str, deque[tuple[weakref.ref[PulledParams], list[PulledParams]]]] = {}
        self._held_lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.shards)

    def _each(self, call: Callable[[int, PSClient], T]) -> list[T]:
        """call(i, shard i) on every shard in parallel; PSError when any shard fails (see `_raise_first`)."""
        futures = [self._pool.submit(call, i, c) for i, c in enumerate(self.shards)]
        results: list[T] = []
        errors: list[PSError] = []
        for f in futures:
            try:
                results.append(f.result())
            except PSError as err:
                errors.append(err)
        self._tally()
        _raise_first(errors)
        return results

    def _tally(self) -> None:
        self.bytes_sent = sum(c.bytes_sent for c in self.shards)
        self.bytes_received = sum(c.bytes_received for c in self.shards)

    def init_job(self, spec: JobSpec, layout: list[TensorSpec], params: np.ndarray, members: list[str]) -> InitResult:
        flat = as_float32(params)
        try:
            check_shardable(spec, self.count)
            plan = ShardPlan.balanced(int(flat.shape[0]), self.count)
        except ValueError as err:
            raise PSError(ErrorCode.INVALID_ARGUMENT, str(err)) from None
        slices = plan.split(flat)
        results = self._each(lambda i, c: c.init_job(spec, plan.layout(layout, i), slices[i], members))
        self._plans[spec.job_id] = plan
        self._layouts[spec.job_id] = list(layout)
        return InitResult(created=any(r.created for r in results), version=min(r.version for r in results))

    def pull(
        self,
        job_id: str,
        worker_id: str,
        min_version: int = 0,
        wait_timeout_s: float = 0.0,
        have: PulledParams | None = None,
        own: np.ndarray | None = None,
    ) -> PulledParams:
        haves = self._pieces_of(job_id, have)
        owns = self._split_own(job_id, own) if haves is None else None
        parts = self._each(lambda i, c: c.pull(job_id, worker_id, min_version, wait_timeout_s,
                                                have=haves[i] if haves else None, own=owns[i] if owns else None))
        plan = ShardPlan((0, *np.cumsum([p.params.shape[0] for p in parts]).tolist()))
        known = self._plans.setdefault(job_id, plan)
        if known != plan:
            raise PSError(ErrorCode.FAILED_PRECONDITION, f"shards of job {job_id!r} hold slices {plan.bounds}, "
                          f"not the {known.bounds} this client split it into")
        layout = self._layouts.get(job_id)
        if layout is None:  # a client that did not create the job: the shards' pieces, offsets made global
            layout = [replace(t, offset=t.offset + plan.bounds[i]) for i, p in enumerate(parts) for t in p.layout]
        joined = PulledParams(
            version=min(p.version for p in parts),
            params=plan.join([p.params for p in parts]),
            layout=layout,
            job_complete=all(p.job_complete for p in parts),
            # Non-zero when every shard publishes deltas; the lineages themselves stay with the pieces.
            epoch=parts[0].epoch if all(p.epoch for p in parts) else 0,
        )
        if joined.epoch:
            with self._held_lock:
                held = self._held.setdefault(job_id, deque(maxlen=HELD_PER_JOB))
                held.append((weakref.ref(joined), parts))
        return joined

    def _pieces_of(self, job_id: str, have: PulledParams | None) -> list[PulledParams] | None:
        """The shards' pieces of `have`, when it is a vector this client returned and still holds."""
        if have is None or not have.epoch:
            return None
        with self._held_lock:
            for ref, parts in self._held.get(job_id, ()):
                if ref() is have:
                    return parts
        return None

    def _split_own(self, job_id: str, own: np.ndarray | None) -> list[np.ndarray] | None:
        """`own` cut as the job's parameters are (a balanced split depends only on the size and the count)."""
        if own is None:
            return None
        flat = as_float32(own)
        plan = self._plans.get(job_id) or ShardPlan.balanced(int(flat.shape[0]), self.count)
        return plan.split(flat) if plan.num_params == flat.shape[0] else None

    def push(self, header: PushHeader, payload: Buffer) -> PushResult:
        plan = self._plans.get(header.job_id)
        if plan is None:  # this client has not seen the job yet: learn its split from the shards
            self.pull(header.job_id, header.worker_id)
            plan = self._plans[header.job_id]
        pieces = split_update(header, payload, plan)
        results = self._each(lambda i, c: c.push(*pieces[i]))
        outcomes = {r.outcome for r in results}
        if outcomes != {PushOutcome.JOB_COMPLETE}:
            outcomes.discard(PushOutcome.JOB_COMPLETE)  # complete only when every shard is
        outcome = next(o for o in _OUTCOME_ORDER if o in outcomes)
        messages = sorted({f"shard {i}: {r.message}" for i, r in enumerate(results)
                           if r.message and r.outcome is outcome})
        return PushResult(
            outcome=outcome,
            version=min(r.version for r in results),
            staleness=max(r.staleness for r in results),
            message="; ".join(messages[:3]),
        )

    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return self._each(lambda i, c: c.set_members(job_id, members))[0]

    def stats(self, job_id: str | None = None) -> list[JobStats]:
        """One JobStats per job, combined over the shards (a job is listed when every shard knows it):
        the lowest version, complete when all are, byte counters summed (each shard moved its own bytes), other
        counters the highest any shard has (a push or a round is one event that every shard counts), members,
        loss and per-worker records from shard 0."""
        per_shard = self._each(lambda i, c: c.stats(job_id))
        by_job = [{s.job_id: s for s in stats} for stats in per_shard]
        out: list[JobStats] = []
        for jid, first in by_job[0].items():
            group = [jobs[jid] for jobs in by_job if jid in jobs]
            if len(group) != self.count:
                continue
            counters: dict[str, int] = {}
            for s in group:
                for key, value in s.counters.items():
                    counters[key] = counters.get(key, 0) + value if "bytes" in key else max(counters.get(key, 0), value)
            out.append(replace(
                first,
                version=min(s.version for s in group),
                complete=all(s.complete for s in group),
                num_params=sum(s.num_params for s in group),
                counters=counters,
            ))
        return out

    def close(self) -> None:
        for c in self.shards:
            c.close()
        self._pool.shutdown(wait=False)
