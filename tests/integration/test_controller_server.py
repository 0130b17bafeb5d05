"""`serve()` as a real process on loopback, and the no-torch guarantee of the controller."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVE = """
import sys
from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.server import serve
serve(ControllerConfig(port=0, state_db=sys.argv[1], heartbeat_interval_s=0.5), "grpc", "127.0.0.1:1")
"""


def test_importing_the_controller_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import dist_llm_train.controller.app, dist_llm_train.controller.server\n"
        "from dist_llm_train.controller.schedulers import SCHEDULERS\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_on_port_zero_prints_the_real_port_and_stops_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "controller.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(tmp_path / "c.db")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            m = re.search(r"controller ready port=(\d+)", log_path.read_text())
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None:
                raise AssertionError(f"controller exited: {log_path.read_text()}")
            else:
                time.sleep(0.1)
        assert port and port > 0, log_path.read_text()
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        r = httpx.post(f"{base}/v1/workers/register", json={"name": "w"}, timeout=5)
        assert r.status_code == 200
        assert log_path.read_text().count("controller ready port=") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells who stopped it.
    assert code in (0, -signal.SIGTERM), log_path.read_text()
    assert "Application shutdown complete" in log_path.read_text()


def test_listening_socket_lets_asyncio_disable_nagle() -> None:
    """Regression: with proto 0 asyncio skips TCP_NODELAY and every reply stalls ~40 ms on delayed ACKs."""
    import socket

    from dist_llm_train.controller.server import bind_listening_socket

    sock = bind_listening_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_serve_collects_garbage_less_often_and_freezes_the_built_app() -> None:
    """The collector's pauses were the controller's latency tail (server.GC_THRESHOLDS says why): `serve` sets the
    thresholds and freezes what the built app holds before it answers anything."""
    code = (
        "import gc\n"
        "from dist_llm_train.config import ControllerConfig\n"
        "from dist_llm_train.controller import server\n"
        "server._Server.run = lambda self, sockets=None: print(list(gc.get_threshold()), gc.get_freeze_count())\n"
        "server.serve(ControllerConfig(port=0), 'grpc', '127.0.0.1:1')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True).stdout
    thresholds, frozen = out.strip().splitlines()[-1].rsplit(" ", 1)
    from dist_llm_train.controller.server import GC_THRESHOLDS

    assert thresholds == str(list(GC_THRESHOLDS)) and int(frozen) > 10_000  # modules, schemas, routes
