"""The Swarm stack across three engines: this machine's (the manager) and two more dockerds in containers
(engine_node.py) that join as worker nodes — the steps docs/deploy.md gives for adding machines: `docker swarm
join`, then `swarm_images.sh` to put the images on them without a registry. Workers land on every node, each task
shapes its own link, Prometheus finds every task through the overlay network, and a job trains with one task per
worker. Then one worker node is taken down as a machine would fail (its engine killed): Swarm starts its worker
tasks on the other nodes, they register again under their names, and a job with a step budget completes.
`make test-swarm-3node` (DLT_E2E_MULTINODE=1).

It needs a swarm it can advertise on the Docker bridge (so the other engines can reach the manager): it skips when
this engine is already in a swarm, and leaves the one it made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from e2e_stack import ROOT, Http, free_port, has_network, leave_swarm_made_here, run, wait_for
from engine_node import EngineNode, engine_node

# ~6 minutes (the images cross to two more engines, ~2.3 GB each): `make test-swarm` sets DLT_E2E_MULTINODE=1;
# `make e2e` runs the single-node Swarm suite only.
pytestmark = [
    pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500),
    pytest.mark.skipif(os.environ.get("DLT_E2E_MULTINODE") != "1", reason="set DLT_E2E_MULTINODE=1 (make test-swarm)"),
]

STACK = "dlt-e2e-nodes"
WORKERS = 4
SCRIPTS = ROOT / "scripts" / "docker"
CLI = str(ROOT / ".venv" / "bin" / "dist-llm-train")
JOB_CONFIG = """\
model: {{name: gpt, n_layer: 1, n_head: 2, n_embd: 32}}
training: {{strategy: sync, steps: {steps}, learning_rate: 0.01, batch_size: 16, seq_length: 32}}
"""
_timing: dict[str, float] = {}
_state: dict[str, Any] = {}


@dataclass
class Cluster:
    nodes: dict[str, EngineNode]  # the worker nodes by hostname (node2, node3); the manager is this engine
    controller: Http
    prometheus: Http
    admin_token: str


def bridge_gateway() -> str:
    """The default bridge's gateway address, where the other engines reach this one's swarm manager. Some engines
    leave it out of the network's IPAM config (only the subnet is there, seen with 20.10 after a restart): then
    docker0's own address is the gateway."""
    gateway = run("docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}").strip()
    if gateway:
        return gateway
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", run("ip", "-4", "-o", "addr", "show", "docker0"))
    if found:
        return found.group(1)
    subnet = run("docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Subnet}}").strip()
    return str(next(ipaddress.ip_network(subnet).hosts()))  # Docker's default: the subnet's first address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if run("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip() != "inactive":
        pytest.skip("this engine is already in a swarm; the multi-node test makes its own")
    run(str(SCRIPTS / "build_images.sh"), "--missing", timeout=1800)
    bridge = bridge_gateway()
    work = tmp_path_factory.mktemp("nodes")
    ports = {name: str(free_port()) for name in
             ("DLT_CONTROLLER_PORT", "DLT_PS_PORT", "DLT_PS_METRICS_PORT", "DLT_PROMETHEUS_PORT")}
    env = {**os.environ, **ports, "DLT_STACK": STACK, "DLT_SECRETS_DIR": str(work / "secrets")}
    gwbridge_before = has_network("docker_gwbridge")
    run("docker", "swarm", "init", "--advertise-addr", bridge)
    clients: list[Http] = []
    try:
        with engine_node(work / "engine2", "node2") as node2, engine_node(work / "engine3", "node3") as node3:
            nodes = {"node2": node2, "node3": node3}
            token = run("docker", "swarm", "join-token", "-q", "worker").strip()
            for node in nodes.values():
                run("docker", "-H", node.host, "swarm", "join", "--token", token, f"{bridge}:2377", timeout=120)
            t0 = time.monotonic()
            run(str(SCRIPTS / "swarm_images.sh"), *(n.host for n in nodes.values()), timeout=1200)
            _timing["images_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            proc = subprocess.run([str(SCRIPTS / "stack_up.sh"), "cellular", str(WORKERS)], env=env,
                                  capture_output=True, text=True, timeout=600)
            _timing["up_s"] = time.monotonic() - t0
            assert proc.returncode == 0, proc.stderr[-4000:]
            admin = (work / "secrets" / "admin_token").read_text().strip()
            clients = [Http(f"http://127.0.0.1:{ports['DLT_CONTROLLER_PORT']}", token=admin),
                       Http(f"http://127.0.0.1:{ports['DLT_PROMETHEUS_PORT']}")]
            try:
                yield Cluster(nodes, clients[0], clients[1], admin)
            finally:
                subprocess.run([str(SCRIPTS / "stack_down.sh")], env=env, capture_output=True, timeout=180)
                for node in nodes.values():
                    subprocess.run(["docker", "-H", node.host, "swarm", "leave", "--force"], capture_output=True,
                                   timeout=60)
    finally:
        for c in clients:
            c.close()
        leave_swarm_made_here(gwbridge_before)


def worker_tasks_by_node() -> dict[str, int]:
    nodes = run("docker", "service", "ps", f"{STACK}_worker", "--filter", "desired-state=running", "--format",
                "{{.Node}} {{.CurrentState}}").splitlines()
    running = [line.split()[0] for line in nodes if " Running " in f" {line} "]
    return {n: running.count(n) for n in set(running)}


def submit(cluster: Cluster, tmp_path: Any, steps: int, name: str) -> dict[str, Any]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(JOB_CONFIG.format(steps=steps))
    job: dict[str, Any] = json.loads(run(
        CLI, "submit-job", "--config", str(config), "--workers", str(WORKERS), "--name", name,
        "--controller", cluster.controller.base, "--token", cluster.admin_token))
    assert job["num_tasks"] == WORKERS
    return job


def test_workers_run_on_every_node_and_shape_their_links(cluster: Cluster) -> None:
    placed = worker_tasks_by_node()
    assert sum(placed.values()) == WORKERS and len(placed) == 3, placed
    for node in cluster.nodes.values():
        remote = run("docker", "-H", node.host, "ps", "-q", "--filter",
                     f"label=com.docker.swarm.service.name={STACK}_worker").split()
        assert remote, f"no worker task on {node.host}"
        for cid in remote:
            desc = json.loads(run("docker", "-H", node.host, "exec", cid, "python", "-m", "dist_llm_train.netem",
                                  "show", "--dev", "eth0", "--json"))
            assert desc["applied"] and desc["profile"] == "cellular" and desc["node"].startswith("worker-"), desc


def stack_diagnostics(controller: Http, job_id: str) -> str:
    """What a failed wait needs to be understood on a machine nobody can log into (CI): the job's step, each
    worker's state and link, where every task ran and why it stopped, and the last lines each service logged."""
    parts: list[str] = []
    try:
        status = controller.get("/status")
        parts.append("job: " + json.dumps([j for j in status["jobs"] if j["job_id"] == job_id]))
        parts.append("workers: " + json.dumps([(w["name"], w["state"], w.get("last_heartbeat_age_s"))
                                               for w in status["workers"]]))
        parts.append("links: " + json.dumps([(lk["worker"], lk.get("backend"), lk.get("measured_rtt_ms"),
                                              lk.get("measured_loss")) for lk in status["links"]]))
    except (httpx.HTTPError, KeyError, ValueError) as err:
        parts.append(f"/status unreadable: {err}")
    for service in ("worker", "paramserver", "controller"):
        name = f"{STACK}_{service}"
        parts.append(run("docker", "service", "ps", name, "--no-trunc", "--format",
                         "{{.Name}} {{.Node}} {{.DesiredState}} {{.CurrentState}} {{.Error}}", check=False))
        proc = subprocess.run(["docker", "service", "logs", "--tail", "25", "--no-trunc", name],
                              capture_output=True, text=True, timeout=60)
        parts.append(f"-- {name} logs --\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}")
    return "\n".join(parts)


def test_a_job_trains_across_nodes_with_every_link_in_status(cluster: Cluster, tmp_path: Any) -> None:
    job = submit(cluster, tmp_path, 100000, "e2e")
    _state["job_id"] = job["job_id"]
    names = [f"worker-{i}" for i in range(1, WORKERS + 1)]

    def trained() -> bool:
        status = cluster.controller.get("/status")
        return next(j["step"] for j in status["jobs"] if j["job_id"] == job["job_id"]) >= 20

    def every_worker_measured() -> dict[str, Any] | None:
        status = cluster.controller.get("/status")
        alive = sorted(w["name"] for w in status["workers"] if w["state"] == "alive")
        measured = sorted(lk["worker"] for lk in status["links"] if lk["measured_rtt_ms"] is not None)
        return status if alive == names and measured == names else None

    t0 = time.monotonic()
    try:
        wait_for("20 synchronous steps", trained, timeout=300, every=2.0)
        _timing["20_steps_s"] = time.monotonic() - t0
        status = wait_for("every worker alive with a measured link", every_worker_measured, timeout=120, every=2.0)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{stack_diagnostics(cluster.controller, job['job_id'])}") from None
    assert all(lk["within_tolerance"] is True for lk in status["links"]), status["links"]


def test_prometheus_scrapes_tasks_on_every_node(cluster: Cluster) -> None:
    def workers_up() -> list[dict[str, Any]] | None:
        targets = cluster.prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        up = [t for t in targets if t["labels"]["job"] in ("worker", "link") and t["health"] == "up"]
        return up if len(up) == 2 * WORKERS else None

    wait_for("every worker and link target up", workers_up, timeout=90, every=2.0)


def test_a_node_goes_down_its_workers_move_and_a_job_completes(cluster: Cluster, tmp_path: Any) -> None:
    """Kill the engine of the worker node with the most workers (a machine lost): Swarm marks it down and starts
    its worker tasks on the other nodes (same slots, so the same names); the controller declared the lost
    workers dead and gave their tasks to survivors meanwhile; the job with a step budget completes."""
    cluster.controller.post(f"/v1/jobs/{_state['job_id']}/cancel", {})
    job = submit(cluster, tmp_path, 300, "across-a-node-loss")
    names = [f"worker-{i}" for i in range(1, WORKERS + 1)]

    def step() -> int:
        status = cluster.controller.get("/status")
        return int(next(j["step"] for j in status["jobs"] if j["job_id"] == job["job_id"]))

    try:
        wait_for("30 steps of the second job", lambda: step() >= 30, timeout=300, every=2.0)
        placed = worker_tasks_by_node()
        victim = max(cluster.nodes, key=lambda n: (placed.get(n, 0), n))
        moved = placed.get(victim, 0)
        assert moved >= 1, placed
        t0 = time.monotonic()
        cluster.nodes[victim].stop()

        def rescheduled() -> dict[str, int] | None:
            now = worker_tasks_by_node()
            return now if victim not in now and sum(now.values()) == WORKERS else None

        placed_after = wait_for(f"{victim}'s workers running on the other nodes", rescheduled, timeout=240,
                                every=2.0)
        _timing["reschedule_s"] = time.monotonic() - t0

        def all_back() -> bool:
            status = cluster.controller.get("/status")
            return sorted(w["name"] for w in status["workers"] if w["state"] == "alive") == names

        wait_for("every worker alive again under its name", all_back, timeout=180, every=2.0)

        def completed() -> dict[str, Any] | None:
            view: dict[str, Any] = cluster.controller.get(f"/v1/jobs/{job['job_id']}")
            return view if view["state"] in ("completed", "cancelled", "failed") else None

        view = wait_for("the job to finish", completed, timeout=600, every=3.0)
        _timing["node_loss_to_done_s"] = time.monotonic() - t0
    except AssertionError as err:
        raise AssertionError(f"{err}\n{stack_diagnostics(cluster.controller, job['job_id'])}") from None
    assert view["state"] == "completed", view
    assert view["progress"]["step"] >= 300, view["progress"]
    status = cluster.controller.get("/status")
    # One entry per name: the moved tasks took over their names' registrations, no duplicate.
    assert sorted(w["name"] for w in status["workers"]) == names
    assert status["counters"].get("worker_deaths", 0) >= moved, status["counters"]
    print(f"multi-node: placed {placed}, after the loss of {victim} {placed_after}; timings {_timing}")
