"""Secure by default, end to end: `dist-llm-train run` turns auth on without any user step, trains to the
end with it, and its services refuse callers without a credential while it runs. `serve` refuses to start
without a credential unless --insecure is given, and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serve_process import insecure_paramserver

from dist_llm_train.core.types import ErrorCode, PSError
from dist_llm_train.paramserver.transport.client import connect

Marked = Callable[[str], list[int]]  # tests/conftest.py's `marked_processes`


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def _service(pids: list[int], kind: str) -> tuple[int, list[str]]:
    for pid in pids:
        cmd = _cmdline(pid)
        if "serve" in cmd and kind in cmd:
            return pid, cmd
    raise AssertionError(f"no {kind} process")


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_run_has_auth_on_by_default_and_completes(tmp_path: Path, marked_processes: Marked, transport: str) -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, "DLT_TEST_MARKER": marker}
    env.pop("DLT_CLUSTER_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm_train", "run", "--runs-dir", str(tmp_path / "runs"), "--workers", "2",
         "--steps", "120", "--transport", transport, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = marked_processes(marker)
            if sum("worker" in _cmdline(p) and "serve" in _cmdline(p) for p in pids) >= 2:
                break
            time.sleep(0.2)
        pids = marked_processes(marker)
        ctl_pid, ctl_cmd = _service(pids, "controller")
        ps_pid, ps_cmd = _service(pids, "paramserver")
        secret = _environ(ctl_pid).get("DLT_CLUSTER_SECRET", "")
        assert len(secret) >= 32 and _environ(ps_pid)["DLT_CLUSTER_SECRET"] == secret
        for pid in pids:  # the secret is on no command line, and in no worker's environment
            assert secret not in " ".join(_cmdline(pid))
            if "worker" in _cmdline(pid):
                assert _environ(pid).get("DLT_CLUSTER_SECRET", "") == ""
                assert _environ(pid)["DLT_AUTH_TOKEN"].startswith("dlt1.")
        url = f"http://127.0.0.1:{_option(ctl_cmd, '--port')}"
        assert httpx.get(f"{url}/status").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.post(f"{url}/v1/workers/register", json={"name": "intruder"}).status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
        with connect(transport, f"127.0.0.1:{_option(ps_cmd, '--port')}", timeout_s=2) as anon:
            with pytest.raises(PSError) as err:
                anon.stats(None)
            # gRPC: refused by the interceptor; ZMQ: no CURVE key, so no connection at all.
            assert err.value.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.UNAVAILABLE)
        out, err_text = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err_text[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["job_state"] == "completed" and summary["steps"] >= 120
    assert summary["final_loss"] < summary["initial_loss"]
    assert marked_processes(marker) == []


@pytest.mark.parametrize(
    ("service", "extra"),
    [("paramserver", ["--port", "0", "--metrics-port", "0"]), ("controller", ["--port", "0"]), ("worker", [])],
)
def test_serve_refuses_to_start_without_a_credential(service: str, extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DLT_CLUSTER_SECRET", "DLT_CLUSTER_SECRET_FILE", "DLT_AUTH_TOKEN")}
    result = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "serve", service, *extra],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    said = " ".join((result.stdout + result.stderr).split())
    assert "refusing to start" in said and "--insecure" in said


def test_serve_refuses_a_short_secret(tmp_path: Path) -> None:
    env = {**os.environ, "DLT_CLUSTER_SECRET": "too-short"}
    result = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "serve", "paramserver", "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2 and "at least 32 characters" in " ".join((result.stdout + result.stderr).split())


@pytest.mark.timeout(60)
def test_serve_insecure_starts_and_says_so() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DLT_CLUSTER_SECRET"}
    with insecure_paramserver(env) as (_, said):
        text = " ".join(said.split())
        assert "WARNING" in text and "--insecure: no authentication" in text and "paramserver ready" in text


def test_token_and_secret_commands(tmp_path: Path) -> None:
    from dist_llm_train.core.credentials import TokenAuthority

    def cli(*args: str, **env: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dist_llm_train", *args], capture_output=True, text=True,
                                env={**os.environ, **env}, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    secret = cli("secret")
    (tmp_path / "s").write_text(secret + "\n")
    join = cli("token", "--role", "join", "--name", "worker-1", "--secret-file", str(tmp_path / "s"))
    claims = TokenAuthority(secret).verify(join)
    assert (claims.role, claims.subject) == ("join", "worker-1")


@pytest.mark.timeout(120)
def test_demo_basic_runs_with_auth_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """demo-basic's controller runs with a fresh secret; its workers register with join credentials and finish."""
    from dist_llm_train.config import Config
    from dist_llm_train.embedded.basic_demo import run_basic_demo

    monkeypatch.chdir(tmp_path)
    result = run_basic_demo(Config(), workers=2, tasks=4, timeout_s=60)
    assert result["job_state"] == "completed" and sum(result["tasks_completed_by_worker"].values()) == 4
