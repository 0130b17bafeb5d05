"""The controller's state in SQLite: workers, jobs, tasks, telemetry and counters.

One connection guarded by a re-entrant lock (FastAPI runs sync endpoints on a thread
pool; SQLite serialises writers anyway, so one connection is both simplest and fastest).
Multi-statement changes run inside `tx()`, so a request either changes everything it
means to or nothing. File databases use WAL so readers never wait on the writer, and the
schema is versioned with `PRAGMA user_version`: each entry of `MIGRATIONS` moves the
file one version forward, and a file written by a newer controller is refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dist_llm_train.controller.records import TELEMETRY_FIELDS, Job, Task, Worker, labels_of, readable
from dist_llm_train.controller.schema import MIGRATIONS, SCHEMA_VERSION

_UPSERT_WORKER = """INSERT INTO workers (worker_id, name, memory_gb, flops, bandwidth_mbps, compute_slowdown,
                                    labels, state, activity, registered_at, last_heartbeat)
               VALUES (?, ?, ?, ?, ?, ?, ?, 'alive', 'idle', ?, ?)
               ON CONFLICT(worker_id) DO UPDATE SET memory_gb = excluded.memory_gb, flops = excluded.flops,
                   bandwidth_mbps = excluded.bandwidth_mbps, compute_slowdown = excluded.compute_slowdown,
                   labels = excluded.labels, state = 'alive', last_heartbeat = excluded.last_heartbeat"""


UPDATE_TASK = """UPDATE tasks SET state = ?, worker_id = ?, updated_at = ?, attempts = COALESCE(?, attempts),
                   last_error = COALESCE(?, last_error) WHERE task_id = ?"""
"""`Store.update_task`'s statement; parameters (state, worker_id, now, attempts, last_error, task_id)."""


def _upsert_params(worker_id: str, name: str, caps: dict[str, Any], now: float) -> tuple[Any, ...]:
    return (
        worker_id,
        name,
        caps["memory_gb"],
        caps["flops"],
        caps["bandwidth_mbps"],
        caps["compute_slowdown"],
        json.dumps(caps["labels"], sort_keys=True),
        now,
        now,
    )


class StoreError(RuntimeError):
    """The database cannot be used (closed, or written by a newer schema)."""


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        if path != ":memory:" and not path.startswith("file::memory:"):
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            self._migrate()
        except Exception:
            self.close()
            raise

    # -- plumbing ---------------------------------------------------------------------
    def _migrate(self) -> None:
        conn = self._c()
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this controller's {SCHEMA_VERSION}"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.executescript(f"BEGIN;\n{MIGRATIONS[target - 1]}\nPRAGMA user_version = {target};\nCOMMIT;")

    def schema_version(self) -> int:
        with self._lock:
            return int(self._c().execute("PRAGMA user_version").fetchone()[0])

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("store is closed")
        return self._conn

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def ping(self) -> bool:
        """True when the database answers a query (what /readyz reports)."""
        try:
            with self._lock:
                self._c().execute("SELECT 1").fetchone()
            return True
        except (StoreError, sqlite3.Error):
            return False

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work; nested calls join the outer transaction."""
        with self._lock:
            conn = self._c()
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._c().execute(sql, args).fetchall()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._c().execute(sql, args).fetchone()
            return row

    def _run(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._c().execute(sql, args).rowcount

    # -- workers ------------------------------------------------------------------------
    def get_worker(self, worker_id: str) -> Worker | None:
        r = self._one("SELECT * FROM workers WHERE worker_id = ?", (worker_id,))
        return Worker.from_row(r) if r else None

    def get_worker_by_name(self, name: str) -> Worker | None:
        r = self._one("SELECT * FROM workers WHERE name = ?", (name,))
        return Worker.from_row(r) if r else None

    def list_workers(self, state: str | None = None) -> list[Worker]:
        if state is None:
            rows = self._all("SELECT * FROM workers ORDER BY name")
        else:
            rows = self._all("SELECT * FROM workers WHERE state = ? ORDER BY name", (state,))
        return [Worker.from_row(r) for r in rows]

    def workers_page(self, offset: int, limit: int | None) -> list[Worker]:
        """Workers sorted by name (like `list_workers`), `limit` of them from `offset` (None: all the rest)."""
        rows = self._all(
            "SELECT * FROM workers ORDER BY name LIMIT ? OFFSET ?", (-1 if limit is None else limit, offset)
        )
        return [Worker.from_row(r) for r in rows]

    def worker_status_rows(self, offset: int, limit: int | None) -> list[tuple[Any, ...]]:
        """What `/status` shows of each worker, sorted by name, as plain tuples (no `Worker` per row: a full
        fleet is read at every full `/status`): (worker_id, name, state, activity, last_heartbeat,
        throughput_ewma, memory_gb, flops, bandwidth_mbps, compute_slowdown, labels), text made `readable`."""
        with self._lock:
            cur = self._c().execute(
                "SELECT worker_id, name, state, activity, last_heartbeat, throughput_ewma, memory_gb, flops, "
                "bandwidth_mbps, compute_slowdown, labels FROM workers ORDER BY name LIMIT ? OFFSET ?",
                (-1 if limit is None else limit, offset),
            )
            cur.row_factory = None  # tuples: a Row per worker costs more than the rest of the row's work
            rows = cur.fetchall()
        return [(readable(r[0]), readable(r[1]), *r[2:10], labels_of(r[10])) for r in rows]

    def fleet_summary(self) -> tuple[dict[str, int], dict[str, int], float | None]:
        """(workers per state, alive workers per activity, the oldest alive worker's last heartbeat)."""
        by_state = self.count_by_state("workers")
        rows = self._all("SELECT activity, COUNT(*) AS n, MIN(last_heartbeat) AS oldest FROM workers "
                         "WHERE state = 'alive' GROUP BY activity")
        oldest = min((r["oldest"] for r in rows), default=None)
        return by_state, {r["activity"]: r["n"] for r in rows}, oldest

    def upsert_worker(self, worker_id: str, name: str, caps: dict[str, Any], now: float) -> None:
        """Insert a new worker, or refresh a known one's capabilities and mark it alive."""
        self._run(_UPSERT_WORKER, _upsert_params(worker_id, name, caps, now))

    def upsert_workers(self, rows: Sequence[tuple[str, str, dict[str, Any], float]]) -> None:
        """`upsert_worker` for each (worker_id, name, caps, now) in order, as one statement."""
        with self._lock:
            self._c().executemany(_UPSERT_WORKER, [_upsert_params(*row) for row in rows])

    def touch_worker(self, worker_id: str, now: float, activity: str | None) -> None:
        self._run(
            "UPDATE workers SET last_heartbeat = ?, state = 'alive', activity = COALESCE(?, activity) "
            "WHERE worker_id = ?",
            (now, activity, worker_id),
        )

    def record_heartbeats(self, rows: Sequence[tuple[str, float, str | None]]) -> None:
        """Heartbeats received in memory, (worker_id, at, activity) each, written at once; never moves a
        worker's time back, nor brings a dead worker back (only a heartbeat through `touch_worker` does)."""
        with self._lock:
            self._c().executemany(
                "UPDATE workers SET last_heartbeat = MAX(last_heartbeat, ?), activity = COALESCE(?, activity) "
                "WHERE worker_id = ? AND state = 'alive'",
                [(at, activity, worker_id) for worker_id, at, activity in rows],
            )

    def stale_workers(self, cutoff: float) -> list[Worker]:
        rows = self._all("SELECT * FROM workers WHERE state = 'alive' AND last_heartbeat < ?", (cutoff,))
        return [Worker.from_row(r) for r in rows]

    def mark_worker_dead(self, worker_id: str) -> None:
        self._run("UPDATE workers SET state = 'dead', activity = 'idle' WHERE worker_id = ?", (worker_id,))

    def set_throughput(self, worker_id: str, value: float) -> None:
        self._run("UPDATE workers SET throughput_ewma = ? WHERE worker_id = ?", (value, worker_id))

    def refresh_alive_heartbeats(self, now: float) -> int:
        """Give every alive worker a fresh grace period (used when the controller starts)."""
        return self._run("UPDATE workers SET last_heartbeat = ? WHERE state = 'alive'", (now,))

    # -- jobs ---------------------------------------------------------------------------
    def insert_job(self, job: Job) -> None:
        self._run(
            """INSERT INTO jobs (job_id, name, config, num_tasks, priority, required_flops,
                                 required_memory_gb, state, created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                job.job_id,
                job.name,
                json.dumps(job.config, sort_keys=True),
                job.num_tasks,
                job.priority,
                job.required_flops,
                job.required_memory_gb,
                job.state,
                job.created_at,
                job.updated_at,
            ),
        )

    def get_job(self, job_id: str) -> Job | None:
        r = self._one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return Job.from_row(r) if r else None

    def list_jobs(self) -> list[Job]:
        return [Job.from_row(r) for r in self._all("SELECT * FROM jobs ORDER BY seq")]

    def set_job_state(self, job_id: str, state: str, now: float, error: str | None = None) -> None:
        self._run(
            "UPDATE jobs SET state = ?, updated_at = ?, error = COALESCE(?, error) WHERE job_id = ?",
            (state, now, error, job_id),
        )

    # -- tasks --------------------------------------------------------------------------
    def insert_tasks(self, job_id: str, num_tasks: int, now: float) -> None:
        with self._lock:
            self._c().executemany(
                "INSERT INTO tasks (task_id, job_id, shard_id, state, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?)",
                [(f"{job_id}.{i}", job_id, i, now) for i in range(num_tasks)],
            )

    def get_task(self, task_id: str) -> Task | None:
        r = self._one("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        return Task.from_row(r) if r else None

    def tasks_of_job(self, job_id: str) -> list[Task]:
        rows = self._all("SELECT * FROM tasks WHERE job_id = ? ORDER BY shard_id", (job_id,))
        return [Task.from_row(r) for r in rows]

    def assigned_tasks(self, worker_id: str | None = None) -> list[Task]:
        if worker_id is None:
            rows = self._all("SELECT * FROM tasks WHERE state = 'assigned' ORDER BY job_id, shard_id")
        else:
            rows = self._all(
                "SELECT * FROM tasks WHERE state = 'assigned' AND worker_id = ? ORDER BY job_id, shard_id",
                (worker_id,),
            )
        return [Task.from_row(r) for r in rows]

    def pending_tasks(self) -> list[tuple[Task, Job]]:
        """Pending tasks of jobs still wanting work, with their job (for priority and requirements)."""
        jobs = {
            j.job_id: j
            for j in (
                Job.from_row(r) for r in self._all("SELECT * FROM jobs WHERE state IN ('pending', 'running')")
            )
        }
        rows = self._all("SELECT * FROM tasks WHERE state = 'pending' ORDER BY job_id, shard_id")
        tasks = [Task.from_row(r) for r in rows]
        return sorted(
            ((t, jobs[t.job_id]) for t in tasks if t.job_id in jobs), key=lambda p: (p[1].seq, p[0].shard_id)
        )

    def update_task(
        self,
        task_id: str,
        state: str,
        worker_id: str | None,
        now: float,
        attempts: int | None = None,
        last_error: str | None = None,
    ) -> None:
        self._run(UPDATE_TASK, (state, worker_id, now, attempts, last_error, task_id))

    def release_tasks_of_worker(self, worker_id: str, now: float) -> list[Task]:
        tasks = self.assigned_tasks(worker_id)
        self._run(
            "UPDATE tasks SET state = 'pending', worker_id = NULL, updated_at = ? "
            "WHERE state = 'assigned' AND worker_id = ?",
            (now, worker_id),
        )
        return tasks

    def close_open_tasks(self, job_id: str, state: str, now: float) -> int:
        """Move every task of the job that is not completed to `state` (cancelled / failed)."""
        return self._run(
            "UPDATE tasks SET state = ?, worker_id = NULL, updated_at = ? "
            "WHERE job_id = ? AND state IN ('pending', 'assigned')",
            (state, now, job_id),
        )

    def worker_loads(self) -> dict[str, int]:
        rows = self._all(
            "SELECT worker_id, COUNT(*) AS n FROM tasks WHERE state = 'assigned' GROUP BY worker_id"
        )
        return {r["worker_id"]: r["n"] for r in rows}

    def job_members(self) -> dict[str, list[str]]:
        """Live members (workers holding assigned tasks) of every job that is not finished."""
        members: dict[str, list[str]] = {
            r["job_id"]: []
            for r in self._all("SELECT job_id FROM jobs WHERE state IN ('pending', 'running')")
        }
        rows = self._all(
            """SELECT DISTINCT t.job_id, t.worker_id FROM tasks t JOIN workers w ON w.worker_id = t.worker_id
               WHERE t.state = 'assigned' AND w.state = 'alive' ORDER BY t.job_id, t.worker_id"""
        )
        for r in rows:
            if r["job_id"] in members:
                members[r["job_id"]].append(r["worker_id"])
        return members

    def count_by_state(self, table: str) -> dict[str, int]:
        if table not in ("workers", "jobs", "tasks"):
            raise ValueError(table)
        return {
            r["state"]: r["n"] for r in self._all(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
        }

    def task_state_counts(self, job_id: str) -> dict[str, int]:
        rows = self._all("SELECT state, COUNT(*) AS n FROM tasks WHERE job_id = ? GROUP BY state", (job_id,))
        return {r["state"]: r["n"] for r in rows}

    # -- failure reports ------------------------------------------------------------------
    def record_failure(self, task_id: str, worker_id: str, attempt: int, reason: str, now: float) -> None:
        self._run(
            "INSERT INTO task_failures (task_id, worker_id, attempt, reason, failed_at) VALUES (?, ?, ?, ?, ?)",
            (task_id, worker_id, attempt, reason, now),
        )

    def failure_counted(self, task_id: str, worker_id: str, attempt: int | None, reason: str) -> bool:
        """Whether this report was counted before: the same attempt, or (no attempt given) the same reason."""
        if attempt is not None:
            sql = "SELECT 1 FROM task_failures WHERE task_id = ? AND worker_id = ? AND attempt = ?"
            return self._one(sql, (task_id, worker_id, attempt)) is not None
        sql = "SELECT 1 FROM task_failures WHERE task_id = ? AND worker_id = ? AND reason = ?"
        return self._one(sql, (task_id, worker_id, reason)) is not None

    def failed_workers(self, task_ids: Sequence[str]) -> dict[str, frozenset[str]]:
        """For each of these tasks that some worker failed: the workers that did."""
        out: dict[str, set[str]] = {}
        ids = list(task_ids)
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            rows = self._all(f"SELECT DISTINCT task_id, worker_id FROM task_failures WHERE task_id IN ({marks})", chunk)
            for r in rows:
                out.setdefault(r["task_id"], set()).add(r["worker_id"])
        return {t: frozenset(w) for t, w in out.items()}

    # -- telemetry ------------------------------------------------------------------------
    def insert_telemetry(self, job_id: str, worker_id: str, record: dict[str, Any], now: float) -> None:
        cols = ", ".join(TELEMETRY_FIELDS)
        marks = ", ".join("?" for _ in TELEMETRY_FIELDS)
        self._run(
            f"INSERT INTO telemetry (job_id, worker_id, {cols}, received_at) VALUES (?, ?, {marks}, ?)",
            (job_id, worker_id, *(record.get(f) for f in TELEMETRY_FIELDS), now),
        )

    def telemetry_rows(self, job_id: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        rows = self._all(
            """SELECT t.*, w.name AS worker_name FROM telemetry t
               LEFT JOIN workers w ON w.worker_id = t.worker_id
               WHERE t.job_id = ? AND t.id > ? ORDER BY t.id LIMIT ?""",
            (job_id, after_id, limit),
        )
        return [readable(dict(r)) for r in rows]

    def latest_telemetry(self, job_id: str) -> list[dict[str, Any]]:
        """Each worker's most recent row for the job."""
        rows = self._all(
            """SELECT t.* FROM telemetry t JOIN (SELECT worker_id, MAX(id) AS id FROM telemetry
               WHERE job_id = ? GROUP BY worker_id) last ON last.id = t.id""",
            (job_id,),
        )
        return [readable(dict(r)) for r in rows]

    def job_progress(self, job_id: str) -> tuple[int, float | None]:
        """(max ps_version seen, loss of the newest row) for the job."""
        r = self._one("SELECT MAX(ps_version) AS v FROM telemetry WHERE job_id = ?", (job_id,))
        last = self._one("SELECT loss FROM telemetry WHERE job_id = ? ORDER BY id DESC LIMIT 1", (job_id,))
        return (int(r["v"]) if r and r["v"] is not None else 0, last["loss"] if last else None)

    # -- counters -------------------------------------------------------------------------
    def incr(self, name: str, by: int = 1) -> None:
        self._run(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self._all("SELECT name, value FROM counters")}
