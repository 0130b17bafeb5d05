"""The worker's side of link fidelity: report its shaped links, configured vs measured, in telemetry.

Two sources, one per way links are shaped:

* `ReportedLinks` — kernel shaping (Compose, Swarm): the link exporter beside the worker measures the path to the
  PS (to every shard of a sharded PS, one record each) and writes its records to a file (`--link-report-file`,
  netem/measure/path_report.py); the worker attaches them, with its own push goodput as the measured rate.
* `WorkerLinks` — the userspace relays (embedded runs, `--links-file`, the shaper's ports document). Every
  `interval_s` it sends one tiny request per traffic class through that class's own relay — GET /healthz for
  heartbeat, task and telemetry, a stats call to the parameter server for ps_sync — and its pushes give the
  ps_sync rate. The numbers are also `dlt_link_*` gauges on the worker's /metrics. See
  netem/measure/link_monitor.py for what each figure means.

Either way the `links` list rides on every telemetry record, so the controller's /status can show it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import statistics
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from dist_llm_train.controller.models import LinkReportIn
from dist_llm_train.netem.measure.link_monitor import WINDOW, LinkMonitor, Probe, push_goodput_bps
from dist_llm_train.netem.measure.path_report import read_reports
from dist_llm_train.worker.controller_api import ControllerAPI

if TYPE_CHECKING:
    from dist_llm_train.paramserver.transport.security import PSCredentials

log = logging.getLogger(__name__)
PROBE_JOB = "__dlt_link_probe__"
PROBE_MAX_MESSAGE_BYTES = 4 << 20


class ReportedLinks:
    """Link records measured beside the worker (the link exporter's report file), with the worker's push goodput
    as the ps_sync link's measured rate. With PS shards there is a ps_sync record per shard, and one push goes
    to all of them at once through the worker's one shaped egress: its goodput is the whole push's, put on the
    first record (the path to shard 0), the others' rate stays unmeasured. The file is re-read only when it
    changes; a record the controller would refuse is dropped here (with one warning), so it cannot cost the
    telemetry record it rides on."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rates_bps: deque[float] = deque(maxlen=WINDOW)
        self._stamp: tuple[int, int] | None = None
        self._records: list[dict[str, Any]] = []
        self._warned = False

    def _load(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._records  # not written yet (the exporter's first train is under way), or gone
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._stamp = (st.st_mtime_ns, st.st_size)
            try:
                raw = read_reports(self.path)
                self._records = [LinkReportIn.model_validate(r).model_dump() for r in raw]
            except (OSError, ValueError, ValidationError) as err:  # ValidationError is a ValueError; named anyway
                if not self._warned:
                    log.warning("ignoring the link report %s: %s", self.path, err)
                    self._warned = True
                self._records = []
        return self._records

    def annotate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Feed the record's push timing to the rate estimate and attach the current `links` list (none before
        the exporter's first report)."""
        records = self._load()
        ps_sync = next((r for r in records if r["traffic_class"] == "ps_sync"), None)
        push_s, push_bytes = record.get("push_time_s"), record.get("push_bytes")
        if push_s is not None and push_bytes is not None:
            rtt_ms = ps_sync["measured_rtt_ms"] if ps_sync else None
            rate = push_goodput_bps(int(push_bytes), float(push_s), (rtt_ms or 0.0) / 1000)
            if rate is not None:
                self._rates_bps.append(rate)
        if not records:
            return record
        rate_mbit = round(statistics.median(self._rates_bps) / 1e6, 4) if self._rates_bps else None
        links = [r | {"measured_rate_mbit": rate_mbit} if r is ps_sync else r for r in records]
        return {**record, "links": links}


class WorkerLinks:
    def __init__(self, monitor: LinkMonitor, api: ControllerAPI, interval_s: float = 5.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"link probe interval must be > 0, got {interval_s}")
        self.monitor = monitor
        self.interval_s = interval_s
        self._probes: dict[tuple[str, int], Probe] = {
            (cls, 0): functools.partial(api.ping, cls)
            for cls in ("heartbeat", "task", "telemetry")
            if cls in monitor.links
        }
        self._ps: list[Any] = []  # one probe client per PS shard, in shard order
        self._ps_lock = threading.Lock()

    @classmethod
    def from_file(
        cls, path: str, node: str, api: ControllerAPI, registry: CollectorRegistry, interval_s: float = 5.0
    ) -> WorkerLinks:
        return cls(LinkMonitor.from_file(path, node, registry), api, interval_s)

    def use_paramserver(
        self, transport: str, address: str, credentials: PSCredentials | None = None, job_id: str = PROBE_JOB
    ) -> None:
        """Probe ps_sync through `address` (the relay; with PS shards, every shard's relay, comma-separated in
        shard order, each probed on its own path) with clients of its own, separate from training's. The probe
        is a `GetStats` of `job_id`: a secured PS answers a worker's only for its own job."""
        from dist_llm_train.paramserver.transport.client import connect

        self.close_paramserver()
        with self._ps_lock:
            # Small messages only; the different limit also gives the probe a connection of its own (gRPC
            # shares one between channels with identical arguments), so it never waits behind a bulk push.
            self._ps = [
                connect(transport, shard.strip(), timeout_s=10.0, max_message_bytes=PROBE_MAX_MESSAGE_BYTES,
                        credentials=credentials)
                for shard in address.split(",")
            ]
        for index in range(len(self._ps)):
            self._probes[("ps_sync", index)] = self._stats_probe(index, job_id)

    def _stats_probe(self, index: int, job_id: str) -> Probe:
        first = [True]

        def stats_rtt() -> float | None:
            with self._ps_lock:
                if index >= len(self._ps):
                    raise RuntimeError("no parameter server client")
                t0 = time.perf_counter()
                self._ps[index].stats(job_id)
                elapsed = time.perf_counter() - t0
            fresh, first[0] = first[0], False
            return None if fresh else elapsed  # the first call also set the connection up

        async def probe() -> float | None:
            return await asyncio.to_thread(stats_rtt)

        return probe

    def close_paramserver(self) -> None:
        for key in [k for k in self._probes if k[0] == "ps_sync"]:
            del self._probes[key]
        with self._ps_lock:
            for client in self._ps:
                client.close()
            self._ps = []

    def annotate(self, record: dict[str, Any]) -> dict[str, Any]:
        """Feed the record's push timing to the rate estimate and attach the current `links` list."""
        push_s, push_bytes = record.get("push_time_s"), record.get("push_bytes")
        if push_s is not None and push_bytes is not None:
            self.monitor.add_push(int(push_bytes), float(push_s))
        return {**record, "links": self.monitor.reports()}

    async def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            await self.monitor.probe_once(self._probes)
            await asyncio.sleep(self.interval_s)
