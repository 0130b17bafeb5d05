"""Fast checks of the Swarm stack files that need no swarm (they run in `make test`); the stack itself is proved
by tests/e2e/test_swarm_stack.py (`make test-swarm`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_stack import DEPLOY, ROOT, fake_docker_deploy

SWARM = DEPLOY / "swarm"


def _stack_config(env: dict[str, str], *more: Path) -> dict[str, Any]:
    """`docker stack config`: the stack file (and `more` stack files) as `docker stack deploy` would read it
    (interpolated, merged)."""
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "DLT_SECRETS_DIR": "/nonexistent"}
    files = [arg for f in (SWARM / "stack.yml", *more) for arg in ("-c", str(f))]
    proc = subprocess.run(["docker", "stack", "config", *files], capture_output=True, text=True, env=base | env,
                          timeout=60)
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("this docker CLI has no `docker stack config`")
    assert proc.returncode == 0, proc.stderr
    cfg: dict[str, Any] = yaml.safe_load(proc.stdout)
    return cfg


def test_stack_interpolates_profile_workers_and_ports() -> None:
    svc = _stack_config({"PROFILE": "straggler", "WORKERS": "5", "DLT_CONTROLLER_PORT": "18000"})["services"]
    assert sorted(svc) == ["controller", "paramserver", "prometheus", "worker"]
    assert svc["worker"]["deploy"]["replicas"] == 5
    assert all(svc[s]["environment"]["PROFILE"] == "straggler" for s in ("controller", "paramserver", "worker"))
    assert all(svc[s]["environment"]["DLT_WORKERS"] == "5" for s in ("controller", "paramserver", "worker"))
    assert svc["controller"]["ports"] == [{"mode": "host", "target": 8000, "published": 18000}]
    # stack_up.sh deploys images by id (no pull without a registry): every image is a variable.
    by_id = _stack_config({"DLT_WORKER_IMAGE": "sha256:" + "ab" * 32})["services"]
    assert by_id["worker"]["image"] == "sha256:" + "ab" * 32 and svc["worker"]["image"] == "dlt-worker:latest"


def test_every_service_shapes_its_own_link_and_worker_names_follow_the_slot() -> None:
    svc = _stack_config({})["services"]
    for name in ("controller", "paramserver", "worker"):
        assert "NET_ADMIN" in svc[name]["cap_add"], name
        assert svc[name]["deploy"]["restart_policy"]["condition"] == "any", name
        assert svc[name]["deploy"]["endpoint_mode"] == "dnsrr", name
        assert not any(v.get("type") == "bind" for v in svc[name].get("volumes", [])), "nothing host-specific"
    assert svc["worker"]["environment"]["DLT_NODE"] == "worker-{{.Task.Slot}}"
    for name in ("controller", "paramserver", "prometheus"):  # their ports and volumes are on the manager
        assert svc[name]["deploy"]["placement"]["constraints"] == ["node.role == manager"], name


def test_stack_gives_the_secret_to_controller_and_ps_only() -> None:
    svc = _stack_config({})["services"]

    def secrets(name: str) -> set[str]:
        return {s["source"] for s in svc[name].get("secrets", [])}

    assert secrets("controller") == secrets("paramserver") == {"cluster_secret"}
    assert secrets("worker") == {"join_token"} and not secrets("prometheus")
    assert svc["worker"]["environment"]["DLT_AUTH_TOKEN_FILE"] == "/run/secrets/join_token"


def test_swarm_prometheus_scrapes_every_job_of_the_compose_one() -> None:
    compose = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    swarm = yaml.safe_load((SWARM / "prometheus.yml").read_text())
    assert [j["job_name"] for j in swarm["scrape_configs"]] == [j["job_name"] for j in compose["scrape_configs"]]
    # Worker tasks by `tasks.worker`; PS shards 1..P-1 (services of their own, made by stack_up.sh for
    # PS_SHARDS) by the network alias they share.
    want = {"worker": ["tasks.worker"], "link": ["tasks.worker"], "paramserver": ["paramserver-shards"]}
    for job in swarm["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["names"] == want[job["job_name"]], job["job_name"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_swarm_prometheus_config_is_valid() -> None:
    proc = subprocess.run(["promtool", "check", "config", str(SWARM / "prometheus.yml")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scripts_refuse_bad_input_before_touching_the_engine(tmp_path: Path) -> None:
    scripts = ROOT / "scripts" / "docker"
    bad = subprocess.run([str(scripts / "stack_up.sh"), "cellular", "three"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "WORKERS must be a positive integer" in bad.stderr
    for shards in ("0", "65", "two"):
        env = {**os.environ, "PS_SHARDS": shards, "DLT_SECRETS_DIR": str(tmp_path / "s")}
        bad = subprocess.run([str(scripts / "stack_up.sh"), "cellular", "3"], capture_output=True, text=True,
                             timeout=30, env=env)
        assert bad.returncode == 2 and "PS_SHARDS must be an integer in 1..64" in bad.stderr, bad.stderr
        assert not (tmp_path / "s").exists()
    usage = subprocess.run([str(scripts / "swarm_images.sh")], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "docker -H" in usage.stderr


def test_stack_up_gives_workers_every_shards_probe_responder(tmp_path: Path) -> None:
    """`make stack-up PS_SHARDS=3` (stack_up.sh, here against a recording stand-in for docker): every shard
    service runs a probe responder and the workers' link exporters get all of them, NODE=HOST:PORT in shard
    order with the node names the shard services carry. One PS: DLT_PROBE_TARGETS empty, one stack file."""
    env = fake_docker_deploy(tmp_path / "p3", "stack_up.sh", "straggler", "3", PS_SHARDS="3", DLT_STACK="t")
    assert env["DLT_PROBE_TARGETS"] == ("paramserver=paramserver:9199,shard-1=paramserver-shard-1:9199,"
                                        "shard-2=paramserver-shard-2:9199")
    assert env["DLT_PS_ADDRESS"] == "paramserver:50051,paramserver-shard-1:50051,paramserver-shard-2:50051"
    keys = ("DLT_PROBE_TARGETS", "DLT_PS_ADDRESS", "PROFILE", "WORKERS", "DLT_PARAMSERVER_IMAGE")
    svc = _stack_config({k: env[k] for k in keys}, tmp_path / "p3" / "deployed" / "stack-1.yml")["services"]
    assert svc["worker"]["environment"]["DLT_PROBE_TARGETS"] == env["DLT_PROBE_TARGETS"]
    for i in (1, 2):
        shard = svc[f"paramserver-shard-{i}"]["environment"]
        assert (shard["DLT_NODE"], shard["DLT_PROBE_LISTEN"]) == (f"shard-{i}", "0.0.0.0:9199"), shard
    assert svc["paramserver"]["environment"]["DLT_PROBE_LISTEN"] == "0.0.0.0:9199"
    one = fake_docker_deploy(tmp_path / "p1", "stack_up.sh", "straggler", "3", DLT_STACK="t")
    assert one["DLT_PROBE_TARGETS"] == "" and one["DLT_PS_ADDRESS"] == "paramserver:50051"
    assert sorted(p.name for p in (tmp_path / "p1" / "deployed").iterdir()) == ["env", "stack-0.yml"]
