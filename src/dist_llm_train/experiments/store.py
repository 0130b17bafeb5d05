"""`runs.csv`: one row per run, rewritten atomically after every run so an interrupted grid resumes cleanly.

A run is keyed by `run_key` = cell id + backend + repeat. Only rows with status `ok` count as finished: a
refused or failed run is retried next time (a refusal costs milliseconds, and the strategy or codec it asked
for may have landed since). Rows of cells no longer in the grid are kept, as history, but not reported.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

RUN_COLUMNS = [
    "run_key", "cell_id", "repeat", "backend", "status", "error",
    "profile", "strategy", "codec", "aggregation", "attack", "workers", "seed", "extra",
    "run_seed", "steps", "mode", "shaping", "bound_profile", "ps_egress",
    "loss_floor", "target_loss", "initial_loss", "final_loss", "steps_done",
    "wall_s", "train_wall_s", "time_to_target_s", "steps_to_target", "bytes_to_target",
    "bytes_sent", "bytes_received", "compute_utilisation",
    "round_measured_s", "round_bound_s", "measured_over_bound",
    "note", "run_dir", "finished_at",
]  # fmt: skip
STATUSES = ("ok", "refused", "error")
INTEGER = frozenset({"repeat", "workers", "seed", "run_seed", "steps", "steps_done", "steps_to_target",
                     "bytes_to_target", "bytes_sent", "bytes_received"})
FLOAT = frozenset({"loss_floor", "target_loss", "initial_loss", "final_loss", "wall_s", "train_wall_s",
                   "time_to_target_s", "compute_utilisation", "round_measured_s", "round_bound_s",
                   "measured_over_bound"})


def run_key(cell_id: str, backend: str, repeat: int) -> str:
    return f"{cell_id}-{backend}-r{repeat}"


def _parse(name: str, raw: str) -> Any:
    if raw == "":
        return None
    if name in INTEGER:
        return int(float(raw))
    if name in FLOAT:
        return float(raw)
    return raw


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RunStore:
    def __init__(self, out: Path) -> None:
        self.path = out / "runs.csv"
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            with self.path.open(newline="") as f:
                for rec in csv.DictReader(f):
                    if rec.get("run_key"):
                        self.rows[rec["run_key"]] = {k: _parse(k, rec.get(k) or "") for k in RUN_COLUMNS}

    def finished(self, key: str) -> bool:
        row = self.rows.get(key)
        return row is not None and row.get("status") == "ok"

    def put(self, row: dict[str, Any]) -> None:
        unknown = sorted(set(row) - set(RUN_COLUMNS))
        if unknown:
            raise ValueError(f"unknown runs.csv columns {unknown}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        self.rows[str(row["run_key"])] = {k: row.get(k) for k in RUN_COLUMNS}
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
            writer.writeheader()
            for row in self.rows.values():
                writer.writerow({k: _fmt(row.get(k)) for k in RUN_COLUMNS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
