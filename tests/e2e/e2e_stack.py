"""Helpers for the compose end-to-end suite: run compose/docker commands, read the services' HTTP surfaces.

Kept apart from the tests so each test reads as the claim it checks. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLI = str(ROOT / ".venv" / "bin" / "dist-llm-train")
# A job that trains until the test cancels it: a small GPT, sync, no end in sight.
LONG_JOB_CONFIG = """\
model: {name: gpt, n_layer: 1, n_head: 2, n_embd: 32}
training: {strategy: sync, steps: 100000, learning_rate: 0.01, batch_size: 16, seq_length: 32}
"""
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROJECT = "dlt-e2e"
T = TypeVar("T")


def run(*cmd: str, timeout: float = 120, check: bool = True) -> str:
    """Run a command; on failure raise with its stderr (the reason), not just the exit code."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def logs(container: str) -> str:
    """A container's output; `docker logs` replays the container's stderr on its own stderr, so join both."""
    proc = subprocess.run(["docker", "logs", container], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Poll `probe` until it returns something other than None/False; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as err:
            last_err, value = err, None
        if value is not None and value is not False:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_err})"
                                                                                  if last_err else ""))


def containers(service: str | None = None, all_states: bool = False) -> list[dict[str, Any]]:
    """`docker compose ps` rows of the e2e project (Name, Service, State, Health, ...)."""
    cmd = ["docker", "compose", "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"), "ps", "--format", "json"]
    if all_states:
        cmd.append("-a")
    out = run(*cmd).strip()
    # compose 2.26 prints one JSON object per line (older versions printed one array).
    rows: list[dict[str, Any]] = []
    for line in out.splitlines():
        data = json.loads(line)
        rows.extend(data if isinstance(data, list) else [data])
    return [r for r in rows if service is None or r["Service"] == service]


def host_port(service: str, port: int) -> int:
    out = run("docker", "compose", "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"), "port", service,
              str(port)).strip()
    return int(out.rsplit(":", 1)[1])


def exec_json(container: str, *cmd: str, timeout: float = 60) -> Any:
    return json.loads(run("docker", "exec", container, *cmd, timeout=timeout))


def project_leftovers() -> dict[str, list[str]]:
    """Containers, networks and volumes still labelled with the e2e compose project."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": run("docker", "ps", "-aq", "--filter", label).split(),
        "networks": run("docker", "network", "ls", "-q", "--filter", label).split(),
        "volumes": run("docker", "volume", "ls", "-q", "--filter", label).split(),
    }


class Http:
    """JSON over HTTP to one service's published port."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = httpx.Client(base_url=base, timeout=10, headers=headers)

    def get(self, path: str, **params: str) -> Any:
        resp = self.client.get(path, params=params or None)
        resp.raise_for_status()
        return resp.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = self.client.post(path, json=body)
        if resp.status_code >= 400:
            raise RuntimeError(f"POST {path} -> {resp.status_code}: {resp.text}")
        return resp.json()

    def text(self, path: str) -> str:
        resp = self.client.get(path)
        resp.raise_for_status()
        return resp.text

    def close(self) -> None:
        self.client.close()


def prom_query(prom: Http, expr: str) -> list[dict[str, Any]]:
    data = prom.get("/api/v1/query", query=expr)
    if data.get("status") != "success":
        raise RuntimeError(f"{expr}: {data}")
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every target of every provisioned dashboard."""
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(f.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f.name, panel["title"], target["expr"]))
    return out


def metric_value(text: str, name: str) -> float | None:
    """The first sample of `name` in Prometheus text exposition (labels ignored)."""
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            return float(line.rsplit(" ", 1)[1])
    return None


def leave_swarm_made_here(gwbridge_before: bool) -> None:
    """Leave the swarm a test initialised, and remove the `docker_gwbridge` network `docker swarm init` made (it
    outlives `swarm leave`) unless it was there before."""
    subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, timeout=60)
    if not gwbridge_before:
        subprocess.run(["docker", "network", "rm", "docker_gwbridge"], capture_output=True, timeout=60)


def has_network(name: str) -> bool:
    return subprocess.run(["docker", "network", "inspect", name], capture_output=True).returncode == 0


def free_port() -> int:
    """A loopback port nothing listens on now (for a stack's published ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


FAKE_DOCKER = r"""#!/usr/bin/env bash
# A stand-in for `docker` that records what compose_up.sh / stack_up.sh deploy (their environment and the stack
# files they pass), with no engine: every other call answers as an idle, healthy one would.
out=${FAKE_DOCKER_OUT:?}
case "$*" in
  *LocalNodeState*) echo active ;;
  *ControlAvailable*) echo true ;;
  "image inspect"*) echo sha256:0000 ;;
  "compose "*" up "*|"stack deploy "*)
    env >"$out/env"
    n=0 prev=""
    for a in "$@"; do
      if [ "$prev" = -c ]; then cp "$a" "$out/stack-$n.yml"; n=$((n + 1)); fi
      prev=$a
    done ;;
  "service ls "*)
    all="$*" && name=${all##*--filter name=} && name=${name%% *}
    if [[ "$name" == *_worker ]]; then echo "$name $WORKERS/$WORKERS"; else echo "$name 1/1"; fi ;;
esac
"""


def fake_docker_deploy(tmp_path: Path, script: str, *args: str, **env: str) -> dict[str, str]:
    """Run a deploy script (compose_up.sh, stack_up.sh) against FAKE_DOCKER; the environment it deployed with.
    The stack files it passed are left as tmp_path/deployed/stack-N.yml."""
    bindir, out, secrets = tmp_path / "fake-bin", tmp_path / "deployed", tmp_path / "secrets"
    for d in (bindir, out, secrets):
        d.mkdir(parents=True, exist_ok=True)
    docker = bindir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    for name in ("cluster_secret", "join_token", "admin_token"):  # made already: secrets.sh leaves them be
        (secrets / name).write_text("x\n")
    full = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_DOCKER_OUT": str(out),
            "DLT_SECRETS_DIR": str(secrets), "DLT_CLI": "/bin/false", **env}
    proc = subprocess.run([str(ROOT / "scripts" / "docker" / script), *args], capture_output=True, text=True,
                          env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (out / "env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)
