"""`dist-llm-train run --ps-shards P`: P parameter-server processes, each supervised on its own.

kill -9 of one shard mid-run: that shard resumes from its own checkpoint, the others keep theirs, the workers pull
the lowest version the shards agree on, and the run completes with its summary. Bad input exits 2 before any
process starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dist_llm_train.cli.main import app

Marked = Callable[[str], list[int]]  # tests/conftest.py's `marked_processes`
CHECKPOINT_EVERY = 5


def _log(tmp_path: Path, name: str) -> str:
    logs = list((tmp_path / "runs").glob(f"*/logs/{name}.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def _wait_for(what: str, ready: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _shard_pid(marked: Marked, marker: str, checkpoint_folder: str) -> int | None:
    """The PS process whose --checkpoint-dir is `checkpoint_folder` (one per shard)."""
    for pid in marked(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"paramserver" in cmd and any(arg.endswith(f"/{checkpoint_folder}".encode()) for arg in cmd):
            return pid
    return None


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_of_one_shard_the_run_completes(tmp_path: Path, marked_processes: Marked) -> None:
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm_train", "run", "--runs-dir", str(tmp_path / "runs"), "--json",
         "--workers", "2", "--steps", "200", "--ps-shards", "3", "--checkpoint-every", str(CHECKPOINT_EVERY)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "DLT_TEST_MARKER": marker},
    )
    try:
        _wait_for("training", lambda: "training job" in _log(tmp_path, "worker-0"))
        _wait_for("a checkpoint of shard 1", lambda: any((tmp_path / "runs").glob("*/checkpoints-1/*.ckpt.npz")))
        time.sleep(1.5)
        assert all(_shard_pid(marked_processes, marker, d) for d in ("checkpoints", "checkpoints-1", "checkpoints-2"))
        old = _shard_pid(marked_processes, marker, "checkpoints-1")
        assert old is not None
        os.kill(old, signal.SIGKILL)
        _wait_for("shard 1 back", lambda: "resumed job" in _log(tmp_path, "paramserver-1"))
        assert _shard_pid(marked_processes, marker, "checkpoints-1") not in (None, old)
        out, err = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["job_state"] == "completed" and summary["steps"] >= 200
    assert summary["ps_shards"] == 3
    assert summary["final_loss"] < summary["initial_loss"]
    restarts = summary["restarts"]
    assert restarts["counts"] == {"paramserver": 0, "paramserver-1": 1, "paramserver-2": 0, "controller": 0}
    event = restarts["events"][0]
    assert event["service"] == "paramserver-1" and event["exit_code"] == -signal.SIGKILL
    assert event["version_resumed"] % CHECKPOINT_EVERY == 0 and event["version_resumed"] > 0
    assert restarts["task_attempts_failed"] == 0
    run_dir = Path(summary["run_dir"])
    for folder in ("checkpoints", "checkpoints-1", "checkpoints-2"):  # each shard checkpoints its own slice
        assert list((run_dir / folder).glob("*.ckpt.npz"))
    deadline = time.monotonic() + 15
    while marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(marker) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_with_two_shards_trains_and_checkpoints_each_slice(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "run", "--runs-dir", str(tmp_path / "runs"), "--json",
         "--workers", "2", "--steps", "20", "--ps-shards", "2", "--transport", "zmq", "--checkpoint-every", "5"],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job_state"] == "completed" and summary["steps"] == 20 and summary["ps_shards"] == 2
    assert summary["final_loss"] < summary["initial_loss"]
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "logs" / "paramserver-1.log").exists()
    for folder in ("checkpoints", "checkpoints-1"):
        assert list((run_dir / folder).glob("*.ckpt.npz"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ps-shards", "0"], "--ps-shards"),
        (["--ps-shards", "65"], "--ps-shards"),
        (["--ps-shards", "two"], "--ps-shards"),
        (["--ps-shards", "3", "--aggregation", "krum", "--byzantine-f", "1", "--workers", "5"], "krum"),
        (["--ps-shards", "2", "--strategy", "streaming_diloco"], "streaming_diloco"),
        (["--ps-shards", "2", "--profile", "good", "--shaping", "kernel"], "--shaping kernel is not available"),
    ],
)
def test_bad_shard_settings_exit_2_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["run", "--runs-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()  # no run folder: nothing started


def test_controller_refuses_a_bad_shard_address() -> None:
    result = CliRunner().invoke(app, ["serve", "controller", "--insecure", "--ps-address", "127.0.0.1:1,,h:2"])
    assert result.exit_code == 2
    assert "empty" in result.output and "--ps-address" in result.output


async def test_controller_with_sharded_ps_refuses_whole_vector_jobs_at_submission() -> None:
    """A controller given P > 1 shard addresses refuses e.g. krum when the job is submitted (HTTP 422, nothing
    stored), and takes the jobs shards can run (the embedded test above trains through such a controller)."""
    import httpx

    from dist_llm_train.config import ControllerConfig
    from dist_llm_train.controller.app import create_app

    class Notifier:
        def set_members(self, job_id: str, members: list[str]) -> list[str]:
            return members

        def close(self) -> None:
            pass

    shards = "127.0.0.1:59991,127.0.0.1:59992"
    app = create_app(ControllerConfig(), "grpc", shards, Notifier(), run_background=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
        krum = {"training": {"num_workers": 5, "aggregation": {"rule": "krum", "f": 1}}}
        r = await client.post("/v1/jobs", json={"name": "k", "config": krum})
        assert r.status_code == 422 and "krum" in r.text and "PS shards" in r.text
        assert (await client.get("/v1/jobs")).json() in ([], {"jobs": []})
        r = await client.post("/v1/jobs", json={"name": "ok", "config": {"training": {"steps": 5}}})
        assert r.status_code in (200, 201), r.text
    app.state.runtime.close()
