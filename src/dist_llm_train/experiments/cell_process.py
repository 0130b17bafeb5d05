"""Each embedded cell runs its launcher in a fresh interpreter (multiprocessing "spawn").

Why not in-process: the launcher talks gRPC to the PS and then forks the next service with `preexec_fn`; once
an earlier run in the same process has used and closed gRPC channels, grpcio's fork handlers can deadlock that
fork (seen here: the second cell of a grid hung forever inside `fork_exec`). A spawned child starts with no
gRPC state, a crashed or hung launcher cannot take the grid down, and the parent can enforce a hard deadline.
Progress comes back over a queue; the child's services die with it (they carry PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

START_GRACE_S = 180.0
"""Time allowed beyond the run's own timeout for interpreter start, service start-up and evaluation."""


class CellProcessError(RuntimeError):
    """The launcher in the child failed; the message is the child's exception."""


def _child(cfg_data: dict[str, Any], workers: int, runs_dir: str, timeout_s: float, extra: dict[str, Any],
           out: Any) -> None:
    from dist_llm_train.config import parse_config
    from dist_llm_train.embedded.launcher import EmbeddedRun, RunOptions, Snapshot

    def progress(s: Snapshot) -> None:
        with contextlib.suppress(queue.Full):  # progress is best effort; the result is not
            out.put_nowait(("progress", s.version, s.loss))

    try:
        opts = RunOptions(config=parse_config(cfg_data), workers=workers, runs_dir=Path(runs_dir),
                          timeout_s=timeout_s, **extra)
        summary = EmbeddedRun(opts).execute(on_progress=progress).to_json()
        out.put(("done", summary, None))
    except BaseException as err:  # report everything, including KeyboardInterrupt, then exit
        out.put(("error", f"{type(err).__name__}: {err}", None))


def run_embedded_cell(
    cfg_data: dict[str, Any],
    workers: int,
    runs_dir: Path,
    timeout_s: float,
    extra: dict[str, Any],
    progress: Callable[[int, float | None], None],
) -> dict[str, Any]:
    """Run one embedded launcher in a spawned child and return its RunSummary as a dict."""
    ctx = mp.get_context("spawn")
    messages: Any = ctx.Queue(maxsize=1000)
    proc = ctx.Process(target=_child, args=(cfg_data, workers, str(runs_dir), timeout_s, extra, messages),
                       name="dlt-experiment-cell", daemon=False)
    proc.start()
    deadline = time.monotonic() + timeout_s + START_GRACE_S
    try:
        while time.monotonic() < deadline:
            try:
                kind, a, b = messages.get(timeout=0.5)
            except queue.Empty:
                if not proc.is_alive():
                    raise CellProcessError(f"launcher process exited with code {proc.exitcode} and no result"
                                           ) from None
                continue
            if kind == "progress":
                progress(int(a), b)
            elif kind == "done":
                return dict(a)
            else:
                raise CellProcessError(str(a))
        raise TimeoutError(f"cell did not finish within {timeout_s + START_GRACE_S:.0f}s")
    finally:
        _stop(proc)
        messages.close()


def _stop(proc: Any) -> None:
    proc.join(timeout=30)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=15)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=5)
