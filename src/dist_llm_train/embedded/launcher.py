"""`dist-llm-train run`: controller, parameter server and workers as local processes.

Each service is started through the same `dist-llm-train serve ...` entry point the
containers use, on free loopback ports. The launcher submits one job, follows it through
the controller and the PS, evaluates the initial and final parameters on held-out data,
writes the run folder and stops every child, whatever happens.

With an availability trace (`availability:` in the config, `run --availability FILE`), workers come and go
during the job: only those present at time 0 start before it, and `embedded.availability.AvailabilityDriver`
kills (SIGKILL, a preemption) and restarts them at the trace's times after submission.

The PS and the controller are supervised (`embedded.supervision`): when one dies it is started again (the PS
from its newest checkpoint, the controller from its SQLite file), at most `RestartPolicy.max_restarts` times
each, and the summary's `restarts` block says what each restart cost.

With `ps_shards` = P > 1 (`run --ps-shards P`) the PS is P processes, each holding one slice of the parameters
(`core.sharding`) with its own checkpoint folder, each supervised on its own; the controller and the workers get
the comma-separated address of all P (`paramserver.transport.sharded`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dist_llm_train.config import AvailabilityConfig, Config
from dist_llm_train.controller.client import ControllerClient, ControllerUnavailable
from dist_llm_train.controller.errors import ControllerError
from dist_llm_train.controller.models import JobIn
from dist_llm_train.core.sharding import MAX_SHARDS, check_shardable
from dist_llm_train.core.types import PSError
from dist_llm_train.embedded.availability import AvailabilityDriver, availability_report
from dist_llm_train.embedded.credentials import RunCredentials
from dist_llm_train.embedded.processes import Child, ProcessGroup, cli_command, free_port
from dist_llm_train.embedded.report import RunSummary, strategy_summary, total_bytes, write_report
from dist_llm_train.embedded.supervision import RestartEvent, RestartPolicy, Supervisor
from dist_llm_train.paramserver.checkpoint import CheckpointError, checkpoint_path, read_checkpoint
from dist_llm_train.paramserver.transport.client import connect

log = logging.getLogger(__name__)

TERMINAL_JOB_STATES = {"completed", "cancelled", "failed"}


@dataclass
class RunOptions:
    config: Config
    workers: int
    runs_dir: Path = Path("runs")
    timeout_s: float = 1800.0
    heartbeat_interval_s: float = 1.0
    worker_slowdowns: dict[int, float] = field(default_factory=dict)
    # netem: shape every link with this profile (None = unshaped loopback); see netem/userspace/embedded.py.
    profile: str | None = None
    shaping: str = "userspace"
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    ps_shards: int = 1  # parameter-server processes, each holding one slice of the parameters


def unreachable(err: Exception) -> bool:
    """An error that means "the service is not answering now" (dead, restarting), not a refusal."""
    if isinstance(err, PSError):
        return err.unreachable
    return isinstance(err, ControllerUnavailable)


@dataclass
class Snapshot:
    """What the progress display shows; filled from the PS and the controller every poll."""

    version: int = 0
    total_steps: int = 0
    loss: float | None = None
    loss_floor: float | None = None
    tokens_per_s: float = 0.0
    bytes_sent: int = 0
    job_state: str = "pending"
    workers_alive: int = 0
    workers_dead: int = 0


def check_ps_shards(cfg: Config, shards: int) -> None:
    """ValueError, before any process starts, for a shard count this run cannot use."""
    if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"--ps-shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
    if shards == 1:
        return
    check_shardable(cfg.training.job_spec("check"), shards)


class EmbeddedRun:
    def __init__(self, opts: RunOptions) -> None:
        check_ps_shards(opts.config, opts.ps_shards)
        self.opts = opts
        self.cfg = opts.config
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        self.run_dir = opts.runs_dir / self.run_id
        self.procs = ProcessGroup(self.run_dir / "logs", env={"PYTHONUNBUFFERED": "1"})
        self.credentials = RunCredentials()  # secure by default: a fresh cluster secret for this run only
        self.transport = self.cfg.paramserver.transport
        self.ps_address = ""  # "host:port", or one per shard joined by commas
        self.controller_url = ""
        self.job_id = ""
        self.workers: list[Any] = []
        self.shaping: Any = None  # netem.embedded.EmbeddedShaping when --profile is given
        # One source of truth for what this run's links were: a profile named in the config is applied like
        # --profile, and --profile is written back into the config the run folder keeps.
        if opts.profile is None and self.cfg.network.profile:
            opts.profile = self.cfg.network.profile
            opts.shaping = self.cfg.network.shaping if self.cfg.network.shaping not in ("none", "auto") else "userspace"
        if opts.profile is not None:
            self.cfg.network.profile = opts.profile
            self.cfg.network.shaping = opts.shaping  # type: ignore[assignment]
        # Churn of transient workers: resolved now, so a bad trace fails before any process starts.
        availability = self.cfg.availability
        self.trace = availability.resolve(opts.workers) if availability is not None else None
        self.churn: AvailabilityDriver | None = None
        self.supervisor = Supervisor(self.procs, opts.restart_policy, on_death=self._note_death)
        self._version_seen = 0  # the newest PS version the launcher saw (for what a PS restart lost)
        self._deaths_wall: dict[tuple[str, int], float] = {}  # (service, restart) -> time.time() of the death
        if self.trace is not None and availability is not None and availability.trace is not None:
            # The run folder's config.yaml carries the sessions themselves, not a path that may not resolve
            # where the folder is read later (`simulate --from-run`).
            self.cfg.availability = AvailabilityConfig(sessions=list(self.trace.sessions))

    # -- start-up -----------------------------------------------------------------
    def _shard_name(self, shard: int) -> str:
        """Shard 0 is "paramserver" (what a one-PS run has always called it), shard i "paramserver-i"."""
        return "paramserver" if shard == 0 else f"paramserver-{shard}"

    def _checkpoint_dir(self, service: str) -> Path:
        shard = service.removeprefix("paramserver").lstrip("-")
        return self.run_dir / ("checkpoints" if not shard else f"checkpoints-{shard}")

    def _start_paramserver(self) -> None:
        addresses = []
        for shard in range(self.opts.ps_shards):
            port, metrics_port = free_port(), free_port()
            address = f"127.0.0.1:{port}"
            name = self._shard_name(shard)
            child = self.procs.start(
                name,
                cli_command(
                    "serve", "paramserver",
                    "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
                    "--transport", self.transport,
                    "--checkpoint-dir", str(self._checkpoint_dir(name)),
                    "--checkpoint-every", str(self.cfg.paramserver.checkpoint_every),
                ),
                env=self.credentials.service_env(),
            )
            self._wait_paramserver(child, address)
            self.supervisor.watch(child, partial(self._revive_paramserver, address=address))
            addresses.append(address)
        self.ps_address = ",".join(addresses)

    def _wait_paramserver(self, child: Child, address: str, timeout_s: float = 60.0) -> None:
        client = self._ps_client(timeout_s=2.0, address=address)
        try:
            self.procs.wait_ready(child, lambda: client.stats() is not None, timeout_s)
        finally:
            client.close()

    def _revive_paramserver(self, child: Child, address: str) -> None:
        self.procs.restart(child)  # same port and checkpoint folder: it resumes from its newest checkpoint
        self._wait_paramserver(child, address, self.opts.restart_policy.ready_timeout_s)

    def _note_death(self, event: RestartEvent) -> None:
        """Before a restart: when it died and, for the PS, the newest version seen and the checkpoint it will
        resume from (read now: nothing writes checkpoints while the PS is down)."""
        self._deaths_wall[(event.service, event.restart)] = time.time()
        if not event.service.startswith("paramserver") or not self.job_id:
            return
        event.version_seen_before = self._version_seen
        try:
            folder = self._checkpoint_dir(event.service)
            event.version_resumed = read_checkpoint(checkpoint_path(folder, self.job_id)).version
        except CheckpointError:  # no checkpoint yet (it dies before the job's first one): resumes without it
            event.version_resumed = None

    def _start_controller(self) -> None:
        port = free_port()
        self.controller_url = f"http://127.0.0.1:{port}"
        child = self.procs.start(
            "controller",
            cli_command(
                "serve", "controller",
                "--host", "127.0.0.1", "--port", str(port),
                "--ps-address", self.ps_address, "--ps-transport", self.transport,
                "--state-db", str(self.run_dir / "controller.db"),
                "--scheduler", self.cfg.controller.scheduler,
                "--heartbeat-interval", str(self.opts.heartbeat_interval_s),
                "--miss-limit", str(self.cfg.controller.heartbeat_miss_limit),
            ),
            env=self.credentials.service_env(),
        )
        self._wait_controller(child)
        self.supervisor.watch(child, self._revive_controller)

    def _wait_controller(self, child: Child, timeout_s: float = 60.0) -> None:
        with self._controller(timeout_s=1) as probe:
            self.procs.wait_ready(child, lambda: probe.readyz().ready, timeout_s)

    def _revive_controller(self, child: Child) -> None:
        self.procs.restart(child)  # same port and SQLite file: jobs, tasks and workers as they were
        self._wait_controller(child, self.opts.restart_policy.ready_timeout_s)

    def _controller(self, timeout_s: float = 10.0) -> ControllerClient:
        """The launcher's client of the controller, with the run's admin credential."""
        return ControllerClient(self.controller_url, token=self.credentials.admin_token, timeout_s=timeout_s)

    def _ps_client(self, timeout_s: float = 30.0, address: str | None = None) -> Any:
        """A client of the PS (of every shard, joined), or of the one server at `address`."""
        return connect(self.transport, address or self.ps_address, timeout_s=timeout_s,
                       credentials=self.credentials.ps_credentials(self.transport))

    # --- netem: the shaper child sits between the workers and the controller/PS -------------------
    def _start_shaper(self) -> None:
        if self.opts.profile is None:
            return
        from dist_llm_train.netem.userspace.embedded import EmbeddedShaping

        names = [f"worker-{i}" for i in range(self.opts.workers)]
        self.shaping = EmbeddedShaping.prepare(self.opts.profile, self.opts.shaping, names, self.controller_url,
                                               self.ps_address, self.run_dir / "shaper")
        child = self.procs.start("shaper", cli_command(*self.shaping.shaper_argv()))
        self.procs.wait_ready(child, self.shaping.ready)

    def _start_workers(self) -> None:
        for i in range(self.opts.workers):
            if self.trace is None or self.trace.present_at_start(i):  # the others join at their first session
                self._start_worker(i)

    def _start_worker(self, i: int) -> Child:
        """Start worker i (again, after an availability leave: same name, same command, same log file)."""
        name = f"worker-{i}"
        child = self.procs.start(name, self._worker_command(i), env=self.credentials.worker_env(name))
        self.workers = [w for w in self.workers if w.name != name] + [child]
        return child

    def _kill_worker(self, i: int) -> None:
        """An availability leave: SIGKILL the worker's process group, as a preemption would."""
        child = next((w for w in self.workers if w.name == f"worker-{i}"), None)
        if child is None or not child.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        assert child.proc is not None
        child.proc.wait(timeout=10)

    def _worker_training(self, i: int) -> bool | None:
        """Whether worker i holds a task of the job as the controller sees it (None: could not ask)."""
        try:
            with self._controller(timeout_s=2) as controller:
                workers = controller.status().workers
        except Exception:
            return None
        return any(w.name == f"worker-{i}" and w.state == "alive" and bool(w.tasks) for w in workers)

    def _worker_command(self, i: int) -> list[str]:
        argv = ["serve", "worker", "--name", f"worker-{i}"]
        slowdown = self.opts.worker_slowdowns.get(i)
        if self.shaping is not None:  # every class through its relay
            argv += self.shaping.worker_argv(f"worker-{i}")
            slowdown = slowdown or self.shaping.compute_slowdown(f"worker-{i}")
        else:
            argv += ["--controller", self.controller_url]
        if slowdown:
            argv += ["--compute-slowdown", str(slowdown)]
        cmd = cli_command(*argv)
        if self.shaping is not None:
            # Compute yields to the emulated network: the shaper, controller and PS must not see their
            # timers starved by training, or the links would be slower than the profile says.
            cmd = ["nice", "-n", "10", *cmd]
        return cmd

    def _wait_for_workers(self, timeout_s: float = 180.0) -> None:
        """Submit only once every worker registered, so the first one up does not take every shard.

        With an availability trace: every worker present at time 0 (the others are not there yet)."""
        deadline = time.monotonic() + timeout_s
        expected = len(self.workers)
        with self._controller(timeout_s=5) as controller:
            while time.monotonic() < deadline:
                if sum(1 for w in controller.status().workers if w.state == "alive") >= expected:
                    return
                exited = [w.name for w in self.workers if not w.alive()]
                if exited:
                    child = next(w for w in self.workers if w.name == exited[0])
                    raise RuntimeError(f"{child.name} exited during start-up:\n{child.tail()}")
                time.sleep(0.2)
        raise TimeoutError(f"only some of {expected} workers registered within {timeout_s:.0f}s")

    def _submit_job(self) -> None:
        job = JobIn(
            name=f"run-{self.run_id}",
            config={
                "model": self.cfg.model.model_dump(mode="json"),
                "training": self.cfg.training.model_dump(mode="json", exclude_none=True),
                "network": self.cfg.network.model_dump(mode="json", exclude_none=True),
            },
            num_tasks=self.opts.workers,
        )
        try:
            with self._controller() as controller:
                self.job_id = controller.submit_job(job).job_id
        except ControllerError as err:  # RuntimeError: what `run` reports as a failed run
            raise RuntimeError(f"job submission refused: {err.status_code} {err.message}") from err

    # -- following the job ----------------------------------------------------------
    def snapshot(self, controller: ControllerClient, ps: Any, snap: Snapshot) -> Snapshot:
        stats = ps.stats(self.job_id)
        if stats:
            snap.version = stats[0].version
            self._version_seen = max(self._version_seen, snap.version)
            snap.loss = stats[0].last_loss if stats[0].version > 0 else snap.loss
        snap.job_state = controller.get_job(self.job_id).state
        status = controller.status()
        snap.workers_alive = sum(1 for w in status.workers if w.state == "alive")
        snap.workers_dead = sum(1 for w in status.workers if w.state == "dead")
        for j in status.jobs:
            if j.job_id == self.job_id:
                snap.tokens_per_s = j.tokens_per_s
                snap.bytes_sent = int(j.bytes_sent or snap.bytes_sent)
        return snap

    def _evaluate(self, params: Any | None) -> tuple[float, float | None]:
        from dist_llm_train.training.data import make_dataset
        from dist_llm_train.training.flat import flatten_params
        from dist_llm_train.training.trainer import LocalTrainer

        dataset = make_dataset(self.cfg.training)
        trainer = LocalTrainer(self.cfg.model, self.cfg.training, dataset, [0], num_shards=1)
        vec = flatten_params(trainer.model) if params is None else params
        return trainer.evaluate(vec, self.cfg.training.eval_batches), dataset.loss_floor

    def _supervised(self, fn: Callable[[], Any], what: str) -> Any:
        """fn(), waiting while the service it asks is down or being restarted (within the restart policy)."""
        policy = self.opts.restart_policy
        deadline = time.monotonic() + policy.ready_timeout_s + policy.max_backoff_s + 10
        while True:
            self._check_supervisor()
            try:
                return fn()
            except (PSError, ControllerUnavailable) as err:
                if not unreachable(err) or time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: {err}") from err
                log.info("%s: %s unreachable (%s); waiting", what, ", ".join(self.supervisor.down()) or "a service",
                         err)
                time.sleep(0.2)

    def _check_supervisor(self) -> None:
        if self.supervisor.failure is not None:
            raise RuntimeError(self.supervisor.failure)

    def _restart_report(self, rows: list[dict[str, Any]], stats: Any, job: Any) -> dict[str, Any]:
        """The summary's `restarts` block: the supervisor's events, with the version each PS death is known to
        have reached (the launcher's view and the workers' telemetry before it) and what it lost."""
        for event in self.supervisor.events:
            died = self._deaths_wall.get((event.service, event.restart))
            if not event.service.startswith("paramserver") or died is None or event.version_seen_before is None:
                continue
            held = [int(r["ps_version"]) for r in rows
                    if r.get("ps_version") is not None and float(r.get("wall_time") or 0.0) < died]
            event.version_seen_before = max([event.version_seen_before, *held])
            if event.version_resumed is not None:
                event.versions_lost = max(0, event.version_seen_before - event.version_resumed)
        report = self.supervisor.report(self.cfg.paramserver.checkpoint_every)
        counters = stats.counters if stats is not None else {}
        report["updates_refused_after_restart"] = int(counters.get("rejected_aborted", 0))
        report["task_attempts_failed"] = sum(t.attempts for t in job.tasks) if job is not None else None
        return report

    def execute(self, on_progress: Callable[[Snapshot], None] | None = None) -> RunSummary:
        started = time.monotonic()
        try:
            self._start_paramserver()
            self._start_controller()
            self.supervisor.start()
            self._start_shaper()
            self._start_workers()
            self._wait_for_workers()
            if self.trace is not None:
                # Import the torch side now, not during the job: an import holds the GIL for long stretches and
                # would make the churn thread apply the first events late.
                import dist_llm_train.training.trainer  # noqa: F401
            self._submit_job()
            submitted = time.monotonic()
            if self.trace is not None:
                self.churn = AvailabilityDriver(self.trace, self._start_worker, self._kill_worker,
                                                self._worker_training)
                self.churn.start(submitted)
            initial_loss, floor = self._evaluate(None)
            snap = Snapshot(total_steps=self.cfg.training.versions, loss_floor=floor)  # diloco: rounds
            ps = self._ps_client()
            with self._controller() as controller:
                deadline = started + self.opts.timeout_s
                while snap.job_state not in TERMINAL_JOB_STATES:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"run did not finish within {self.opts.timeout_s:.0f}s")
                    coming = self.churn is not None and self.churn.joins_pending()
                    if not any(w.alive() for w in self.workers) and not coming:
                        raise RuntimeError("every worker exited before the job finished; see logs in "
                                           f"{self.procs.log_dir}")
                    snap = self._supervised(partial(self.snapshot, controller, ps, snap), "following the job")
                    if on_progress:
                        on_progress(snap)
                    time.sleep(0.5)
                ended = time.monotonic()
                if self.churn is not None:
                    self.churn.stop()  # before reading the PS: no kill or start while the run is summed up
                final = self._supervised(lambda: ps.pull(self.job_id, "launcher"), "reading the final parameters")
                # wire bytes per class, per-worker bounds
                ps_stats = self._supervised(lambda: ps.stats(self.job_id), "reading the PS's figures")
                rows = [row.model_dump() for row in self._supervised(
                    lambda: controller.job_telemetry(self.job_id), "reading telemetry").rows]
                status = self._supervised(controller.status, "reading /status")
                job = self._supervised(lambda: controller.get_job(self.job_id), "reading the job")
            self.supervisor.stop()  # the job is over: a death from now on is the shutdown's business
            ps.close()
            final_loss, _ = self._evaluate(final.params)
            for r in rows:
                r.setdefault("worker", r.get("worker_name") or r.get("worker_id"))
            sent, received = total_bytes(rows)
            summary = RunSummary(
                run_id=self.run_id,
                run_dir=str(self.run_dir),
                initial_loss=initial_loss,
                final_loss=final_loss,
                loss_floor=floor,
                steps=final.version,
                workers=self.opts.workers,
                bytes_sent=sent,
                bytes_received=received,
                wall_seconds=time.monotonic() - started,
                mode=self.cfg.training.strategy.name,
                transport=self.transport,
                model=self.cfg.model.name,
                job_state=snap.job_state,
                dead_workers=[w.name for w in status.workers if w.state == "dead"],
                reassignments=status.counters.reassignments,
                links=[link.model_dump() for link in status.links],
                links_out_of_tolerance=list(status.links_out_of_tolerance),
                profile=self.opts.profile,
                shaping=self.opts.shaping if self.opts.profile else "none",
                strategy=strategy_summary(self.cfg.training, ps_stats[0] if ps_stats else None, rows),
                restarts=self._restart_report(rows, ps_stats[0] if ps_stats else None, job),
                ps_shards=self.opts.ps_shards,
            )
            if self.trace is not None and self.churn is not None:
                summary.availability = availability_report(
                    self.trace, self.churn.applied, ended - submitted, ps_stats[0] if ps_stats else None, rows
                )
            write_report(self.run_dir, self.cfg, rows, summary)
            if self.trace is not None:  # the trace as applied, whatever produced it (a file, a generator)
                (self.run_dir / "availability.csv").write_text(self.trace.to_csv())
            return summary
        finally:
            if self.churn is not None:
                self.churn.stop()
            self.supervisor.stop()
            self.procs.stop_all()
