"""scripts/docker/swarm_images.sh moves the stack's images to another engine with no registry: a second dockerd
in a container (engine_node.py), as a node joining the swarm would have.
Marked e2e and slow: `make test-swarm` runs it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest
from e2e_stack import ROOT, run
from engine_node import engine_node

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = ROOT / "scripts" / "docker" / "swarm_images.sh"
IMAGE = "dlt-prometheus:latest"  # the smallest of the four; the script moves any list the same way


@pytest.fixture(scope="module")
def other_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with engine_node(tmp_path_factory.mktemp("engine")) as node:
        yield node.host


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
