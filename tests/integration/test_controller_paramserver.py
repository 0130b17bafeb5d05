"""The controller against a real parameter server on loopback: membership reaches the PS.

The PS runs in this process (its servers are asyncio); the controller's notifier uses the
blocking client, so every tick runs in a thread, as it does under the real app.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from dist_llm_train.config import ControllerConfig, ParamServerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver.server import start_server
from dist_llm_train.paramserver.transport.client import connect


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
async def test_membership_follows_assignments_and_deaths_on_a_real_ps(transport: str) -> None:
    ps = await start_server(ParamServerConfig(port=0, transport=transport), with_metrics=False)
    clock = FakeClock()
    app = create_app(ControllerConfig(), transport, ps.address, clock=clock, run_background=False)
    runtime = app.state.runtime
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl")
    psc = connect(transport, ps.address, timeout_s=5)
    try:
        ids = []
        for name in ("a", "b"):
            ids.append((await client.post("/v1/workers/register", json={"name": name})).json()["worker_id"])
        job = (await client.post("/v1/jobs", json={"name": "j", "config": {}, "num_tasks": 2})).json()
        jid = job["job_id"]
        report = await asyncio.to_thread(runtime.detector.tick)
        assert report.membership.waiting == [jid]  # no worker has created the job on the PS yet

        spec = JobSpec.from_wire(WireJobSpec(job_id=jid, total_steps=10))
        params = np.zeros(4, dtype=np.float32)
        await asyncio.to_thread(psc.init_job, spec, [TensorSpec("w", (4,), 0)], params, [])
        report = await asyncio.to_thread(runtime.detector.tick)
        assert report.membership.sent == {jid: sorted(ids)}
        stats = await asyncio.to_thread(psc.stats, jid)
        assert sorted(stats[0].members) == sorted(ids)

        clock.t += 2.0
        await client.post(f"/v1/workers/{ids[0]}/heartbeat", json={})
        clock.t += 2.0  # b silent for 4 s > 3 s
        report = await asyncio.to_thread(runtime.detector.tick)
        assert report.dead == [ids[1]]
        stats = await asyncio.to_thread(psc.stats, jid)
        assert stats[0].members == [ids[0]]

        await ps.stop()  # PS gone: the controller counts the failure and keeps working
        assert (await client.post(f"/v1/jobs/{jid}/cancel")).status_code == 200  # membership must change
        report = await asyncio.to_thread(runtime.detector.tick)
        assert list(report.membership.failed) == [jid]
        assert (await client.get("/status")).json()["counters"]["ps_notify_failures"] >= 1
        assert (await client.get("/readyz")).status_code == 200
    finally:
        psc.close()
        await client.aclose()
        runtime.close()
        await ps.stop()


async def test_status_shows_the_ps_view_of_each_worker() -> None:
    """/status reports each worker's staleness bound and acceptance as the PS records them, not only the config."""
    ps = await start_server(ParamServerConfig(port=0, transport="grpc"), with_metrics=False)
    clock = FakeClock()
    app = create_app(ControllerConfig(), "grpc", ps.address, clock=clock, run_background=False)
    runtime = app.state.runtime
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl")
    psc = connect("grpc", ps.address, timeout_s=5)
    try:
        wid = (await client.post("/v1/workers/register", json={"name": "a"})).json()["worker_id"]
        body = {"name": "j", "config": {"training": {"mode": "async", "max_staleness": 7}}, "num_tasks": 1}
        jid = (await client.post("/v1/jobs", json=body)).json()["job_id"]
        await client.get(f"/v1/workers/{wid}/assignments")
        before = (await client.get("/status")).json()["workers"][0]
        assert before["staleness_source"] == "config" and before["staleness_bound"] == 7

        spec = JobSpec.from_wire(WireJobSpec(job_id=jid, mode="async", max_staleness=7, total_steps=10))
        await asyncio.to_thread(psc.init_job, spec, [TensorSpec("w", (4,), 0)], np.zeros(4, np.float32), [wid])
        header = PushHeader(job_id=jid, worker_id=wid, step=1, base_version=0, payload_bytes=16, num_samples=1)
        await asyncio.to_thread(psc.push, header, np.ones(4, np.float32).tobytes())
        await asyncio.to_thread(runtime.detector.tick)
        clock.t += 5.0
        await client.post(f"/v1/workers/{wid}/heartbeat", json={})
        await asyncio.to_thread(runtime.detector.tick)
        after = (await client.get("/status")).json()["workers"][0]
        assert after["staleness_source"] == "paramserver"
        assert after["pushes"] == 1 and after["acceptance_rate"] == 1.0
        assert after["staleness_bound"] == 7
    finally:
        psc.close()
        await client.aclose()
        runtime.close()
        await ps.stop()
