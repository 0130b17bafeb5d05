"""The worker's connection to the controller: `AsyncControllerClient`, set up the way a worker needs it.

- One connection pool per traffic class, each socket marked with its class's DSCP so kernel shapers can
  tell the classes apart on the wire (netem/profile/classes.py). `base_url` carries the task class (register,
  assignments, complete, fail); heartbeats and telemetry may go to other URLs (the shaper's per-class relays).
- Every call retries with capped exponential backoff while the controller is away, so a controller restart
  looks like a pause to the worker, not a crash; a stopping worker gives up at once instead of sitting in a
  two-minute retry loop for a controller that is gone.
- `ping`: the link-RTT probe (worker/links.py).
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from typing import Any

import httpx

from dist_llm_train.controller.client import AsyncControllerClient, ControllerTrafficClass, ControllerUnavailable, Retry
from dist_llm_train.controller.errors import Unauthorized, UnknownWorker
from dist_llm_train.netem.profile.classes import tos_byte

__all__ = ["ControllerAPI", "ControllerGone", "Unauthorized", "UnknownWorker"]

ControllerGone = ControllerUnavailable
"""What the agent catches: the controller did not answer within the retry budget, or the worker is stopping."""


def _dscp_marked_transport(traffic_class: ControllerTrafficClass) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_IP, socket.IP_TOS, tos_byte(traffic_class))])


class ControllerAPI(AsyncControllerClient):
    """The worker's controller client: DSCP-marked pools per traffic class, optional relays, retries, `ping`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        max_backoff_s: float = 5.0,
        give_up_after_s: float = 120.0,
        stop: threading.Event | None = None,
        heartbeat_url: str | None = None,
        telemetry_url: str | None = None,
    ) -> None:
        relays: dict[ControllerTrafficClass, str] = {}
        if heartbeat_url:
            relays["heartbeat"] = heartbeat_url
        if telemetry_url:
            relays["telemetry"] = telemetry_url
        super().__init__(
            base_url,
            token=token,
            retry=Retry(
                give_up_after_s=give_up_after_s,
                max_backoff_s=max_backoff_s,
                abandon=stop.is_set if stop is not None else None,
            ),
            class_urls=relays,
            transport_for=_dscp_marked_transport,
        )
        self._seen_streams: weakref.WeakSet[Any] = weakref.WeakSet()  # connections a probe has used

    async def ping(self, traffic_class: ControllerTrafficClass) -> float | None:
        """Seconds for one GET /healthz over `traffic_class`'s client (the worker's link-RTT probe), or None
        when it had to open a connection: that sample would include the TCP handshake, not just the link."""
        t0 = time.perf_counter()
        resp = await self._http(traffic_class).get("/healthz")  # no retry: a probe measures, it does not insist
        elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        stream = resp.extensions.get("network_stream")
        try:
            fresh = stream not in self._seen_streams
            self._seen_streams.add(stream)
        except TypeError:  # not weak-referenceable: cannot tell, so do not trust the sample
            return None
        return None if fresh else elapsed
