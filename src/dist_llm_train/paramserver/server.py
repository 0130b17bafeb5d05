"""Run the parameter server: resume from checkpoints, serve one transport, stop cleanly.

`serve(cfg)` is what `dist-llm-train serve paramserver` and the container run; it returns
after SIGTERM/SIGINT once every job is checkpointed. `start_server(cfg)` is the same
start-up without the signal wait, for tests and benchmarks that stop it themselves.
This module (and everything it imports) must stay free of torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.core.credentials import TokenAuthority
from dist_llm_train.paramserver.checkpoint import Checkpointer, load_all
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.metrics import MetricsHTTPServer, PSMetrics
from dist_llm_train.paramserver.transport.grpc_server import GrpcServer
from dist_llm_train.paramserver.transport.security import ServerSecurity, TLSFiles
from dist_llm_train.paramserver.transport.zmq_server import ZmqServer

log = logging.getLogger(__name__)

MAX_TICK_S = 0.25  # straggler deadlines are checked at least this often


class _Transport(Protocol):
    port: int

    async def start(self) -> int: ...

    async def stop(self) -> None: ...


@dataclass
class RunningServer:
    cfg: ParamServerConfig
    store: ParameterStore
    metrics: PSMetrics
    transport: _Transport
    metrics_http: MetricsHTTPServer | None
    checkpointer: Checkpointer | None
    _ticker: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.port if self.metrics_http else None

    def checkpoint_now(self) -> None:
        """Write every job's checkpoint and wait until it is on disk."""
        if self.checkpointer is None:
            return
        for snap in self.store.snapshots():
            self.checkpointer.submit(snap)
        self.checkpointer.flush()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.transport.stop()
        if self.checkpointer is not None:
            await asyncio.to_thread(self.checkpoint_now)
            self.checkpointer.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        log.info("paramserver stopped")


async def _expire_rounds(store: ParameterStore) -> None:
    """Close sync rounds whose straggler timeout passed, sleeping until the next deadline."""
    while True:
        deadline = store.next_deadline()
        if (
            deadline is not None
            and deadline <= store.now()
            and await asyncio.to_thread(store.expire_rounds) > 0
        ):
            continue
        wait = MAX_TICK_S if deadline is None else min(MAX_TICK_S, max(deadline - store.now(), 0.001))
        await asyncio.sleep(wait)


def server_security(cfg: ParamServerConfig) -> ServerSecurity:
    """Tokens (and ZMQ CURVE) from the cluster secret, TLS from the certificate files; off when unset."""
    authority = TokenAuthority(cfg.cluster_secret) if cfg.cluster_secret else None
    tls = TLSFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert and cfg.tls_key else None
    return ServerSecurity(authority, tls)


async def start_server(cfg: ParamServerConfig, *, with_metrics: bool = True) -> RunningServer:
    max_bytes = cfg.max_message_mb << 20
    metrics = PSMetrics()
    checkpointer = Checkpointer(Path(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
    store = ParameterStore(
        max_bytes,
        observer=metrics,
        checkpoint_hook=checkpointer.submit if checkpointer else None,
        checkpoint_every=cfg.checkpoint_every,
    )
    if cfg.checkpoint_dir:
        for snap in load_all(Path(cfg.checkpoint_dir)):
            store.restore(snap)
            log.info(
                "resumed job %s at version %d from %s", snap.spec.job_id, snap.version, cfg.checkpoint_dir
            )
    transport: _Transport
    security = server_security(cfg)
    if cfg.transport == "grpc":
        transport = GrpcServer(
            store, metrics, cfg.host, cfg.port, cfg.chunk_bytes, max_bytes, security, reflection=cfg.reflection
        )
    else:
        transport = ZmqServer(store, metrics, cfg.host, cfg.port, max_bytes, security)
    await transport.start()
    metrics_http = MetricsHTTPServer(metrics, cfg.host, cfg.metrics_port) if with_metrics else None
    running = RunningServer(cfg, store, metrics, transport, metrics_http, checkpointer)
    running._ticker = asyncio.create_task(_expire_rounds(store), name="ps-straggler-ticker")
    return running


async def serve(cfg: ParamServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then checkpoint every job and exit."""
    running = await start_server(cfg)
    log.info(
        "paramserver ready transport=%s port=%d metrics_port=%s",
        cfg.transport,
        running.port,
        running.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("paramserver shutting down")
    finally:
        await running.stop()
