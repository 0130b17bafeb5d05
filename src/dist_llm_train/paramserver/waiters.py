"""Wake pulls that wait for a version, whether they block a thread or await on a loop.

The gRPC and ZMQ servers wait with asyncio (a waiting sync worker must not pin an executor
thread: a barrier of N workers would starve the pool), while pushes that publish a new
version run in executor threads. So publishing notifies both a `threading.Condition` and
any registered asyncio futures, each through its own loop's `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class VersionWaiters:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._futures: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def notify_locked(self) -> None:
        """Call with the lock held after the version (or completion) changed."""
        self._cond.notify_all()
        futures, self._futures = self._futures, []
        for loop, fut in futures:
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(_wake, fut)

    def wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Block the calling thread until ready() (checked under the lock) or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    async def wait_async(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Await until ready() or the timeout, without holding a thread."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if ready():
                    return
                self._futures.append((loop, fut))
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    return
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return
            finally:
                with self._lock:
                    self._futures = [(lp, f) for lp, f in self._futures if f is not fut]
