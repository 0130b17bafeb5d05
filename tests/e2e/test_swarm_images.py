"""scripts/docker/swarm_images.sh moves the stack's images to another engine with no registry: a second dockerd
in a privileged container (its socket in a bind-mounted directory), as a node joining the swarm would have.
Marked e2e and slow: `make test-swarm` runs it."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import ROOT, run, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = ROOT / "scripts" / "docker" / "swarm_images.sh"
NODE_IMAGE = "dlt-test-engine:latest"
IMAGE = "dlt-prometheus:latest"  # the smallest of the four; the script moves any list the same way


# capability(7) names by number, 0..40
CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
]


def engine_flags() -> list[str]:
    """What a nested dockerd needs: every capability and no seccomp/AppArmor filter. `--privileged` asks for all
    capabilities, which fails where the host's bounding set lacks one (this VM has no CAP_SYS_RESOURCE); then the
    flags grant all but the missing ones."""
    bounding = int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)
    missing = [name for i, name in enumerate(CAPS) if not bounding >> i & 1]
    if not missing:
        return ["--privileged"]
    return ["--cap-add", "ALL", *(f"--cap-drop={name}" for name in missing),
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if subprocess.run(["docker", "image", "inspect", NODE_IMAGE], capture_output=True).returncode != 0:
        base = run(str(ROOT / "scripts" / "docker" / "base_image.sh"), timeout=600).strip()
        run("docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", NODE_IMAGE,
            str(Path(__file__).parent / "swarm_node"), timeout=900)
    sock_dir = tmp_path_factory.mktemp("engine")
    name = f"dlt-test-engine-{uuid.uuid4().hex[:8]}"
    run("docker", "run", "-d", "--name", name, *engine_flags(), "-v", f"{sock_dir}:/run/node", NODE_IMAGE)
    host = f"unix://{sock_dir}/docker.sock"
    try:
        wait_for("the second engine answering",
                 lambda: subprocess.run(["docker", "-H", host, "info"], capture_output=True).returncode == 0,
                 timeout=60, every=1.0)
        yield host
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=120)


def test_images_reach_another_engine_without_a_registry(other_engine: str) -> None:
    env_images = {"DLT_IMAGES": IMAGE}
    assert subprocess.run(["docker", "-H", other_engine, "image", "inspect", IMAGE],
                          capture_output=True).returncode != 0, "the new engine must start without the image"
    t0 = time.monotonic()
    proc = subprocess.run([str(SCRIPT), other_engine], capture_output=True, text=True, timeout=600,
                          env=_env(env_images))
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    here = run("docker", "image", "inspect", "-f", "{{.Id}}", IMAGE).strip()
    there = run("docker", "-H", other_engine, "image", "inspect", "-f", "{{.Id}}", IMAGE).strip()
    assert here == there, (here, there)
    print(f"{IMAGE} moved in {took:.1f}s")
    # A second run finds it there and moves nothing.
    again = subprocess.run([str(SCRIPT), other_engine], capture_output=True, text=True, timeout=120,
                           env=_env(env_images))
    assert again.returncode == 0 and "all images present" in again.stderr, again.stderr


def test_a_missing_local_image_is_refused(other_engine: str) -> None:
    proc = subprocess.run([str(SCRIPT), other_engine], capture_output=True, text=True, timeout=60,
                          env=_env({"DLT_IMAGES": "dlt-no-such-image:never"}))
    assert proc.returncode == 2 and "make images first" in proc.stderr


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}
