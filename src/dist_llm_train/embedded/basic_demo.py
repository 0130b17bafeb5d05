"""`dist-llm-train demo-basic`: the control plane alone, no torch.

A real controller process and N lightweight workers that register, heartbeat, take tasks
and finish them, so the scheduling / heartbeat / failure-detection loops can be seen (and
tested) without any training.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dist_llm_train.config import Config
from dist_llm_train.controller.client import AsyncControllerClient, ControllerClient
from dist_llm_train.controller.models import JobIn, RegisterIn
from dist_llm_train.embedded.credentials import TOKEN_ENV, RunCredentials
from dist_llm_train.embedded.processes import ProcessGroup, cli_command, free_port
from dist_llm_train.worker.controller_api import ControllerAPI


async def _basic_worker(
    url: str, name: str, stop: asyncio.Event, done: dict[str, int], credentials: RunCredentials
) -> None:
    api = ControllerAPI(url, token=credentials.worker_env(name)[TOKEN_ENV], give_up_after_s=10)
    try:
        reply = await api.register(RegisterIn(name=name, memory_gb=8, flops=100, bandwidth_mbps=100))
        if reply.token:
            api.use_token(reply.token)
        wid, interval = reply.worker_id, reply.heartbeat_interval_s
        last_beat = 0.0
        while not stop.is_set():
            if time.monotonic() - last_beat >= interval:
                await api.heartbeat(wid, "idle")
                last_beat = time.monotonic()
            for task in (await api.assignments(wid)).tasks:
                await asyncio.sleep(0.05)  # the "work"
                await api.complete_task(task.task_id, worker_id=wid)
                done[name] = done.get(name, 0) + 1
            await asyncio.sleep(0.1)
    finally:
        await api.aclose()


async def _drive(
    url: str, workers: int, tasks: int, timeout_s: float, credentials: RunCredentials
) -> dict[str, Any]:
    stop = asyncio.Event()
    done: dict[str, int] = {}
    runners = [
        asyncio.create_task(_basic_worker(url, f"basic-{i}", stop, done, credentials)) for i in range(workers)
    ]
    started = time.monotonic()
    async with AsyncControllerClient(url, token=credentials.admin_token) as controller:
        job = await controller.submit_job(
            JobIn(name="demo-basic", config={"training": {"num_workers": workers}}, num_tasks=tasks)
        )
        state = "pending"
        while state not in ("completed", "failed", "cancelled") and time.monotonic() - started < timeout_s:
            await asyncio.sleep(0.2)
            state = (await controller.get_job(job.job_id)).state
        status = await controller.status()
    stop.set()
    await asyncio.gather(*runners, return_exceptions=True)
    return {
        "job_id": job.job_id,
        "job_state": state,
        "tasks": tasks,
        "tasks_completed_by_worker": done,
        "workers_seen": len(status.workers),
        "seconds": round(time.monotonic() - started, 2),
    }


def run_basic_demo(cfg: Config, workers: int, tasks: int, timeout_s: float = 60.0) -> dict[str, Any]:
    run_dir = Path("runs") / ("basic-" + time.strftime("%Y%m%d-%H%M%S"))
    procs = ProcessGroup(run_dir / "logs")
    credentials = RunCredentials()  # auth on, as in `run`
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        child = procs.start(
            "controller",
            cli_command(
                "serve", "controller", "--host", "127.0.0.1", "--port", str(port),
                "--ps-address", f"127.0.0.1:{free_port()}", "--scheduler", cfg.controller.scheduler,
                "--state-db", str(run_dir / "controller.db"),
            ),
            env=credentials.service_env(),
        )
        with ControllerClient(url, timeout_s=1) as probe:
            procs.wait_ready(child, lambda: probe.readyz().ready)
        return asyncio.run(_drive(url, workers, tasks, timeout_s, credentials))
    finally:
        procs.stop_all()
