"""The Swarm deployment, end to end on a single-node swarm: `PS_SHARDS=2 stack_up.sh straggler 3` (what `make
stack-up PS_SHARDS=2` runs), real images, shaping inside every task, a sharded PS, real Prometheus; then a killed
worker task replaced by Swarm, and `stack_down.sh` leaving nothing behind. Tests run in file order against one
stack. `make test-swarm`.

If the engine was in no swarm before, the fixture leaves the single-node swarm it made at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import (
    CLI,
    LONG_JOB_CONFIG,
    ROOT,
    Http,
    free_port,
    has_network,
    leave_swarm_made_here,
    logs,
    metric_value,
    prom_query,
    run,
    wait_for,
)

from dist_llm_train.core.sharding import ShardPlan
from dist_llm_train.netem.measure.path_report import configured_path
from dist_llm_train.netem.profile.loading import load_profile

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

STACK = "dlt-e2e-swarm"
# Straggler: the last worker has its own, slower link (a `$last_worker` node override), so the links in /status
# show whether each task was shaped as the node it registers as.
PROFILE = "straggler"
WORKERS = 3
PS_SHARDS = 2  # `paramserver` and the service `paramserver-shard-1`
CHECKPOINT_EVERY = 20  # the paramserver image runs --checkpoint-every 20
SCRIPTS = ROOT / "scripts" / "docker"
_state: dict[str, Any] = {}


@dataclass
class SwarmStack:
    env: dict[str, str]
    controller: Http
    prometheus: Http
    ps_metrics: Http
    admin_token: str


def swarm_state() -> str:
    return run("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.stack.namespace={STACK}"
    services = run("docker", "service", "ls", "-q", "--filter", label, check=False).split()
    return {
        "services": services,
        "containers": run("docker", "ps", "-aq", "--filter", label).split(),
        "networks": run("docker", "network", "ls", "-q", "--filter", label).split(),
        "volumes": run("docker", "volume", "ls", "-q", "--filter", label).split(),
    }


def tasks(service: str) -> list[dict[str, str]]:
    """Running containers of one service: id, slot and node name (what the entrypoint derived: /run/dlt/node)."""
    ids = run("docker", "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={STACK}_{service}",
              "--filter", "status=running").split()
    out = []
    for cid in ids:
        task_name = run("docker", "inspect", "-f", '{{index .Config.Labels "com.docker.swarm.task.name"}}',
                        cid).strip()
        health = run("docker", "inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", cid).strip()
        out.append({"id": cid, "slot": task_name.split(".")[1], "health": health,
                    # Prometheus runs without the entrypoint: no node name.
                    "node": run("docker", "exec", cid, "cat", "/run/dlt/node", check=False).strip()})
    return out


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmStack]:
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("docker daemon not answering: run scripts/docker/setup_engine.sh (make test-swarm does)")
    run(str(SCRIPTS / "build_images.sh"), "--missing", timeout=1800)
    was, gwbridge_before = swarm_state(), has_network("docker_gwbridge")
    work = tmp_path_factory.mktemp("swarm")
    ports = {name: str(free_port()) for name in
             ("DLT_CONTROLLER_PORT", "DLT_PS_PORT", "DLT_PS_METRICS_PORT", "DLT_PROMETHEUS_PORT")}
    env = {**os.environ, **ports, "DLT_STACK": STACK, "DLT_SECRETS_DIR": str(work / "secrets"),
           "PS_SHARDS": str(PS_SHARDS)}
    if was == "active":  # a stack left by an interrupted earlier run would make every claim below meaningless
        subprocess.run([str(SCRIPTS / "stack_down.sh")], env=env, capture_output=True, timeout=180)
    t0 = time.monotonic()
    proc = subprocess.run([str(SCRIPTS / "stack_up.sh"), PROFILE, str(WORKERS)], env=env, capture_output=True,
                          text=True, timeout=600)
    _state["up_s"] = time.monotonic() - t0
    clients: list[Http] = []
    try:
        assert proc.returncode == 0, proc.stderr[-4000:]
        admin = (work / "secrets" / "admin_token").read_text().strip()
        clients = [Http(f"http://127.0.0.1:{ports['DLT_CONTROLLER_PORT']}", token=admin),
                   Http(f"http://127.0.0.1:{ports['DLT_PROMETHEUS_PORT']}"),
                   Http(f"http://127.0.0.1:{ports['DLT_PS_METRICS_PORT']}")]
        yield SwarmStack(env, *clients, admin_token=admin)
    finally:
        for c in clients:
            c.close()
        subprocess.run([str(SCRIPTS / "stack_down.sh")], env=env, capture_output=True, timeout=180)
        if was == "inactive":
            leave_swarm_made_here(gwbridge_before)


def test_every_task_runs_healthy_with_distinct_worker_names(swarm: SwarmStack) -> None:
    shards = [f"paramserver-shard-{i}" for i in range(1, PS_SHARDS)]
    for service in ("paramserver", "controller", "prometheus", *shards):
        assert len(tasks(service)) == 1, service
    workers = tasks("worker")
    assert all(t["health"] == "healthy" for t in workers), workers
    # The node name comes from the task slot: worker-N for slot N, so per-node overrides hit one task.
    assert sorted(t["node"] for t in workers) == [f"worker-{i}" for i in range(1, WORKERS + 1)]
    assert all(t["node"] == f"worker-{t['slot']}" for t in workers), workers
    assert [tasks(s)[0]["node"] for s in shards] == [f"shard-{i}" for i in range(1, PS_SHARDS)]
    for t in [*workers, *tasks("paramserver"), *tasks("controller"), *(t for s in shards for t in tasks(s))]:
        desc = json.loads(run("docker", "exec", t["id"], "python", "-m", "dist_llm_train.netem", "show", "--dev",
                              "eth0", "--json"))
        assert desc["applied"] and desc["profile"] == PROFILE, desc
        assert desc["node"] == t["node"], desc  # shaped as the node it registers as: overrides hit this task
        assert desc["backend"] in ("tc_netem", "kernel_fallback"), desc


def test_a_job_with_one_task_per_worker_trains(swarm: SwarmStack, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(LONG_JOB_CONFIG)
    job = json.loads(run(CLI, "submit-job", "--config", str(config), "--workers", str(WORKERS), "--name", "e2e",
                         "--controller", swarm.controller.base, "--token", swarm.admin_token))
    _state["job_id"] = job["job_id"]
    assert job["num_tasks"] == WORKERS
    samples: list[tuple[int, float]] = []

    def progressed() -> bool:
        p = swarm.controller.get(f"/v1/jobs/{job['job_id']}")["progress"]
        if p.get("loss") is not None and (not samples or p["step"] > samples[-1][0]):
            samples.append((int(p["step"]), float(p["loss"])))
        return bool(samples) and samples[-1][0] >= 30

    wait_for("30 training steps", progressed, timeout=300, every=1.0)
    assert samples[-1][1] < samples[0][1], samples
    holders = {t["worker_name"] for t in swarm.controller.get(f"/v1/jobs/{job['job_id']}")["tasks"]}
    assert holders == {f"worker-{i}" for i in range(1, WORKERS + 1)}


def test_status_shows_every_worker_live_and_its_link_to_every_shard(swarm: SwarmStack) -> None:
    """Each worker's link exporter probes every shard's responder (DLT_PROBE_TARGETS from stack_up.sh): one
    measured link per worker and shard in /status, each configured as the profile sets that path."""
    names = [f"worker-{i}" for i in range(1, WORKERS + 1)]
    shard_nodes = ["paramserver", *(f"shard-{i}" for i in range(1, PS_SHARDS))]
    want = sorted(f"{w}->{node}" for w in names for node in shard_nodes)

    def measured() -> dict[str, Any] | None:
        status = swarm.controller.get("/status")
        done = sorted(lk["link"] for lk in status["links"]
                      if lk["measured_rtt_ms"] is not None and lk["measured_loss"] is not None)
        return status if done == want else None

    status = wait_for("every worker's measured link to every shard in /status", measured, timeout=90, every=2.0)
    assert sorted(w["name"] for w in status["workers"] if w["state"] == "alive") == names
    profile = load_profile(PROFILE)
    by_path = {lk["link"]: lk for lk in status["links"]}
    for path, lk in by_path.items():
        name, node = path.split("->")
        cfg = configured_path(profile, name, node, names)
        assert lk["worker"] == name and lk["backend"] in ("tc_netem", "kernel_fallback"), lk
        assert lk["configured_rtt_ms"] == pytest.approx(cfg.rtt_ms) and lk["configured_rate_mbit"] == cfg.up_rate_mbit
        assert lk["within_tolerance"] is True, lk
    # The override hit worker-3 (slot 3) and no other: its paths are the slow ones, configured and measured.
    for node in shard_nodes:
        slow, fast = by_path[f"worker-{WORKERS}->{node}"], by_path[f"worker-1->{node}"]
        assert slow["configured_rate_mbit"] == 5 and fast["configured_rate_mbit"] == 100, (slow, fast)
        assert slow["measured_rtt_ms"] > fast["measured_rtt_ms"] + 20, (slow, fast)


def test_prometheus_finds_every_task(swarm: SwarmStack) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = swarm.prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        per_job: dict[str, int] = {}
        for t in targets:
            if t["health"] == "up":
                per_job[t["labels"]["job"]] = per_job.get(t["labels"]["job"], 0) + 1
        want = {"controller": 1, "paramserver": PS_SHARDS, "prometheus": 1, "worker": WORKERS, "link": WORKERS}
        return targets if per_job == want and len(targets) == sum(want.values()) else None

    wait_for("every Prometheus target up (workers through tasks.worker, shards through their alias)", all_up,
             timeout=90, every=2.0)


def test_every_ps_shard_holds_its_slice_of_the_job(swarm: SwarmStack) -> None:
    """The controller lists the shards in order (DLT_PS_ADDRESS from stack_up.sh), so each holds one half of
    the parameters and advances the job's versions; Prometheus has a version series per shard."""
    job_id = _state["job_id"]

    def created(service: str) -> int:
        text = logs(tasks(service)[0]["id"])
        return int(text.split(f"job {job_id} created: ", 1)[1].split(" params", 1)[0])

    sizes = [created("paramserver"), *(created(f"paramserver-shard-{i}") for i in range(1, PS_SHARDS))]
    # The client's balanced split: bounds on 4,096-element multiples, so compressed pushes can be cut per shard.
    assert sizes == [ShardPlan.balanced(sum(sizes), PS_SHARDS).size(i) for i in range(PS_SHARDS)], sizes
    query = f'dlt_ps_version{{job="paramserver",exported_job="{job_id}"}}'
    wait_for("a version series per shard, each past 10",
             lambda: len(r := prom_query(swarm.prometheus, query)) == PS_SHARDS
             and min(float(x["value"][1]) for x in r) > 10, timeout=90, every=2.0)


def test_a_killed_worker_task_is_replaced_and_rejoins(swarm: SwarmStack) -> None:
    victim = next(t for t in tasks("worker") if t["node"] == "worker-2")
    run("docker", "kill", victim["id"])

    def replaced() -> dict[str, str] | None:
        fresh = [t for t in tasks("worker") if t["node"] == "worker-2" and t["id"] != victim["id"]]
        return fresh[0] if fresh and fresh[0]["health"] == "healthy" else None

    fresh = wait_for("Swarm's new worker-2 task healthy", replaced, timeout=180, every=2.0)
    assert fresh["slot"] == victim["slot"]
    assert "registered as worker-2" in logs(fresh["id"])

    def rejoined() -> list[dict[str, Any]] | None:
        workers = swarm.controller.get("/status")["workers"]
        alive = [w for w in workers if w["state"] == "alive" and w["last_heartbeat_age_s"] < 5]
        return workers if len(alive) == WORKERS else None

    workers = wait_for("worker-2 alive again in /status", rejoined, timeout=60, every=1.0)
    # One entry per name: the new incarnation took over worker-2's registration, no duplicate.
    assert sorted(w["name"] for w in workers) == [f"worker-{i}" for i in range(1, WORKERS + 1)]
    version = metric_value(swarm.ps_metrics.text("/metrics"), "dlt_ps_version")
    assert version is not None
    wait_for("training continues", lambda: (v := metric_value(swarm.ps_metrics.text("/metrics"), "dlt_ps_version"))
             is not None and v > version, timeout=120, every=1.0)


def test_a_killed_paramserver_task_resumes_from_its_volume(swarm: SwarmStack) -> None:
    """`docker kill` of the PS task (shard 0), as a crash would: Swarm starts a new task on the manager, with the
    same `ps-data` volume, which resumes the job from its last checkpoint (at most CHECKPOINT_EVERY versions
    back), and training goes on; no task attempt is spent on it."""
    def version() -> float | None:
        return metric_value(swarm.ps_metrics.text("/metrics"), "dlt_ps_version")

    wait_for("PS version past a checkpoint", lambda: (v := version()) is not None and v >= CHECKPOINT_EVERY,
             timeout=180, every=1.0)
    victim = tasks("paramserver")[0]
    attempts = [t["attempts"] for t in swarm.controller.get(f"/v1/jobs/{_state['job_id']}")["tasks"]]
    v_before = version()
    assert v_before is not None
    run("docker", "kill", victim["id"])

    def replaced() -> dict[str, str] | None:
        fresh = [t for t in tasks("paramserver") if t["id"] != victim["id"]]
        return fresh[0] if fresh and fresh[0]["health"] == "healthy" else None

    fresh = wait_for("Swarm's new paramserver task healthy", replaced, timeout=180, every=2.0)
    assert f"resumed job {_state['job_id']} at version" in logs(fresh["id"])
    v_after = wait_for("PS version after the restart", version, timeout=60)
    assert v_after >= v_before - CHECKPOINT_EVERY, (v_before, v_after)
    wait_for("training resumes after the restart", lambda: (v := version()) is not None and v > v_after,
             timeout=180, every=1.0)
    view = swarm.controller.get(f"/v1/jobs/{_state['job_id']}")
    assert view["state"] == "running", view["state"]
    assert [t["attempts"] for t in view["tasks"]] == attempts, view["tasks"]


def test_stack_down_leaves_nothing(swarm: SwarmStack) -> None:
    proc = subprocess.run([str(SCRIPTS / "stack_down.sh")], env=swarm.env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert leftovers() == {"services": [], "containers": [], "networks": [], "volumes": []}
    secrets = run("docker", "secret", "ls", "--format", "{{.Name}}", check=False).split()
    assert not [s for s in secrets if s.startswith(f"{STACK}_")], secrets
