"""The compose stack the e2e suite runs against: PROFILE=cellular, 3 workers, project `dlt-e2e`.

One stack per session (starting it costs ~40 s); the tests in test_compose_stack.py run in file order against it,
because the later claims (kill, restart, teardown) are about what happens to a stack that is training.
Host ports are ephemeral so the suite never collides with a `make up` stack or with other tests on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_stack import DEPLOY, PROJECT, ROOT, Http, host_port, run

PROFILE = "cellular"
WORKERS = 3


@dataclass
class Stack:
    compose: object  # testcontainers DockerCompose
    controller: Http
    prometheus: Http
    ps_metrics: Http
    admin_token: str = ""  # for a new controller client (its host port can change after a restart)
    profile: str = PROFILE
    workers: int = WORKERS


def _require_engine() -> None:
    if shutil.which("docker") is None:
        pytest.fail("docker CLI not found: run scripts/docker/setup_engine.sh (make e2e does)")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.fail("`docker compose` (v2) not available: run scripts/docker/setup_engine.sh")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("docker daemon not answering: run scripts/docker/setup_engine.sh")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _require_engine()
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here
    from testcontainers.compose import DockerCompose

    run(str(ROOT / "scripts" / "docker" / "build_images.sh"), "--missing", timeout=1800)
    work = tmp_path_factory.mktemp("e2e")
    secrets = work / "secrets"  # auth on, as `make up` has it: the stack's own secret and tokens
    run(str(ROOT / "scripts" / "docker" / "secrets.sh"), str(secrets), str(ROOT / ".venv/bin/dist-llm-train"))
    admin_token = (secrets / "admin_token").read_text().strip()
    env_file: Path = work / "e2e.env"
    env_file.write_text(
        "\n".join([
            f"COMPOSE_PROJECT_NAME={PROJECT}",
            f"DLT_SECRETS_DIR={secrets}",
            f"PROFILE={PROFILE}",
            f"WORKERS={WORKERS}",
            # Empty host ports: Docker picks free ones (looked up with `docker compose port`).
            "DLT_CONTROLLER_PORT=",
            "DLT_PS_PORT=",
            "DLT_PS_METRICS_PORT=",
            "DLT_PROMETHEUS_PORT=",
            "",
        ])
    )
    # A stack left over by an interrupted earlier run would make every assertion below meaningless.
    run("docker", "compose", "-p", PROJECT, "-f", str(DEPLOY / "docker-compose.yml"), "down", "--volumes",
        "--remove-orphans", timeout=120)
    compose = DockerCompose(context=str(DEPLOY), compose_file_name="docker-compose.yml", env_file=str(env_file),
                            wait=True)
    compose.start()
    clients: list[Http] = []
    try:
        controller = Http(f"http://127.0.0.1:{host_port('controller', 8000)}", token=admin_token)
        prometheus = Http(f"http://127.0.0.1:{host_port('prometheus', 9090)}")
        ps_metrics = Http(f"http://127.0.0.1:{host_port('paramserver', 9100)}")
        clients = [controller, prometheus, ps_metrics]
        yield Stack(compose, controller, prometheus, ps_metrics, admin_token)
    finally:
        for c in clients:
            c.close()
        compose.stop(down=True)
