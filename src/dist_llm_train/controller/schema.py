"""The SQLite schema as a list of migrations: entry N moves a database from version N-1 to N.

Never edit a released entry; append a new one (ALTER TABLE, new index, data fix-up).
`Store` applies the missing ones in order, each in its own transaction, and records the
version in `PRAGMA user_version`.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # v1: the initial schema.
    """
    CREATE TABLE workers (
        worker_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        memory_gb REAL NOT NULL,
        flops REAL NOT NULL,
        bandwidth_mbps REAL NOT NULL,
        compute_slowdown REAL NOT NULL,
        labels TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL,
        activity TEXT NOT NULL DEFAULT 'idle',
        registered_at REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        throughput_ewma REAL
    );
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        config TEXT NOT NULL,
        num_tasks INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        required_flops REAL NOT NULL,
        required_memory_gb REAL NOT NULL,
        state TEXT NOT NULL,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(job_id),
        shard_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        worker_id TEXT REFERENCES workers(worker_id),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX tasks_by_state ON tasks(state);
    CREATE INDEX tasks_by_worker ON tasks(worker_id);
    CREATE INDEX tasks_by_job ON tasks(job_id);
    CREATE TABLE telemetry (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        ps_version INTEGER NOT NULL,
        loss REAL,
        step_time_s REAL,
        compute_time_s REAL,
        samples_per_s REAL,
        tokens_per_s REAL,
        bytes_sent INTEGER,
        bytes_received INTEGER,
        wall_time REAL,
        push_outcome TEXT,
        received_at REAL NOT NULL
    );
    CREATE INDEX telemetry_by_job ON telemetry(job_id, id);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    """,
    # v2: every counted failure report, so a replayed one is recognised (counted once) and the scheduler can
    # keep a task away from the workers that failed it.
    """
    CREATE TABLE task_failures (
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        worker_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        reason TEXT NOT NULL,
        failed_at REAL NOT NULL,
        PRIMARY KEY (task_id, worker_id, attempt)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
