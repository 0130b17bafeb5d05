"""Atomic per-job checkpoints and resume.

One file per job, `<job_id>.ckpt.npz`: the parameter vector, the optimizer's arrays and a
`meta` entry holding UTF-8 JSON (spec, layout, version, counters, members, optimizer
scalars, recent push ids). A single file means one atomic rename covers everything, so a
checkpoint can never mix two versions. No pickle anywhere: arrays load with
`allow_pickle=False` and metadata is JSON.

Write protocol: temp file in the same directory -> flush -> fsync -> read it back and verify ->
os.replace -> fsync the directory. A crash at any point leaves either the old or the new
checkpoint, plus perhaps a dot-prefixed `.tmp` file that `load_all` deletes without reading.

Only a finite state is ever checkpointed: a snapshot whose parameters, optimizer state or loss
are NaN/Inf is refused before anything is written, and the written file must read back as the
same version with finite arrays before it replaces the last good checkpoint. Reading refuses a
non-finite checkpoint too (one written before these checks), rather than resume a poisoned job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import TensorSpec
from dist_llm_train.paramserver.job import JobSnapshot
from dist_llm_train.paramserver.numerics import all_finite

log = logging.getLogger(__name__)

SUFFIX = ".ckpt.npz"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read; the PS refuses to start rather than lose it."""


def checkpoint_path(directory: Path, job_id: str) -> Path:
    return directory / f"{job_id}{SUFFIX}"


def _meta(snap: JobSnapshot) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "spec": snap.spec.to_dict(),
        "layout": [{"name": t.name, "shape": list(t.shape), "offset": t.offset} for t in snap.layout],
        "version": snap.version,
        "members": snap.members,
        "open_membership": snap.open_membership,
        "counters": snap.counters,
        "last_loss": snap.last_loss,
        "optimizer_scalars": snap.optimizer_scalars,
        "seen_steps": snap.seen_steps,
    }


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite_parts(snap: JobSnapshot) -> list[str]:
    """The parts of a snapshot that hold NaN or Inf (empty: it is safe to keep)."""
    bad = [] if all_finite(snap.params) else ["params"]
    bad += [f"optimizer {k}" for k, a in snap.optimizer_arrays.items() if not all_finite(np.asarray(a))]
    scalars = [("last_loss", snap.last_loss)] + [(f"optimizer {k}", v) for k, v in snap.optimizer_scalars.items()]
    bad += [name for name, v in scalars if not np.isfinite(v)]
    return bad


def _verify(path: Path, snap: JobSnapshot) -> None:
    """The file at `path` reads back as `snap`'s job and version, with finite contents."""
    back = read_checkpoint(path)
    if back.spec.job_id != snap.spec.job_id or back.version != snap.version:
        raise CheckpointError(f"{path} read back as job {back.spec.job_id!r} v{back.version}, not v{snap.version}")
    if back.params.shape != snap.params.shape:
        raise CheckpointError(f"{path} read back with {back.params.shape} params, not {snap.params.shape}")


def write_checkpoint(directory: Path, snap: JobSnapshot) -> Path:
    """Atomically write one job's checkpoint, verified finite and read back first; returns its path.

    A snapshot with non-finite contents raises `CheckpointError` and the last good checkpoint stays."""
    bad = nonfinite_parts(snap)
    if bad:
        raise CheckpointError(
            f"job {snap.spec.job_id} v{snap.version}: {', '.join(bad)} not finite; the last good checkpoint is kept"
        )
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, snap.spec.job_id)
    tmp = directory / f".{final.name}.{uuid.uuid4().hex}.tmp"
    arrays: dict[str, np.ndarray] = {"params": snap.params}
    arrays.update({f"opt.{k}": a for k, a in snap.optimizer_arrays.items()})
    arrays.update({f"agg.{k}": a for k, a in snap.aggregator_arrays.items()})
    meta = np.frombuffer(json.dumps(_meta(snap)).encode(), dtype=np.uint8)
    try:
        with open(tmp, "wb") as f:
            savez: Any = np.savez  # numpy's stub types **arrays as its keyword flags
            savez(f, meta=meta, **arrays)
            f.flush()
            os.fsync(f.fileno())
        _verify(tmp, snap)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return final


def read_checkpoint(path: Path) -> JobSnapshot:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            params = np.array(z["params"], dtype=np.float32)
            opt = {k[len("opt.") :]: np.array(z[k]) for k in z.files if k.startswith("opt.")}
            agg = {k[len("agg.") :]: np.array(z[k]) for k in z.files if k.startswith("agg.")}
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {meta.get('format_version')}")
        spec = JobSpec.from_dict(meta["spec"])
        layout = [TensorSpec(t["name"], tuple(t["shape"]), t["offset"]) for t in meta["layout"]]
        snap = JobSnapshot(
            spec=spec,
            layout=layout,
            params=params,
            version=int(meta["version"]),
            members=list(meta["members"]),
            open_membership=bool(meta["open_membership"]),
            counters={k: int(c) for k, c in meta["counters"].items()},
            last_loss=float(meta["last_loss"]),
            optimizer_arrays=opt,
            optimizer_scalars=dict(meta["optimizer_scalars"]),
            seen_steps={w: [int(s) for s in steps] for w, steps in meta["seen_steps"].items()},
            aggregator_arrays=agg,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    bad = nonfinite_parts(snap)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite {', '.join(bad)}; refusing to resume from it")
    return snap


def load_all(directory: Path) -> list[JobSnapshot]:
    """Every job checkpointed in `directory`; leftover temp files from a crash are removed."""
    if not directory.is_dir():
        return []
    for stale in directory.glob(f".*{SUFFIX}.*.tmp"):
        log.warning("removing incomplete checkpoint %s (a write was interrupted)", stale)
        with contextlib.suppress(OSError):
            stale.unlink()
    return [read_checkpoint(p) for p in sorted(directory.glob(f"*{SUFFIX}")) if not p.name.startswith(".")]


class Checkpointer:
    """Writes snapshots on one background thread so training never waits for the disk.

    Snapshots of the same job coalesce: if a newer one arrives before the older was written,
    only the newer is written. `flush()` waits until everything submitted is on disk.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written = 0
        self.errors = 0
        self._pending: dict[str, JobSnapshot] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ps-checkpointer", daemon=True)
        self._thread.start()

    def submit(self, snap: JobSnapshot) -> None:
        with self._lock:
            fresh = snap.spec.job_id not in self._pending
            self._pending[snap.spec.job_id] = snap
        if fresh:
            self._queue.put(snap.spec.job_id)

    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            try:
                if job_id is None:
                    return
                with self._lock:
                    snap = self._pending.pop(job_id, None)
                if snap is not None:
                    self._write(snap)
            finally:
                self._queue.task_done()

    def _write(self, snap: JobSnapshot) -> None:
        try:
            write_checkpoint(self.directory, snap)
            self.written += 1
        except (OSError, CheckpointError) as err:
            self.errors += 1
            log.error("checkpoint of job %s at version %d failed: %s", snap.spec.job_id, snap.version, err)

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=30)
