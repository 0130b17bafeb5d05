"""Run the controller under uvicorn; print the real port once it is listening."""

from __future__ import annotations

import gc
import logging
import socket

import uvicorn

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app

log = logging.getLogger(__name__)

# The cyclic garbage collector's pauses were the controller's latency tail: at 1,000 workers heartbeating at 1 Hz
# (default thresholds 700/10/10) a young-generation pass took 5-30 ms and a full one 67-113 ms, all under the GIL,
# while the rest of a request takes ~1 ms. Collecting the youngest generation every 10,000 net allocations instead
# of 700 collects the same garbage ~14x less often: side by side at 1,000 workers, heartbeat p99 43 -> 11 ms and
# full /status p99 168 -> 59 ms, CPU 0.60 -> 0.53 cores (results/controller_load_gc_side_by_side.md). What is
# alive once the app is built (modules, schemas, routes) is frozen out of every later scan.
GC_THRESHOLDS = (10_000, 10, 10)


class _Server(uvicorn.Server):
    """uvicorn server that announces readiness only after its socket accepts connections."""

    def __init__(self, config: uvicorn.Config, port: int) -> None:
        super().__init__(config)
        self.port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("controller ready port=%d", self.port)


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket whose accepted connections get TCP_NODELAY from asyncio.

    asyncio only disables Nagle on sockets whose `proto` is IPPROTO_TCP; a socket made with
    proto 0 (the default) silently keeps Nagle, and every response written as headers + body
    then waits ~40 ms for the client's delayed ACK — measured: 45 ms per request, vs 0.4 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve(cfg: ControllerConfig, ps_transport: str, ps_address: str) -> None:
    """Blocks until SIGINT/SIGTERM. Port 0 binds a free port first, so the printed one is real."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind_listening_socket(cfg.host, cfg.port)
    port = int(sock.getsockname()[1])
    app = create_app(cfg, ps_transport, ps_address)
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
    config = uvicorn.Config(app, log_level="info", access_log=False, lifespan="on")
    try:
        _Server(config, port).run(sockets=[sock])
    finally:
        app.state.runtime.close()
        sock.close()
