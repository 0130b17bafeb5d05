"""Telling the parameter server who the members of each job are.

The PS closes a sync round when every member has pushed, so it must learn quickly when a
worker dies or joins. `MembershipSync` keeps, per job, the member list the PS last
acknowledged and sends the current one whenever they differ. A PS that is down, slow or
does not know the job yet (the first worker creates it) never breaks the controller: the
error is logged and counted, and the same difference is retried on the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dist_llm_train.core.types import ErrorCode, PSError

log = logging.getLogger(__name__)

VERSION_ASK_BACKOFF_S = 2.0
"""After a failed ask for a job's PS version, claims are judged by the job's bound alone for this long."""


class MembershipNotifier(Protocol):
    """Pushes a job's member list to the PS; raises on any failure."""

    def set_members(self, job_id: str, members: list[str]) -> Any: ...

    def close(self) -> None: ...


class PSMembershipNotifier:
    """The production notifier: `paramserver.client.connect(...).set_members`, reconnecting after errors."""

    def __init__(
        self,
        transport: str,
        address: str,
        timeout_s: float = 2.0,
        *,
        token: str | None = None,
        curve_server_key: str | None = None,
    ) -> None:
        """`token`: the controller's own PS credential (SetMembers, GetStats); TLS files come from DLT_PS_TLS_*."""
        self.transport = transport
        self.address = address
        self.timeout_s = timeout_s
        self.token = token
        self.curve_server_key = curve_server_key
        self._client: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        # imported late: the PS client is optional here
        from dist_llm_train.paramserver.transport.client import connect
        from dist_llm_train.paramserver.transport.security import PSCredentials

        credentials = PSCredentials.from_env(self.token, self.curve_server_key)
        return connect(self.transport, self.address, timeout_s=self.timeout_s, credentials=credentials)

    def set_members(self, job_id: str, members: list[str]) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            try:
                return self._client.set_members(job_id, members)
            except PSError as err:
                if err.unreachable:
                    self._drop_client()
                raise
            except Exception:
                self._drop_client()
                raise

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as err:  # closing a broken channel must not mask the real error
                log.debug("closing PS client failed: %s", err)

    def job_stats(self, job_id: str) -> Any | None:
        """The PS's record of a job (`JobStats`: version, members, counters, per-worker stats); None if it has none."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            try:
                jobs = self._client.stats(job_id)
            except Exception:
                self._drop_client()
                raise
        return jobs[0] if jobs else None

    def worker_stats(self, job_id: str) -> list[Any]:
        """The PS's per-worker record for a job (pushes, acceptance, staleness bound); [] if it has none."""
        stats = self.job_stats(job_id)
        return list(stats.workers) if stats is not None else []

    def close(self) -> None:
        with self._lock:
            self._drop_client()


@dataclass
class SyncReport:
    sent: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # the PS does not know the job yet


class MembershipSync:
    """Reconciles desired membership (from the store) with what the PS acknowledged."""

    def __init__(self, notifier: MembershipNotifier, desired: Callable[[], dict[str, list[str]]]) -> None:
        self.notifier = notifier
        self._desired = desired
        self._acked: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self.failures = 0
        self.sends = 0
        self.last_error: str | None = None
        self.resyncs = 0  # acknowledgements forgotten because the PS no longer held them (a PS restart)
        self.version_asks = 0  # PS stats read to judge a telemetry claim past the version last seen
        self._worker_stats: dict[str, dict[str, Any]] = {}
        self._job_counters: dict[str, dict[str, int]] = {}
        self._stats_polled_at = float("-inf")
        # The PS's version per job: (version, monotonic time the asking started), from the stats poll or an ask.
        self._ps_versions: dict[str, tuple[int, float]] = {}
        self._version_lock = threading.Lock()  # one version ask at a time
        self._version_ask_failed_at = float("-inf")

    def pending(self) -> dict[str, list[str]]:
        """Jobs whose PS membership differs from the desired one (what the next sync will send)."""
        want = self._desired()
        for job_id, acked in list(self._acked.items()):  # /status reads while a sync may write
            if job_id not in want and acked:
                want[job_id] = []  # finished or cancelled job: empty its membership once
        out = {}
        for job_id, members in want.items():
            target = tuple(sorted(members))
            if self._acked.get(job_id) == target or (not target and job_id not in self._acked):
                continue
            out[job_id] = list(target)
        return out

    def sync(self) -> SyncReport:
        report = SyncReport()
        with self._lock:
            for job_id, members in self.pending().items():
                try:
                    self.notifier.set_members(job_id, members)
                except PSError as err:
                    if err.code is ErrorCode.NOT_FOUND:
                        report.waiting.append(job_id)
                        log.debug("PS does not know job %s yet; will retry", job_id)
                        continue
                    self._failed(report, job_id, f"{err}")
                    continue
                except Exception as err:  # unreachable PS, broken channel, bug in a client: never fatal
                    self._failed(report, job_id, f"{type(err).__name__}: {err}")
                    continue
                self._acked[job_id] = tuple(members)
                self.sends += 1
                report.sent[job_id] = members
                log.info("PS membership of %s -> %s", job_id, members)
        return report

    def _failed(self, report: SyncReport, job_id: str, message: str) -> None:
        self.failures += 1
        self.last_error = message
        report.failed[job_id] = message
        log.warning("PS membership update for %s failed (will retry): %s", job_id, message)

    def refresh_worker_stats(self, now: float, min_interval_s: float = 2.0) -> None:
        """Poll the PS for each acknowledged job's per-worker staleness bounds and its counters (for
        /status), at most every 2 s.

        A notifier that reports whole jobs (`job_stats`) also shows the members the PS holds now: a PS restarted
        from a checkpoint holds the members of that checkpoint, so an acknowledgement it no longer reflects is
        forgotten and the next sync sends the membership again (else a sync round would wait for a worker that
        died after the checkpoint until its straggler timeout, every round)."""
        fetch_job = getattr(self.notifier, "job_stats", None)
        fetch = getattr(self.notifier, "worker_stats", None)
        if (fetch_job is None and fetch is None) or now - self._stats_polled_at < min_interval_s:
            return
        self._stats_polled_at = now
        for job_id, members in list(self._acked.items()):
            if not members:
                continue
            try:
                asked_at = time.monotonic()
                if fetch_job is None:
                    workers = fetch(job_id) if fetch is not None else []
                else:
                    stats = fetch_job(job_id)
                    workers = list(stats.workers) if stats is not None else []
                    if stats is not None and tuple(sorted(stats.members)) != members:
                        self._forget(job_id, members, list(stats.members))
                    self._job_counters[job_id] = dict(stats.counters) if stats is not None else {}
                    if getattr(stats, "version", None) is not None:
                        self._ps_versions[job_id] = (int(stats.version), asked_at)
                self._worker_stats[job_id] = {w.worker_id: w for w in workers}
            except Exception as err:  # the PS being away only makes /status older, never the controller fail
                log.debug("PS stats for %s unavailable: %s", job_id, err)

    def _forget(self, job_id: str, acked: tuple[str, ...], held: list[str]) -> None:
        with self._lock:
            if self._acked.get(job_id) == acked:  # unless a sync sent a newer list meanwhile
                del self._acked[job_id]
                self.resyncs += 1
        log.warning("PS holds members %s for %s, not the acknowledged %s (restarted?); sending them again",
                    sorted(held), job_id, list(acked))

    def version_past(self, job_id: str, claimed: int) -> int | None:
        """The PS's version of `job_id` if `claimed` is past it, else None (also when the PS cannot say now).

        A worker reports the PS version it trained on (`TelemetryIn.ps_version`); the PS published it, so a
        claim past the PS's version is made up. A claim within the version last seen (stats poll, every 2 s) is
        judged at once; one past it makes the controller ask the PS *after the claim arrived* (one ask at a
        time; claims that waited for it share its answer), since the PS may have published since. When the PS
        is away, does not know the job, or the notifier cannot report jobs, None: the caller's bound (the
        job's last version) still holds, and after a failed ask none is tried for `VERSION_ASK_BACKOFF_S`, so
        a PS that is down does not slow telemetry. A PS restarted from a checkpoint is seen at its older
        version at the next poll; until then claims up to its version before the restart pass."""
        arrived = time.monotonic()
        known = self._ps_versions.get(job_id)
        if known is not None and claimed <= known[0]:
            return None
        fetch_job = getattr(self.notifier, "job_stats", None)
        if fetch_job is None:
            return None
        with self._version_lock:
            known = self._ps_versions.get(job_id)
            if known is not None and (claimed <= known[0] or known[1] >= arrived):
                return None if claimed <= known[0] else known[0]
            if arrived - self._version_ask_failed_at < VERSION_ASK_BACKOFF_S:
                return None
            asked_at = time.monotonic()
            try:
                stats = fetch_job(job_id)
            except PSError as err:
                if err.code is not ErrorCode.NOT_FOUND:  # a job the PS has not created yet is no failure
                    self._version_ask_failed_at = time.monotonic()
                log.debug("PS version of %s unavailable: %s", job_id, err)
                return None
            except Exception as err:  # the PS being away must not refuse honest telemetry
                self._version_ask_failed_at = time.monotonic()
                log.debug("PS version of %s unavailable: %s", job_id, err)
                return None
            version = getattr(stats, "version", None)  # None: the PS does not know the job yet
            if version is None:
                return None
            version = int(version)
            self._ps_versions[job_id] = (version, asked_at)
            self.version_asks += 1
        return None if claimed <= version else version

    def worker_stats(self, job_id: str, worker_id: str) -> Any | None:
        return self._worker_stats.get(job_id, {}).get(worker_id)

    def job_counters(self, job_id: str) -> dict[str, int] | None:
        """The job's PS counters as last polled; None before the PS has answered."""
        return self._job_counters.get(job_id)

    def acknowledged(self) -> dict[str, list[str]]:
        # No lock: a sync may be waiting on a slow PS, and /status must not wait with it.
        return {j: list(m) for j, m in list(self._acked.items())}
