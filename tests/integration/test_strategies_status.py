"""/status shows each job's strategy and the privacy spent so far; impossible strategies are a 422."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.core.privacy import epsilon


class Notifier:
    def set_members(self, job_id: str, members: list[str]) -> list[str]:
        return members

    def close(self) -> None:
        pass


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ControllerConfig(), "grpc", "127.0.0.1:59999", Notifier(), run_background=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as c:
        yield c
    app.state.runtime.close()


async def test_status_reports_strategy_and_epsilon(client: httpx.AsyncClient) -> None:
    training = {
        "steps": 40,
        "num_workers": 5,
        "aggregation_rule": "krum",
        "byzantine_f": 1,
        "enable_differential_privacy": True,
        "dp_noise_multiplier": 1.3,
        "dp_clip": 0.5,
    }
    r = await client.post("/v1/jobs", json={"name": "dp", "config": {"training": training}, "num_tasks": 1})
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    wid = (await client.post("/v1/workers/register", json={"name": "w0"})).json()["worker_id"]
    record = {
        "job_id": job_id,
        "step": 7,
        "ps_version": 5,
        "loss": 2.0,
        "step_time_s": 0.1,
        "samples_per_s": 1.0,
        "tokens_per_s": 1.0,
        "bytes_sent": 10,
        "bytes_received": 10,
        "wall_time": 1.0,
    }
    assert (await client.post(f"/v1/workers/{wid}/telemetry", json=record)).status_code == 204
    job = next(j for j in (await client.get("/status")).json()["jobs"] if j["job_id"] == job_id)
    st = job["strategy"]
    assert (st["strategy"], st["aggregation"], st["aggregation_params"]) == ("sync", "krum", {"f": 1.0})
    dp = st["dp"]
    assert dp["releases"] == 7  # the most updates any worker sent (its step), not the PS version (5)
    assert dp["epsilon"] == pytest.approx(epsilon(1.3, 7, 1e-5))
    assert dp["planned_epsilon"] == pytest.approx(epsilon(1.3, 40, 1e-5))


async def test_job_with_too_few_workers_for_its_rule_is_refused(client: httpx.AsyncClient) -> None:
    training = {"num_workers": 4, "aggregation_rule": "bulyan", "byzantine_f": 1}
    r = await client.post("/v1/jobs", json={"name": "b", "config": {"training": training}})
    assert r.status_code == 422
    assert "4f+3 = 7 (f=1) workers, got n=4" in r.json()["detail"]
