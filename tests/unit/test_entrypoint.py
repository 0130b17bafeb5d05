"""The service images' entry point (scripts/docker/entrypoint.sh), run here without Docker and unshaped.

Its @NODE@ substitution decides where a sharded PS replica checkpoints (`--checkpoint-dir /data/@NODE@` in
deploy/docker-compose.yml): when only a whole-argument @NODE@ was replaced, every shard replica wrote to the same
literal `/data/@NODE@` directory of the shared volume, and two shards' checkpoints of one job overwrote each other.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[2] / "scripts" / "docker" / "entrypoint.sh"


def run_entrypoint(tmp_path: Path, node: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROFILE": "none", "DLT_NODE": node, "DLT_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run(["bash", str(ENTRYPOINT), *cmd], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("node", ["shard-1", "shard-2"])
def test_node_name_replaces_at_node_anywhere_in_an_argument(tmp_path: Path, node: str) -> None:
    proc = run_entrypoint(tmp_path, node, "echo", "--checkpoint-dir", "/data/@NODE@", "--name", "@NODE@", "plain")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--checkpoint-dir", f"/data/{node}", "--name", node, "plain"]
    assert (tmp_path / "state" / "node").read_text().strip() == node


def test_the_service_exit_code_is_the_entrypoints(tmp_path: Path) -> None:
    proc = run_entrypoint(tmp_path, "worker-1", "sh", "-c", "exit 3")
    assert proc.returncode == 3
    assert "sh exited with 3" in proc.stderr


def test_no_command_is_refused(tmp_path: Path) -> None:
    proc = run_entrypoint(tmp_path, "worker-1")
    assert proc.returncode == 64
    assert "no command given" in proc.stderr
