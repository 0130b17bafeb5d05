"""Run a parameter server on its own event-loop thread inside the current process.

For tests and benchmarks of code that talks to a PS (workers, the controller's membership
sync) without spawning a process:

    with BackgroundServer(ParamServerConfig(port=0, metrics_port=0, transport="zmq")) as ps:
        client = connect("zmq", ps.address)
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from types import TracebackType
from typing import Any

from dist_llm_train.config import ParamServerConfig
from dist_llm_train.paramserver.server import RunningServer, start_server


class BackgroundServer:
    def __init__(
        self, cfg: ParamServerConfig, *, with_metrics: bool = True, start_timeout_s: float = 30.0
    ) -> None:
        self.cfg = cfg
        self._with_metrics = with_metrics
        self._timeout = start_timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ps-background", daemon=True)
        self._running: RunningServer | None = None

    @property
    def server(self) -> RunningServer:
        if self._running is None:
            raise RuntimeError("server not started")
        return self._running

    @property
    def address(self) -> str:
        return self.server.address

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(self._timeout)

    def start(self) -> BackgroundServer:
        self._thread.start()
        try:
            self._running = self.call(start_server(self.cfg, with_metrics=self._with_metrics))
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving (checkpointing every job if a checkpoint_dir is set) and end the thread."""
        if self._running is not None:
            self.call(self._running.stop())
            self._running = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=self._timeout)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
