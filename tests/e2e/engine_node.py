"""A second Docker engine for the Swarm tests: Debian's dockerd in a container (tests/e2e/swarm_node/Dockerfile),
its API on a unix socket in a directory the test bind-mounts — no TCP port anywhere. It stands in for another
machine: `swarm_images.sh` loads images into it, and it can join the host's swarm as a worker node.

What a nested dockerd needs here, found on this machine: every capability and no seccomp/AppArmor filter
(`--privileged` asks for all capabilities and fails where the host's bounding set lacks one: this VM has no
CAP_SYS_RESOURCE), and a writable cgroup hierarchy to start containers in (the host's, bind-mounted; the nested
engine puts its containers under the cgroup parent `/<name>`, which `stop` removes again).
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from e2e_stack import ROOT, run, wait_for

NODE_IMAGE = "dlt-test-engine:latest"
# capability(7) names by number, 0..40
CAPS = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
]
CGROUP_ROOT = Path("/sys/fs/cgroup")


def engine_flags() -> list[str]:
    """Every capability the host's engine can grant, no seccomp/AppArmor filter."""
    bounding = int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)
    missing = [name for i, name in enumerate(CAPS) if not bounding >> i & 1]
    if not missing:
        return ["--privileged"]
    return ["--cap-add", "ALL", *(f"--cap-drop={name}" for name in missing),
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]


def ensure_node_image() -> None:
    if subprocess.run(["docker", "image", "inspect", NODE_IMAGE], capture_output=True).returncode == 0:
        return
    base = run(str(ROOT / "scripts" / "docker" / "base_image.sh"), timeout=600).strip()
    run("docker", "build", "--build-arg", f"BASE_IMAGE={base}", "-t", NODE_IMAGE,
        str(Path(__file__).parent / "swarm_node"), timeout=900)


@dataclass(frozen=True)
class EngineNode:
    host: str  # its `docker -H` address
    container: str  # the container it runs in: `docker stop` it to take the "machine" down

    def stop(self) -> None:
        run("docker", "stop", "-t", "0", self.container, timeout=60)


@contextlib.contextmanager
def engine_node(sock_dir: Path, hostname: str = "node2") -> Iterator[EngineNode]:
    """Start another engine; yield it; stop it and remove all it made on exit (also after `stop()`)."""
    ensure_node_image()
    name = f"dlt-test-engine-{uuid.uuid4().hex[:8]}"
    run("docker", "run", "-d", "--name", name, "--hostname", hostname, *engine_flags(),
        "-v", f"{CGROUP_ROOT}:{CGROUP_ROOT}:rw", "-v", f"{sock_dir}:/run/node", NODE_IMAGE,
        "--cgroup-parent", f"/{name}")
    host = f"unix://{sock_dir}/docker.sock"
    try:
        wait_for("the second engine answering",
                 lambda: subprocess.run(["docker", "-H", host, "info"], capture_output=True).returncode == 0,
                 timeout=60, every=1.0)
        yield EngineNode(host, name)
    finally:
        # Its own containers first (so their cgroups empty), then the engine, then the emptied cgroups.
        ids = subprocess.run(["docker", "-H", host, "ps", "-aq"], capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "-H", host, "rm", "-f", *ids], capture_output=True, timeout=120)
        subprocess.run(["docker", "stop", "-t", "30", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=120)
        for parent in CGROUP_ROOT.glob(f"*/{name}"):
            for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
