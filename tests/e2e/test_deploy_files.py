"""Fast checks of the deployment files that need no running stack (they run in `make test`).

The e2e suite proves the stack works; these catch the cheap mistakes first: stale generated dashboards, a panel
without a query, a broken compose interpolation, a mirror URI derived from the wrong apt stanza.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_stack import DASHBOARDS, DEPLOY, ROOT, fake_docker_deploy

SCRIPTS = ROOT / "scripts" / "docker"


def test_dashboards_are_generated_and_complete() -> None:
    proc = subprocess.run([str(ROOT / ".venv/bin/python"), str(SCRIPTS / "gen_dashboards.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert files == ["network.json", "paramserver.json", "training.json", "workers.json"]
    for f in DASHBOARDS.glob("*.json"):
        dash = json.loads(f.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f.name
        for panel in dash["panels"]:
            assert panel["targets"], f"{f.name}: {panel['title']} has no query"
            for t in panel["targets"]:
                assert t["expr"].strip() and t["datasource"]["uid"] == "dlt-prometheus"


APT_SOURCES = """Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
"""


def test_apt_source_is_derived_from_the_matching_stanza(tmp_path: Path) -> None:
    src = tmp_path / "debian.sources"
    src.write_text(APT_SOURCES)
    env = {"DLT_APT_SOURCES": str(src), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([str(SCRIPTS / "apt_source.sh"), "bookworm"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == "http://mirror.example/debian"
    missing = subprocess.run([str(SCRIPTS / "apt_source.sh"), "trixie"], capture_output=True, text=True, env=env)
    assert missing.returncode == 3 and "no entry for suite 'trixie'" in missing.stderr


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_compose_file_interpolates_profile_workers_and_ephemeral_ports() -> None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("compose v2 not installed")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PROFILE": "straggler", "WORKERS": "5", "DLT_CONTROLLER_PORT": ""}
    proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format",
                           "json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    svc = cfg["services"]
    assert svc["worker"]["deploy"]["replicas"] == 5
    assert all(svc[s]["environment"]["PROFILE"] == "straggler" for s in ("controller", "paramserver", "worker"))
    assert all("NET_ADMIN" in svc[s]["cap_add"] for s in ("controller", "paramserver", "worker"))
    assert svc["controller"]["ports"][0].get("published") in (None, "", 0)
    assert svc["worker"]["depends_on"]["controller"]["condition"] == "service_healthy"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_prometheus_config_is_valid() -> None:
    proc = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cli_script(tmp_path: Path) -> Path:
    """`dist-llm-train` as the scripts call it, from this checkout."""
    import sys

    script = tmp_path / "dist-llm-train"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m dist_llm_train \"$@\"\n")
    script.chmod(0o755)
    return script


def test_stack_secrets_are_made_once_and_verify(tmp_path: Path) -> None:
    """`make up`'s auth step: a secret and tokens that verify against it, private files, unchanged on a rerun."""
    from dist_llm_train.core.credentials import TokenAuthority

    out = tmp_path / "secrets"
    cli = _cli_script(tmp_path)
    for _ in range(2):
        proc = subprocess.run([str(SCRIPTS / "secrets.sh"), str(out), str(cli)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        if _ == 0:
            first = {p.name: p.read_text() for p in out.iterdir()}
    assert {p.name: p.read_text() for p in out.iterdir()} == first
    assert set(first) == {"cluster_secret", "join_token", "admin_token"}
    assert all((out / name).stat().st_mode & 0o077 == 0 for name in first)
    authority = TokenAuthority(first["cluster_secret"])
    assert authority.verify(first["join_token"].strip()).role == "join"
    assert authority.verify(first["admin_token"].strip()).role == "admin"


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_compose_gives_the_secret_to_controller_and_ps_only() -> None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("compose v2 not installed")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "DLT_SECRETS_DIR": "/nonexistent"}
    proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format",
                           "json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    svc = json.loads(proc.stdout)["services"]

    def secrets(name: str) -> set[str]:
        return {s["source"] for s in svc[name].get("secrets", [])}

    assert secrets("controller") == secrets("paramserver") == {"cluster_secret"}
    assert secrets("worker") == {"join_token"}
    assert svc["worker"]["environment"]["DLT_AUTH_TOKEN_FILE"] == "/run/secrets/join_token"
    for name in ("controller", "paramserver"):
        assert svc[name]["environment"]["DLT_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret"


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_tls_override_wires_certificates_into_every_service() -> None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("compose v2 not installed")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "DLT_SECRETS_DIR": "/nonexistent"}
    proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "-f",
                           str(DEPLOY / "docker-compose.tls.yml"), "config", "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    svc = json.loads(proc.stdout)["services"]
    ps_env = svc["paramserver"]["environment"]
    assert ps_env["DLT_TLS_CLIENT_CA"] == "/etc/dlt/certs/ca.pem"  # mutual TLS
    for name in ("paramserver", "paramserver-shard", "controller", "worker"):
        assert "/etc/dlt/certs" in {v["target"] for v in svc[name]["volumes"]}
        assert svc[name]["environment"]["DLT_PS_TLS_CA"] == "/etc/dlt/certs/ca.pem"
        assert svc[name]["environment"]["DLT_PS_TLS_CERT"].endswith(".pem")
    # Every shard serves the PS's certificate (and keeps its own env: node, secret); clients check each shard
    # against the name that certificate holds, so one certificate covers any PS_SHARDS.
    shard_env = svc["paramserver-shard"]["environment"]
    assert {k: shard_env[k] for k in ps_env if k.startswith("DLT_TLS")} == {k: v for k, v in ps_env.items()
                                                                          if k.startswith("DLT_TLS")}
    assert shard_env["DLT_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret"
    for name in ("controller", "worker"):
        assert svc[name]["environment"]["DLT_PS_TLS_SERVER_NAME"] == "paramserver"


def test_tls_paramserver_from_env_passes_the_tls_healthcheck_only(tmp_path: Path) -> None:
    """What the TLS stack's PS container does, without Docker: `serve paramserver` with its certificates from
    DLT_TLS_*; the healthcheck passes with the CA and a client certificate, and fails without them."""
    import os
    import socket
    import sys
    import time

    from dist_llm_train.core.credentials import generate_secret
    from dist_llm_train.paramserver.transport.certs import write_certificates

    certs = tmp_path / "certs"
    write_certificates(certs, ["paramserver", "localhost", "127.0.0.1"], ["controller"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DLT_CLUSTER_SECRET": generate_secret(), "DLT_TLS_CERT": str(certs / "paramserver.pem"),
           "DLT_TLS_KEY": str(certs / "paramserver.key"), "DLT_TLS_CLIENT_CA": str(certs / "ca.pem")}
    server = subprocess.Popen([sys.executable, "-m", "dist_llm_train", "serve", "paramserver", "--port", str(port),
                               "--metrics-port", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = [sys.executable, str(SCRIPTS / "healthcheck.py"), f"grpc://127.0.0.1:{port}"]
    tls_env = {**os.environ, "DLT_PS_TLS_CA": str(certs / "ca.pem"), "DLT_PS_TLS_CERT": str(certs / "controller.pem"),
               "DLT_PS_TLS_KEY": str(certs / "controller.key")}
    try:
        deadline = time.monotonic() + 60
        ok = subprocess.run(health, capture_output=True, text=True, env=tls_env, timeout=30)
        while ok.returncode != 0 and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
            ok = subprocess.run(health, capture_output=True, text=True, env=tls_env, timeout=30)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout
        plain_env = {k: v for k, v in os.environ.items() if not k.startswith("DLT_PS_TLS")}
        assert subprocess.run(health, capture_output=True, env=plain_env, timeout=30).returncode == 1
        no_cert = {**plain_env, "DLT_PS_TLS_CA": str(certs / "ca.pem")}  # TLS but no client certificate
        assert subprocess.run(health, capture_output=True, env=no_cert, timeout=30).returncode == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def _compose_config(env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format",
                           "json"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "DLT_SECRETS_DIR": "/nonexistent", **env})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout)["services"])


def test_compose_runs_ps_shards_as_replicas_with_their_own_checkpoints() -> None:
    """PS_SHARDS=3 (what compose_up.sh exports for it): two `paramserver-shard` replicas next to `paramserver`,
    checkpointing per node in their own volume, and the controller given all three addresses in shard order.
    By default (no PS_SHARDS) there is no shard replica and the controller talks to `paramserver` alone."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("compose v2 not installed")
    address = "paramserver:50051,dlt-paramserver-shard-1:50051,dlt-paramserver-shard-2:50051"
    svc = _compose_config({"DLT_PS_SHARD_REPLICAS": "2", "DLT_PS_ADDRESS": address})
    shard = svc["paramserver-shard"]
    assert shard["deploy"]["replicas"] == 2
    assert shard["image"] == svc["paramserver"]["image"]
    assert shard["command"][shard["command"].index("--checkpoint-dir") + 1] == "/data/@NODE@"
    assert {v["source"] for v in shard["volumes"]} >= {"ps-shard-data"}
    assert {s["source"] for s in shard["secrets"]} == {"cluster_secret"}
    assert svc["controller"]["environment"]["DLT_PS_ADDRESS"] == address
    default = _compose_config({})
    assert default["paramserver-shard"]["deploy"]["replicas"] == 0
    assert default["controller"]["environment"]["DLT_PS_ADDRESS"] == "paramserver:50051"


@pytest.mark.parametrize("shards", [1, 3])
def test_compose_up_gives_workers_every_shards_probe_responder(shards: int, tmp_path: Path) -> None:
    """`make up PS_SHARDS=3` (compose_up.sh, here against a recording stand-in for docker): the workers' link
    exporters get every shard's responder, NODE=HOST:PORT in shard order, NODE being the name the shard's
    entrypoint gives itself (replica N of `paramserver-shard` is shard-N), and every shard replica runs the
    responder. One PS: DLT_PROBE_TARGETS stays empty, so workers probe `paramserver` alone as before."""
    env = fake_docker_deploy(tmp_path, "compose_up.sh", "cellular", "2", PS_SHARDS=str(shards),
                             COMPOSE_PROJECT_NAME="proj")
    if shards == 1:
        assert env["DLT_PROBE_TARGETS"] == "" and env["DLT_PS_ADDRESS"] == "paramserver:50051"
    else:
        assert env["DLT_PROBE_TARGETS"] == ("paramserver=paramserver:9199,shard-1=proj-paramserver-shard-1:9199,"
                                            "shard-2=proj-paramserver-shard-2:9199")
        assert env["DLT_PS_ADDRESS"] == ("paramserver:50051,proj-paramserver-shard-1:50051,"
                                         "proj-paramserver-shard-2:50051")
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                         capture_output=True).returncode != 0:
        return
    keys = ("DLT_PROBE_TARGETS", "DLT_PS_ADDRESS", "DLT_PS_SHARD_REPLICAS", "PROFILE", "WORKERS")
    svc = _compose_config({k: env[k] for k in keys})
    worker = svc["worker"]["environment"]
    assert worker["DLT_PROBE_TARGETS"] == env["DLT_PROBE_TARGETS"]
    assert (worker["DLT_PROBE_TARGET"], worker["DLT_PROBE_PEER"]) == ("paramserver:9199", "paramserver")
    assert svc["paramserver-shard"]["deploy"]["replicas"] == shards - 1
    for name in ("paramserver", "paramserver-shard"):
        assert svc[name]["environment"]["DLT_PROBE_LISTEN"] == "0.0.0.0:9199", name


@pytest.mark.parametrize(("shards", "tls", "message"), [("0", "0", "1..64"), ("65", "0", "1..64"), ("x", "0", "1..64"),
                                                        ("0", "1", "1..64")])
def test_compose_up_refuses_bad_ps_shards_before_doing_anything(shards: str, tls: str, message: str,
                                                                tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PS_SHARDS": shards, "TLS": tls, "DLT_SECRETS_DIR": str(tmp_path / "s")}
    proc = subprocess.run(["bash", str(SCRIPTS / "compose_up.sh"), "good", "2"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "s").exists()  # no secrets made, nothing started
