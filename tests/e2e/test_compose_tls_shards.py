"""The Compose stack with both options that change the PS's wire: `make up TLS=1 PS_SHARDS=2` — mutual TLS on
the PS's gRPC (deploy/docker-compose.tls.yml) and two PS shards (`paramserver` and one `paramserver-shard`
replica). Project `dlt-e2e-tls`, ephemeral host ports, PROFILE=cellular, 2 workers.

Claims, in order: every service (both shards too) healthy; a job with one task per worker trains; each shard
holds about half of the job's parameters, is scraped by Prometheus and checkpoints under its own node name in the
shared volume; /status shows every worker's link to every shard, configured and measured (each shard runs a
probe responder, and each worker's link exporter probes them all), and Prometheus has a link series per path;
each shard refuses a plaintext client and a TLS client without a certificate, and answers one with the stack's
client certificate (checked against the name `paramserver` the shared certificate holds); down leaves nothing.
The default stack (one PS, no TLS) is test_compose_stack.py's.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import CLI, DEPLOY, LONG_JOB_CONFIG, ROOT, Http, logs, prom_query, run, wait_for

from dist_llm_train.core.sharding import ShardPlan
from dist_llm_train.netem.measure.path_report import configured_path
from dist_llm_train.netem.profile.loading import load_profile

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROJECT = "dlt-e2e-tls"
PROFILE = "cellular"
WORKERS = 2
PS_SHARDS = 2
SHARD_NODES = ["paramserver", *(f"shard-{i}" for i in range(1, PS_SHARDS))]  # the shards' node names, in order
CHECKPOINT_EVERY = 20  # the paramserver image's --checkpoint-every
_state: dict[str, Any] = {}


@dataclass
class TlsStack:
    compose: list[str]  # the `docker compose` command line for this project
    controller: Http
    prometheus: Http
    admin_token: str


def _compose_ps(compose: list[str], service: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in run(*compose, "ps", "--format", "json").splitlines() if line.strip()]
    flat = [r for row in rows for r in (row if isinstance(row, list) else [row])]
    return [r for r in flat if r["Service"] == service]


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    run(str(ROOT / "scripts" / "docker" / "build_images.sh"), "--missing", timeout=1800)
    work = tmp_path_factory.mktemp("e2e-tls")
    secrets = work / "secrets"
    run(str(ROOT / "scripts" / "docker" / "secrets.sh"), str(secrets), CLI)
    # What compose_up.sh does for TLS=1 (certificates made once) and PS_SHARDS=2.
    run(CLI, "certs", "--out", str(secrets / "certs"), "--host", "paramserver", "--host", "localhost", "--host",
        "127.0.0.1", "--client", "controller", "--client", "worker")
    env_file = work / "tls.env"
    env_file.write_text("\n".join([
        f"DLT_SECRETS_DIR={secrets}", f"PROFILE={PROFILE}", f"WORKERS={WORKERS}",
        f"DLT_PS_SHARD_REPLICAS={PS_SHARDS - 1}",
        "DLT_PS_ADDRESS=" + ",".join(["paramserver:50051"] + [f"{PROJECT}-paramserver-shard-{i}:50051"
                                                              for i in range(1, PS_SHARDS)]),
        "DLT_PROBE_TARGETS=" + ",".join(["paramserver=paramserver:9199"] + [
            f"shard-{i}={PROJECT}-paramserver-shard-{i}:9199" for i in range(1, PS_SHARDS)]),
        "DLT_CONTROLLER_PORT=", "DLT_PS_PORT=", "DLT_PS_METRICS_PORT=", "DLT_PROMETHEUS_PORT=", "",
    ]))
    compose = ["docker", "compose", "-p", PROJECT, "--env-file", str(env_file), "-f",
               str(DEPLOY / "docker-compose.yml"), "-f", str(DEPLOY / "docker-compose.tls.yml")]
    run(*compose, "down", "--volumes", "--remove-orphans", timeout=120)  # a stack left by an interrupted run
    clients: list[Http] = []
    try:
        up = subprocess.run([*compose, "up", "--detach", "--wait"], capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stderr[-4000:] + run(*compose, "logs", "--tail", "30", check=False)[-6000:]

        def port(service: str, target: int) -> str:
            return run(*compose, "port", service, str(target)).strip().rsplit(":", 1)[1]

        admin = (secrets / "admin_token").read_text().strip()
        clients = [Http(f"http://127.0.0.1:{port('controller', 8000)}", token=admin),
                   Http(f"http://127.0.0.1:{port('prometheus', 9090)}")]
        yield TlsStack(compose, clients[0], clients[1], admin)
    finally:
        for c in clients:
            c.close()
        run(*compose, "down", "--volumes", "--remove-orphans", timeout=180, check=False)


def test_every_service_and_both_shards_are_healthy(tls_stack: TlsStack) -> None:
    for service, count in (("paramserver", 1), ("paramserver-shard", PS_SHARDS - 1), ("controller", 1),
                           ("worker", WORKERS)):
        rows = _compose_ps(tls_stack.compose, service)
        assert len(rows) == count and all(r["Health"] == "healthy" for r in rows), (service, rows)


def test_a_job_trains_over_mutual_tls_on_two_shards(tls_stack: TlsStack, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(LONG_JOB_CONFIG)
    job = json.loads(run(CLI, "submit-job", "--config", str(config), "--workers", str(WORKERS), "--name", "tls",
                         "--controller", tls_stack.controller.base, "--token", tls_stack.admin_token))
    _state["job_id"] = job["job_id"]
    samples: list[float] = []

    def trained() -> bool:
        progress = tls_stack.controller.get(f"/v1/jobs/{job['job_id']}")["progress"]
        if progress.get("loss") is not None:
            samples.append(float(progress["loss"]))
        return progress["step"] >= CHECKPOINT_EVERY + 5

    wait_for(f"{CHECKPOINT_EVERY + 5} steps", trained, timeout=240, every=1.0)
    assert samples[-1] < samples[0], samples


def test_every_shard_holds_half_is_scraped_and_checkpoints_under_its_name(tls_stack: TlsStack) -> None:
    job_id = _state["job_id"]
    # The gauge's own `job` label (the job id) is `exported_job` once Prometheus adds its scrape job.
    query = f'dlt_ps_version{{job="paramserver",exported_job="{job_id}"}}'
    wait_for("a version series per shard, each past a checkpoint",
             lambda: len(r := prom_query(tls_stack.prometheus, query)) == PS_SHARDS
             and min(float(x["value"][1]) for x in r) > CHECKPOINT_EVERY, timeout=120, every=2.0)

    def created(container: str) -> int:
        return int(logs(container).split(f"job {job_id} created: ", 1)[1].split(" params", 1)[0])

    shard0 = _compose_ps(tls_stack.compose, "paramserver")[0]["Name"]
    replicas = [r["Name"] for r in _compose_ps(tls_stack.compose, "paramserver-shard")]
    sizes = [created(shard0), *(created(c) for c in replicas)]
    # The client's balanced split: bounds on 4,096-element multiples, so compressed pushes can be cut per shard.
    assert sizes == [ShardPlan.balanced(sum(sizes), PS_SHARDS).size(i) for i in range(PS_SHARDS)], sizes
    for container in replicas:
        node = run("docker", "exec", container, "cat", "/run/dlt/node").strip()
        assert node.startswith("shard-"), node
        files = run("docker", "exec", container, "ls", f"/data/{node}").split()
        assert f"{job_id}.ckpt.npz" in files, (node, files)


def test_status_shows_every_workers_link_to_every_shard(tls_stack: TlsStack) -> None:
    """Each worker's link exporter probes every shard's responder: /status has one measured ps_sync link per
    worker and shard, named by the shard's node, configured as the profile sets that path, from a kernel
    backend; Prometheus has the exporter's series for every path."""
    names = [f"worker-{i}" for i in range(1, WORKERS + 1)]
    want = sorted(f"{w}->{node}" for w in names for node in SHARD_NODES)

    def measured() -> list[dict[str, Any]] | None:
        links = tls_stack.controller.get("/status")["links"]
        done = sorted(lk["link"] for lk in links if lk["measured_rtt_ms"] is not None
                      and lk["measured_loss"] is not None)
        return links if done == want else None

    links = wait_for("a measured link from every worker to every shard in /status", measured, timeout=120,
                     every=2.0)
    assert sorted(lk["link"] for lk in links) == want, links  # nothing else either
    profile = load_profile(PROFILE)
    for lk in links:
        worker, node = lk["link"].split("->")
        assert lk["worker"] == worker and lk["traffic_class"] == "ps_sync", lk
        assert lk["backend"] in ("tc_netem", "kernel_fallback"), lk
        cfg = configured_path(profile, worker, node, names)
        assert lk["configured_rtt_ms"] == pytest.approx(cfg.rtt_ms), lk
        assert lk["configured_rate_mbit"] == cfg.up_rate_mbit, lk
        # Shaped both ways (80 ms configured): far above an unshaped bridge's fraction of a millisecond.
        assert lk["measured_rtt_ms"] > cfg.rtt_ms / 2, lk
    paths = wait_for("a measured RTT series per worker and shard in Prometheus",
                     lambda: len(r := prom_query(tls_stack.prometheus, "dlt_link_measured_rtt_seconds"))
                     == len(want) and r, timeout=90, every=2.0)
    assert sorted(f"{r['metric']['src']}->{r['metric']['dst']}" for r in paths) == want


def test_each_shard_accepts_only_clients_with_the_stacks_certificate(tls_stack: TlsStack) -> None:
    """The health check of shard 0's image, run inside it against every shard by container name."""
    prober = _compose_ps(tls_stack.compose, "paramserver")[0]["Name"]
    shards = [f"{PROJECT}-paramserver-shard-{i}:50051" for i in range(1, PS_SHARDS)] + ["paramserver:50051"]
    certs = "/etc/dlt/certs"
    mutual = {"DLT_PS_TLS_CA": f"{certs}/ca.pem", "DLT_PS_TLS_CERT": f"{certs}/worker.pem",
              "DLT_PS_TLS_KEY": f"{certs}/worker.key", "DLT_PS_TLS_SERVER_NAME": "paramserver"}
    no_client_cert = {"DLT_PS_TLS_CA": f"{certs}/ca.pem", "DLT_PS_TLS_SERVER_NAME": "paramserver"}

    def health(target: str, env: dict[str, str]) -> tuple[int, str]:
        # `env -i`: none of the container's own DLT_PS_TLS_* (its healthcheck's) leaks into the probe.
        pairs = [f"{k}={v}" for k, v in env.items()]
        proc = subprocess.run(["docker", "exec", prober, "env", "-i", "PATH=/opt/venv/bin:/usr/bin:/bin", *pairs,
                               "python", "/usr/local/bin/dlt-healthcheck.py", f"grpc://{target}"],
                              capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    for target in shards:
        assert health(target, mutual) == (0, "grpc health: SERVING\n"), target
        code, out = health(target, {})
        assert code == 1 and "grpc health:" in out, (target, out)  # plaintext to a TLS port
        code, out = health(target, no_client_cert)
        assert code == 1, (target, out)  # TLS, but no client certificate: mutual TLS turns it away


def test_down_leaves_nothing(tls_stack: TlsStack) -> None:
    run(*tls_stack.compose, "down", "--volumes", "--remove-orphans", timeout=180)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert run("docker", "ps", "-aq", "--filter", label).split() == []
    assert run("docker", "network", "ls", "-q", "--filter", label).split() == []
    assert run("docker", "volume", "ls", "-q", "--filter", label).split() == []

