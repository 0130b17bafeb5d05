"""The compose deployment, end to end: `PROFILE=cellular`, 3 workers, real images, real shaping, real Prometheus.

Tests run in file order against one stack (conftest.py): health -> shaping -> a job with one task per worker ->
training -> links in /status -> observability -> worker death -> PS restart -> crash restarts -> teardown. Each
asserts a claim of docs/deploy.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import (
    ROOT,
    Http,
    containers,
    exec_json,
    host_port,
    logs,
    metric_value,
    panel_queries,
    project_leftovers,
    prom_query,
    run,
    wait_for,
)

from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.resolve import egress_links

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HEARTBEAT_S = 1.0  # the compose controller runs --heartbeat-interval 1 --miss-limit 3
MISS_LIMIT = 3
CHECKPOINT_EVERY = 20  # the compose paramserver runs --checkpoint-every 20
# A model small enough that a sync step over a 10 Mbit/s, 80 ms link takes well under a second, and a step budget
# large enough that the job is still training when the kill and restart tests run. No `num_workers`: it is
# submitted as `make up` submits the default job (`submit-job --workers $WORKERS`), so it gets one task per worker.
JOB_CONFIG = """\
model: {name: gpt, n_layer: 1, n_head: 2, n_embd: 32}
training: {strategy: sync, steps: 100000, learning_rate: 0.01, batch_size: 16, seq_length: 32}
"""
_state: dict[str, Any] = {}


def job_view(controller: Http) -> dict[str, Any]:
    view: dict[str, Any] = controller.get(f"/v1/jobs/{_state['job_id']}")
    return view


def test_every_service_is_healthy(stack: Any) -> None:
    rows = containers()
    by_service: dict[str, list[str]] = {}
    for r in rows:
        by_service.setdefault(r["Service"], []).append(r["Health"] or r["State"])
    assert sorted(by_service) == ["controller", "paramserver", "prometheus", "worker"]
    assert len(by_service["worker"]) == stack.workers
    assert all(h == "healthy" for hs in by_service.values() for h in hs), by_service
    assert stack.controller.get("/readyz") is not None


def test_shaping_is_on_in_every_container(stack: Any) -> None:
    nodes = {}
    for r in containers():
        if r["Service"] == "prometheus":
            continue
        desc = exec_json(r["Name"], "python", "-m", "dist_llm_train.netem", "show", "--dev", "eth0", "--json")
        assert desc["applied"], f"{r['Name']}: no shaping applied: {desc}"
        assert desc["backend"] in ("tc_netem", "kernel_fallback"), desc["backend"]
        assert desc["profile"] == stack.profile
        nodes[r["Name"]] = desc["node"]
    workers = sorted(n for n in nodes.values() if n.startswith("worker-"))
    assert workers == [f"worker-{i}" for i in range(1, stack.workers + 1)], nodes
    assert {"controller", "paramserver"} <= set(nodes.values())

    # Measured worker -> PS round trip vs what the profile configures for that path (both egress legs).
    profile = load_profile(stack.profile)
    names = [f"worker-{i}" for i in range(1, stack.workers + 1)]
    configured_ms = (egress_links(profile, "worker-1", names)[None].delay_ms
                     + egress_links(profile, "paramserver", names)[None].delay_ms)
    worker1 = next(name for name, node in nodes.items() if node == "worker-1")
    res = exec_json(worker1, "python", "-m", "dist_llm_train.netem", "probe", "--to", "paramserver:9199",
                    "--seconds", "0", "--count", "200", "--json")["measured"]
    measured_ms = res["rtt_ms_median"]
    tolerance = max(0.35 * configured_ms, 25.0)
    assert abs(measured_ms - configured_ms) <= tolerance, (measured_ms, configured_ms)
    _state["rtt"] = (configured_ms, measured_ms)


def test_a_job_submitted_like_make_up_uses_every_worker(stack: Any, tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(JOB_CONFIG)
    out = run(str(ROOT / ".venv" / "bin" / "dist-llm-train"), "submit-job", "--config", str(config), "--workers",
              str(stack.workers), "--name", "e2e", "--controller", stack.controller.base,
              "--token", stack.admin_token)
    job = json.loads(out)
    _state["job_id"] = job["job_id"]
    assert job["num_tasks"] == stack.workers, job

    def one_task_each() -> set[str] | None:
        holders = [t["worker_name"] for t in job_view(stack.controller)["tasks"] if t["state"] == "assigned"]
        return set(holders) if len(holders) == stack.workers == len(set(holders)) else None

    assert wait_for("one task on every worker", one_task_each, timeout=30) == {
        f"worker-{i}" for i in range(1, stack.workers + 1)}


def test_the_job_trains_and_the_loss_falls(stack: Any) -> None:
    samples: list[tuple[int, float]] = []

    def progressed() -> bool:
        p = job_view(stack.controller)["progress"]
        if p.get("loss") is not None and (not samples or p["step"] > samples[-1][0]):
            samples.append((int(p["step"]), float(p["loss"])))
        return bool(samples) and samples[-1][0] >= 40

    wait_for("40 training steps", progressed, timeout=300, every=1.0)
    first, last = samples[0][1], samples[-1][1]
    assert math.isfinite(last) and last < first * 0.9, samples


def test_status_shows_every_workers_link_configured_and_measured(stack: Any) -> None:
    """Each worker's link to the PS in /status, as embedded runs have it: the kernel backend that shaped it, the
    profile's figures for the path and the measured ones (RTT and loss from the exporter's probes, rate from the
    worker's pushes)."""
    configured_ms = _state["rtt"][0]
    names = [f"worker-{i}" for i in range(1, stack.workers + 1)]

    def measured_links() -> list[dict[str, Any]] | None:
        links = stack.controller.get("/status")["links"]
        done = [lk for lk in links if lk["measured_rtt_ms"] is not None and lk["measured_rate_mbit"] is not None
                and lk["measured_loss"] is not None]
        return links if sorted(lk["worker"] for lk in done) == names else None

    links = wait_for("a measured link for every worker in /status", measured_links, timeout=90, every=2.0)
    for lk in links:
        assert lk["link"] == f"{lk['worker']}->paramserver" and lk["traffic_class"] == "ps_sync", lk
        assert lk["backend"] in ("tc_netem", "kernel_fallback"), lk
        assert lk["configured_rtt_ms"] == pytest.approx(configured_ms, abs=0.01), lk
        assert lk["within_tolerance"] is True, lk
        assert lk["configured_rate_mbit"] == 10 and 0 < lk["measured_rate_mbit"] <= 10 * 1.2, lk
        assert lk["configured_loss"] == pytest.approx(0.02, abs=1e-4) and 0 <= lk["measured_loss"] < 0.2, lk
    # `make status` is this command: the links table is in it.
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "dist-llm-train"), "status", "--controller",
                           stack.controller.base, "--token", stack.admin_token],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    text = proc.stdout + proc.stderr  # the tables go to the CLI's console (stderr)
    assert proc.returncode == 0 and "links (configured / measured)" in text, text
    assert all(f"{name}->paramserver" in text for name in names), text
    print(text)  # the figures, for whoever reads the log (pytest -s)


def test_prometheus_targets_up_and_every_panel_has_data(stack: Any) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = stack.prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        jobs = {t["labels"]["job"] for t in targets}
        ok = {"controller", "paramserver", "worker", "link", "prometheus"} <= jobs and all(
            t["health"] == "up" for t in targets)
        return targets if ok else None

    targets = wait_for("every Prometheus target up", all_up, timeout=90, every=2.0)
    assert sum(t["labels"]["job"] == "worker" for t in targets) == stack.workers
    assert sum(t["labels"]["job"] == "link" for t in targets) == stack.workers

    queries = panel_queries()
    assert len({q[0] for q in queries}) == 4 and len(queries) >= 20
    empty: list[str] = []
    for dashboard, title, expr in queries:

        def has_data(e: str = expr) -> list[dict[str, Any]] | None:
            return prom_query(stack.prometheus, e) or None

        try:
            wait_for(f"data for {expr}", has_data, timeout=45, every=3.0)
        except AssertionError:
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not empty, "panels whose PromQL returns no data:\n" + "\n".join(empty)


def test_killed_worker_is_declared_dead_and_its_task_reassigned(stack: Any) -> None:
    view = job_view(stack.controller)
    holders = {t["worker_name"] for t in view["tasks"] if t["state"] == "assigned"}
    victim_node = sorted(holders)[0]
    victim = next(r["Name"] for r in containers("worker")
                  if exec_text(r["Name"], "cat", "/run/dlt/node") == victim_node)
    run("docker", "kill", victim)
    killed_at = time.monotonic()

    def dead() -> bool:
        workers = stack.controller.get("/status")["workers"]
        return any(w["name"] == victim_node and w["state"] == "dead" for w in workers)

    wait_for(f"{victim_node} declared dead", dead, timeout=30, every=0.2)
    took = time.monotonic() - killed_at
    # Three missed intervals, plus one interval for the detector's sweep and our poll: no scheduling slack beyond.
    assert took <= (MISS_LIMIT + 1) * HEARTBEAT_S + 1.0, f"declared dead after {took:.1f}s"

    def reassigned() -> bool:
        # Every task held again, none by the dead worker: a survivor trains on two shards.
        tasks = job_view(stack.controller)["tasks"]
        names = {t["worker_name"] for t in tasks if t["state"] == "assigned"}
        held = sum(t["state"] == "assigned" for t in tasks)
        return held == len(tasks) and victim_node not in names

    wait_for("the dead worker's task on another worker", reassigned, timeout=30, every=0.5)
    counters = stack.controller.get("/status")["counters"]
    assert counters.get("reassignments", 0) >= 1 and counters.get("worker_deaths", 0) >= 1, counters


def exec_text(container: str, *cmd: str) -> str:
    return run("docker", "exec", container, *cmd).strip()


def test_paramserver_restart_resumes_from_checkpoint(stack: Any) -> None:
    def version_now(http: Http) -> float | None:
        return metric_value(http.text("/metrics"), "dlt_ps_version")

    # Let training continue past the dead worker and at least one checkpoint.
    v_before = wait_for("PS version past a checkpoint",
                        lambda: (v := version_now(stack.ps_metrics)) is not None and v >= CHECKPOINT_EVERY and v,
                        timeout=180, every=1.0)
    ps = containers("paramserver")[0]["Name"]
    v_before = version_now(stack.ps_metrics) or v_before
    run("docker", "restart", "-t", "10", ps, timeout=60)
    wait_for("paramserver healthy again",
             lambda: containers("paramserver")[0]["Health"] == "healthy", timeout=120, every=1.0)
    # The entrypoint removed its shaping when the service stopped, and applied it again on start.
    out = logs(ps)
    assert "clearing shaping on eth0" in out, out[-2000:]
    assert "netem clear failed" not in out
    assert out.count("shaped with backend") == 2, out[-2000:]
    ps_metrics = Http(f"http://127.0.0.1:{host_port('paramserver', 9100)}")  # the host port may change
    try:
        v_after = wait_for("PS version after restart", lambda: version_now(ps_metrics), timeout=60)
        assert v_after >= v_before - CHECKPOINT_EVERY, (v_before, v_after)
        # And training goes on from there.
        wait_for("training resumes after the restart",
                 lambda: (v := version_now(ps_metrics)) is not None and v > v_after, timeout=120, every=1.0)
    finally:
        ps_metrics.close()


def service_process(container: str, service: str) -> int:
    """The host pid of the `serve <service>` process inside `container` (the entrypoint's child)."""
    rows = run("docker", "top", container, "-eo", "pid,args").strip().splitlines()[1:]
    # The entrypoint's own command line names the service too; the service is the process it started.
    pids = [int(r.split(None, 1)[0]) for r in rows if f"serve {service}" in r and "dlt-entrypoint" not in r]
    assert len(pids) == 1, rows
    return pids[0]


def test_killed_services_come_back_by_their_restart_policy(stack: Any) -> None:
    """kill -9 of the service process in the PS and the controller containers, as a crash or an OOM kill would
    (not `docker stop`, which the policy respects): `restart: unless-stopped` starts each container again, the PS
    resumes from its checkpoint, and training continues without a failed task attempt."""
    def restart_count(container: str) -> int:
        return int(run("docker", "inspect", "-f", "{{.RestartCount}}", container).strip())

    for service in ("paramserver", "controller"):
        container = containers(service)[0]["Name"]
        before = restart_count(container)
        os.kill(service_process(container, service), signal.SIGKILL)
        wait_for(f"{service} restarted by its policy", lambda c=container, b=before: restart_count(c) > b,
                 timeout=60, every=0.5)
        wait_for(f"{service} healthy again", lambda s=service: containers(s)[0]["Health"] == "healthy",
                 timeout=120, every=1.0)
    controller = Http(f"http://127.0.0.1:{host_port('controller', 8000)}", token=stack.admin_token)
    ps_metrics = Http(f"http://127.0.0.1:{host_port('paramserver', 9100)}")
    try:
        v_back = wait_for("PS version after the kill",
                          lambda: metric_value(ps_metrics.text("/metrics"), "dlt_ps_version"), timeout=60)
        wait_for("training resumes after both restarts",
                 lambda: (v := metric_value(ps_metrics.text("/metrics"), "dlt_ps_version")) is not None
                 and v > v_back, timeout=180, every=1.0)
        view = job_view(controller)
        assert view["state"] == "running", view["state"]
        assert [t["attempts"] for t in view["tasks"]] == [0] * len(view["tasks"]), view["tasks"]
    finally:
        controller.close()
        ps_metrics.close()


def test_teardown_leaves_nothing_behind(stack: Any) -> None:
    stack.compose.stop(down=True)
    assert project_leftovers() == {"containers": [], "networks": [], "volumes": []}
