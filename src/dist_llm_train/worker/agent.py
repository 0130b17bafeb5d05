"""The worker agent: register, heartbeat, take assignments, train, report.

asyncio owns everything that talks to the controller (registration, heartbeats, the
assignment poll, telemetry); the training loop runs in one thread and exchanges data
with it through thread-safe hand-offs. SIGTERM sets a stop event both sides watch, so
the worker exits cleanly and gives its tasks back instead of vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from dist_llm_train.config import ConfigError, parse_config
from dist_llm_train.controller.models import AssignedJobOut, RegisterIn, TaskOut, TelemetryIn, WorkerActivity
from dist_llm_train.paramserver.transport.security import PSCredentials
from dist_llm_train.worker.controller_api import ControllerAPI, ControllerGone, Unauthorized, UnknownWorker
from dist_llm_train.worker.links import ReportedLinks, WorkerLinks
from dist_llm_train.worker.metrics import WorkerMetrics
from dist_llm_train.worker.training_loop import TrainingContext, TrainingOutcome, run_training

log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    controller_url: str
    name: str
    memory_gb: float = 16.0
    flops: float = 100.0
    bandwidth_mbps: float = 1000.0
    compute_slowdown: float = 1.0
    auth_token: str | None = None  # the join credential (or an operator token): registration is sent with it
    poll_interval_s: float = 0.5
    exit_when_idle_after_job: bool = False
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    # netem: per-class controller URLs and the PS relay from the shaper; None = direct.
    controller_heartbeat_url: str | None = None
    controller_telemetry_url: str | None = None
    ps_address_override: str | None = None
    links_file: str | None = None  # the shaper's ports document: enables link probes and `links` telemetry
    link_probe_interval_s: float = 5.0
    link_report_file: str | None = None  # kernel shaping: the link exporter's records, sent as `links` telemetry


def next_due(due: float, interval_s: float, now: float) -> float:
    """When the next heartbeat is due: one interval after the last one was due, or now if that has passed."""
    return max(due + interval_s, now)


class WorkerAgent:
    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.stop = threading.Event()
        self.api = ControllerAPI(opts.controller_url, token=opts.auth_token, stop=self.stop,
                                 heartbeat_url=opts.controller_heartbeat_url,
                                 telemetry_url=opts.controller_telemetry_url)
        self.worker_id: str | None = None
        self.heartbeat_interval_s = 1.0
        self.state: WorkerActivity = "idle"
        self._shards: dict[str, set[int]] = {}
        self._attempts: dict[str, int] = {}  # task id -> the attempt it was assigned as: failure reports name it
        self._shard_lock = threading.Lock()
        self._telemetry: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.finished_jobs: list[str] = []
        self.metrics = WorkerMetrics()
        self.links = (WorkerLinks.from_file(opts.links_file, opts.name, self.api, self.metrics.registry,
                                            opts.link_probe_interval_s) if opts.links_file else None)
        # What annotates telemetry with `links`: the relays' monitor, else the exporter's report file, else nothing.
        self.link_reports: WorkerLinks | ReportedLinks | None = self.links or (
            ReportedLinks(opts.link_report_file) if opts.link_report_file else None)

    async def _register(self) -> None:
        reply = await self.api.register(
            RegisterIn(
                name=self.opts.name,
                memory_gb=self.opts.memory_gb,
                flops=self.opts.flops,
                bandwidth_mbps=self.opts.bandwidth_mbps,
                compute_slowdown=self.opts.compute_slowdown,
            )
        )
        self.worker_id = reply.worker_id
        if reply.token:  # the controller issued this worker its own credential: every later call carries it
            self.api.use_token(reply.token)
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        log.info("registered as %s (%s)", self.opts.name, self.worker_id)

    async def _heartbeat_loop(self) -> None:
        """Heartbeats at a fixed rate: each is due one interval after the previous one was *due*, not after its
        reply came back, so a slow controller does not stretch the period towards the death timeout (sleeping
        a full interval after each reply measured a 2.2 s period at 1 s under load). A beat that comes due while
        the previous is still in flight goes as soon as that one returns; missed beats are not sent in a burst.
        The controller may change the interval in any reply (a larger fleet is told a longer one)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self.stop.is_set():
            try:
                assert self.worker_id is not None
                reply = await self.api.heartbeat(self.worker_id, self.state)
                if reply.heartbeat_interval_s is not None and reply.heartbeat_interval_s != self.heartbeat_interval_s:
                    log.info("controller set the heartbeat interval to %gs", reply.heartbeat_interval_s)
                    self.heartbeat_interval_s = reply.heartbeat_interval_s
            except (UnknownWorker, Unauthorized) as err:
                # Forgotten (state reset) or credential refused (expired, secret rotated): join again.
                log.warning("controller refused this worker (%s); re-registering", err)
                await self._register()
            except Exception as err:  # keep beating through transient controller errors
                log.warning("heartbeat failed: %s", err)
            due = next_due(due, self.heartbeat_interval_s, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _telemetry_loop(self) -> None:
        while True:
            record = await self._telemetry.get()
            if self.link_reports is not None:
                record = self.link_reports.annotate(record)
            try:
                assert self.worker_id is not None
                await self.api.telemetry(self.worker_id, TelemetryIn.model_validate(record, strict=False))
            except Exception as err:
                log.warning("telemetry dropped: %s", err)

    def _emit_from_thread(self, loop: asyncio.AbstractEventLoop, record: dict[str, Any]) -> None:
        self.metrics.observe(record)
        loop.call_soon_threadsafe(self._telemetry.put_nowait, record)

    def _current_shards(self, job_id: str) -> set[int]:
        with self._shard_lock:
            return set(self._shards.get(job_id, set()))

    async def _refresh_shards(self, job_id: str) -> list[str]:
        """Poll assignments; return this job's task ids (the set can grow when tasks are reassigned)."""
        assert self.worker_id is not None
        current = await self.api.assignments(self.worker_id)
        tasks = [t for t in current.tasks if t.job_id == job_id]
        self._attempts.update({t.task_id: t.attempt for t in tasks})
        with self._shard_lock:
            self._shards[job_id] = {t.shard_id for t in tasks}
        return [t.task_id for t in tasks]

    async def _train_job(self, job_id: str, job: AssignedJobOut, tasks: list[TaskOut]) -> None:
        assert self.worker_id is not None
        try:
            cfg = parse_config({"model": job.model, "training": job.training, "network": job.network})
        except ConfigError as err:
            for t in tasks:
                reason = f"bad job config: {err}"
                await self.api.fail_task(t.task_id, worker_id=self.worker_id, reason=reason, attempt=t.attempt)
            return
        ps = job.paramserver
        self._attempts.update({t.task_id: t.attempt for t in tasks})
        with self._shard_lock:
            self._shards[job_id] = {t.shard_id for t in tasks}
        ctx = TrainingContext(
            job_id=job_id,
            worker_id=self.worker_id,
            config=cfg,
            ps_transport=ps.transport,
            ps_address=self.opts.ps_address_override or ps.address,
            shard_ids=self._current_shards(job_id),
            num_shards=tasks[0].num_shards,
            compute_slowdown=self.opts.compute_slowdown,
            members=job.members,
            worker_name=self.opts.name,
            ps_credentials=PSCredentials.from_env(ps.token, ps.curve_server_key),
        )
        if self.links is not None:
            self.links.use_paramserver(ctx.ps_transport, ctx.ps_address, ctx.ps_credentials, job_id)
        loop = asyncio.get_running_loop()
        self.state = "training"
        log.info("training job %s on shards %s of %d", job_id, sorted(ctx.shard_ids), ctx.num_shards)
        fut = loop.run_in_executor(
            None,
            run_training,
            ctx,
            self.stop,
            lambda: self._current_shards(job_id),
            lambda rec: self._emit_from_thread(loop, rec),
        )
        task_ids = [t.task_id for t in tasks]
        while not fut.done():
            await asyncio.sleep(self.opts.poll_interval_s)
            with contextlib.suppress(Exception):
                task_ids = await self._refresh_shards(job_id) or task_ids
        self.state = "idle"
        try:
            outcome: TrainingOutcome = fut.result()
        except Exception as err:
            if not self.stop.is_set():
                log.exception("training failed")
            reason = "worker shutting down" if self.stop.is_set() else f"{type(err).__name__}: {err}"
            for tid in task_ids:
                await self._report(self._fail(tid, reason))
            return
        await self._drain_telemetry()
        if outcome.job_complete:
            for tid in await self._refresh_shards(job_id) or task_ids:
                await self.api.complete_task(tid, worker_id=self.worker_id)
            self.finished_jobs.append(job_id)
            log.info("job %s complete after %d steps (paramserver outages seen %d, updates pulled again after a "
                     "restart %d, resent %d)", job_id, outcome.steps, outcome.restarts.outages,
                     outcome.restarts.rebases, outcome.restarts.resends)
        elif outcome.stopped:
            for tid in task_ids:
                await self._report(self._fail(tid, "worker shutting down"))

    def _fail(self, task_id: str, reason: str) -> Any:
        """The failure report of a held task, naming its attempt so that a retried report is counted once."""
        assert self.worker_id is not None
        return self.api.fail_task(task_id, worker_id=self.worker_id, reason=reason, attempt=self._attempts.get(task_id))

    async def _report(self, call: Any) -> None:
        """Report to the controller; while shutting down, give it two seconds, not the full retry budget."""
        try:
            if self.stop.is_set():
                await asyncio.wait_for(call, timeout=2.0)
            else:
                await call
        except Exception as err:
            log.warning("could not report to controller: %s", err)

    async def _drain_telemetry(self) -> None:
        for _ in range(200):
            if self._telemetry.empty():
                return
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        if self.opts.metrics_port is not None:
            self.metrics.serve(self.opts.metrics_port, self.opts.metrics_host)
        await self._register()
        background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._telemetry_loop()),
        ]
        if self.links is not None:
            background.append(asyncio.create_task(self.links.run(self.stop)))
        try:
            while not self.stop.is_set():
                assert self.worker_id is not None
                try:
                    current = await self.api.assignments(self.worker_id)
                except (UnknownWorker, Unauthorized):
                    await self._register()
                    continue
                except ControllerGone:
                    if self.stop.is_set():
                        break
                    raise
                for late in (t for t in current.tasks if t.job_id in self.finished_jobs):
                    # A dead worker's shard of a job this worker already saw complete: nothing left to train.
                    await self._report(self.api.complete_task(late.task_id, worker_id=self.worker_id))
                pending = [t for t in current.tasks if t.job_id not in self.finished_jobs]
                if pending:
                    job_id = pending[0].job_id
                    await self._train_job(job_id, current.jobs[job_id], [t for t in pending if t.job_id == job_id])
                    if self.opts.exit_when_idle_after_job:
                        break
                else:
                    await asyncio.sleep(self.opts.poll_interval_s)
        finally:
            self.stop.set()
            await self._drain_telemetry()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self.links is not None:
                self.links.close_paramserver()
            await self.api.aclose()
            log.info("worker %s stopped", self.opts.name)


def serve_worker(opts: WorkerOptions) -> None:
    asyncio.run(WorkerAgent(opts).run())
