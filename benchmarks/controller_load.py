"""Controller under a fleet of heartbeating workers: latency, CPU share and false deaths at 500 / 1,000 / 10,000.

A real controller process (`controller.server.serve`, SQLite file in a temporary directory, no jobs, so the
parameter server is never called) on loopback, and in this process N simulated workers: each registers, then
heartbeats on its own keep-alive connection at the interval the controller tells it (the register reply, and
from then on each heartbeat reply when it carries one), released by deadline like `worker.agent` (or, with
`--pacing after-reply`, sleeping a full interval after each reply, as the agent did before). The workers speak
HTTP/1.1 over asyncio streams directly: an httpx client per simulated worker costs more CPU than the
controller, and on a 2-core machine the load generator must not be what saturates. Meanwhile one reader asks
`GET /status` (full document, then `?workers=summary` and a first page `?limit=100` when the controller knows
them) twice a second, the full document every 5 s.

Per fleet size, after every worker has registered and a warm-up, one measurement window:
* heartbeat round trip p50 / p99 (ms), as a worker sees it (connect, when the server closed an idle
  connection, included);
* `/status` round trip p50 / p99 and body size, per mode;
* the controller's CPU share (cores: its user + system time over the window / wall time), and this process's;
* false deaths: `dlt_controller_worker_deaths` at the end (no simulated worker ever stops, so every death is
  false), and the heartbeat interval the controller ended up telling the fleet.

Nothing leaves loopback; every fleet is bounded by its window and the run stops by itself.

With `--baseline-src DIR` (another checkout's `src`, e.g. the commit before a change) every fleet size is also
measured against a controller running that code, right after the current one, so both rows saw the same machine;
`controller_cpu_us_per_heartbeat` (controller CPU over heartbeats served) is the figure least moved by other load,
and the `*_ratio` keys compare the two.

    python benchmarks/controller_load.py [--quick] [--workers 500 1000 10000] [--window 30] [--label NAME]
                                         [--baseline-src DIR] [--pacing deadline|after-reply]

Writes results/controller_load[_LABEL].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 240
READY_TIMEOUT_S = 60.0
TARGETS = {"heartbeat_p99_ms_at_1000": 50.0, "status_p99_ms_at_1000": 100.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")
FULL_STATUS_EVERY = 10
"""The full document is asked every 10th round (every 5 s, a dashboard's refresh), the summary and a page of 100
every round (twice a second): at 1,000 workers building the full 320 KB document twice a second costs the event
loop enough (the build holds the GIL) to push the heartbeat p99 from 17 ms to ~570 ms (measured, load 1.7)."""

LAUNCH = r"""
import logging, sys
from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.server import serve
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
logging.getLogger("dist_llm_train.controller.server").setLevel(logging.INFO)
serve(ControllerConfig(host="127.0.0.1", port=0, state_db=sys.argv[1]), "grpc", "127.0.0.1:9")
"""

RENDER = r"""
import asyncio, json, statistics, sys, tempfile, time, os
import httpx
from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app

class Notifier:
    def set_members(self, job_id, members): return members
    def close(self): pass

async def main(size, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(ControllerConfig(state_db=os.path.join(tmp, "c.db")), "grpc", "127.0.0.1:9", Notifier(),
                         run_background=False)
        out = {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ctl") as client:
            for i in range(size):
                body = {"name": f"w{i:05d}", "labels": {"zone": str(i % 3)}}
                r = await client.post("/v1/workers/register", json=body)
                assert r.status_code == 200, r.text
            modes = (("full", "/status"), ("summary", "/status?workers=summary"), ("page", "/status?limit=100"))
            for mode, path in modes:
                cpu = []
                for _ in range(repeats):
                    t0 = time.process_time()
                    r = await client.get(path)
                    cpu.append((time.process_time() - t0) * 1e3)
                    assert r.status_code == 200
                out[mode] = {"cpu_ms_median": round(statistics.median(cpu), 2), "bytes": len(r.content)}
        app.state.runtime.close()
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""
"""Controller CPU to answer `/status` in-process (ASGI, no sockets, no heartbeats): the cost of the document itself,
which moves least with other load. Run in a child so `--baseline-src` can point it at another checkout."""


def measure_render_cpu(size: int, repeats: int, src: str | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src) if src else None
    out = subprocess.run([sys.executable, "-c", RENDER, str(size), str(repeats)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- a minimal HTTP/1.1 keep-alive client ------------------------------------------------------------------
class Connection:
    """One keep-alive connection; a request the server closed under us (idle timeout) is sent again once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                await self._open()
            try:
                return await self._exchange(method, path, body)
            except (asyncio.IncompleteReadError, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        headers = await self.reader.readuntil(b"\r\n\r\n")
        status = int(headers[9:12])
        match = re.search(rb"(?i)content-length:\s*(\d+)", headers)
        payload = await self.reader.readexactly(int(match.group(1))) if match else b""
        if re.search(rb"(?i)connection:\s*close", headers):
            self.close()
        return status, payload


# -- the fleet ---------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    port: int
    pacing: str
    measuring: bool = False
    heartbeat_ms: list[float] = field(default_factory=list)
    errors: int = 0
    intervals: dict[str, float] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, index: int, registered: asyncio.Semaphore, counter: list[int]) -> None:
        conn = Connection(self.port)
        name = f"load-{index:05d}"
        async with registered:
            status, body = await conn.request("POST", "/v1/workers/register", json.dumps({"name": name}).encode())
        if status != 200:
            raise RuntimeError(f"register {name}: HTTP {status} {body[:200]!r}")
        reply = json.loads(body)
        worker_id, interval = reply["worker_id"], float(reply["heartbeat_interval_s"])
        counter[0] += 1
        path = f"/v1/workers/{worker_id}/heartbeat"
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    status, body = await conn.request("POST", path, b'{"state":"idle"}')
                except (OSError, asyncio.IncompleteReadError):
                    status, body = 0, b""
                took = (time.perf_counter() - start) * 1e3
                if status == 200:
                    interval = float(json.loads(body).get("heartbeat_interval_s", interval))
                    self.intervals[worker_id] = interval
                elif self.measuring:
                    self.errors += 1
                if self.measuring:
                    self.heartbeat_ms.append(took)
                if self.pacing == "deadline":
                    next_beat = max(next_beat + interval, loop.time())
                    delay = next_beat - loop.time()
                else:  # the old agent: a full interval after each reply
                    delay = interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
        finally:
            conn.close()


async def _status_reader(
    port: int, fleet: Fleet, samples: dict[str, list[tuple[float, int]]], full_every: int = FULL_STATUS_EVERY
) -> None:
    conn = Connection(port)
    modes = {"full": "/status", "summary": "/status?workers=summary", "page": "/status?limit=100"}
    rounds = 0
    try:
        while not fleet.stop.is_set():
            rounds += 1
            for mode, path in modes.items():
                if mode == "full" and (rounds - 1) % full_every != 0:
                    continue
                start = time.perf_counter()
                status, body = await conn.request("GET", path)
                took = (time.perf_counter() - start) * 1e3
                if status == 200 and fleet.measuring:
                    samples.setdefault(mode, []).append((took, len(body)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fleet.stop.wait(), timeout=0.5)
    finally:
        conn.close()


async def _metric(port: int, name: str) -> float:
    conn = Connection(port)
    try:
        _, body = await conn.request("GET", "/metrics")
    finally:
        conn.close()
    match = re.search(rf"^{name}(?:_total)?\s+([0-9.e+]+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start_controller(db: str, src: str | None) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=src) if src else None
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, db], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"controller ready port=(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError("controller did not start")


async def measure_fleet(
    size: int,
    window_s: float,
    warmup_s: float,
    pacing: str,
    src: str | None = None,
    full_every: int = FULL_STATUS_EVERY,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlt-ctl-load-") as tmp:
        proc, port = _start_controller(str(Path(tmp) / "controller.db"), src)
        # Drain the controller's log so a full pipe never blocks it.
        drain = asyncio.get_running_loop().run_in_executor(None, lambda: proc.stderr and proc.stderr.read())
        fleet = Fleet(port, pacing)
        registered = [0]
        try:
            began = time.perf_counter()
            gate = asyncio.Semaphore(64)  # 64 registrations in flight at most
            workers = [asyncio.create_task(fleet.worker(i, gate, registered)) for i in range(size)]
            while registered[0] < size:
                await asyncio.sleep(0.2)
                failed = [t for t in workers if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
            register_s = time.perf_counter() - began
            status_samples: dict[str, list[tuple[float, int]]] = {}
            reader = asyncio.create_task(_status_reader(port, fleet, status_samples, full_every))
            await asyncio.sleep(warmup_s)
            deaths_before = await _metric(port, "dlt_controller_worker_deaths")
            cpu0, own0, wall0 = _cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
            fleet.measuring = True
            await asyncio.sleep(window_s)
            fleet.measuring = False
            cpu1, own1, wall1 = _cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
            deaths = await _metric(port, "dlt_controller_worker_deaths")
            fleet.stop.set()
            await asyncio.gather(reader, *workers, return_exceptions=True)
        finally:
            fleet.stop.set()
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(Exception):
                await drain
    wall = wall1 - wall0
    hb = fleet.heartbeat_ms
    row: dict[str, Any] = {
        "workers": size,
        "pacing": pacing,
        "register_s": round(register_s, 1),
        "heartbeats_per_s": round(len(hb) / wall, 1),
        "heartbeat_p50_ms": round(_pct(hb, 0.5), 2),
        "heartbeat_p99_ms": round(_pct(hb, 0.99), 2),
        "heartbeat_max_ms": round(max(hb, default=float("nan")), 1),
        "heartbeat_errors": fleet.errors,
        "interval_told_s": round(statistics.median(fleet.intervals.values()), 2) if fleet.intervals else None,
        "controller_cpu_cores": round((cpu1 - cpu0) / wall, 3),
        "controller_cpu_us_per_heartbeat": round((cpu1 - cpu0) / max(len(hb), 1) * 1e6),
        "loadgen_cpu_cores": round((own1 - own0) / wall, 3),
        "false_deaths": int(deaths) if deaths == deaths else None,
        "false_deaths_during_window": int(deaths - deaths_before) if deaths == deaths else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    full_body = None
    for mode, samples in status_samples.items():
        times = [t for t, _ in samples]
        row[f"status_{mode}_p50_ms"] = round(_pct(times, 0.5), 1)
        row[f"status_{mode}_p99_ms"] = round(_pct(times, 0.99), 1)
        row[f"status_{mode}_bytes"] = samples[-1][1]
        row[f"status_{mode}_samples"] = len(samples)
        if mode == "full":
            full_body = samples[-1][1]
    if full_body and row.get("status_summary_bytes"):
        row["status_summary_over_full_bytes_ratio"] = round(row["status_summary_bytes"] / full_body, 4)
    return row


def _markdown(result: dict[str, Any]) -> str:
    rows = result["results"]
    cols = ["workers", "code", "interval_told_s", "heartbeats_per_s", "heartbeat_p50_ms", "heartbeat_p99_ms",
            "controller_cpu_cores", "controller_cpu_us_per_heartbeat", "false_deaths", "status_full_p99_ms",
            "status_full_samples", "status_full_bytes", "status_summary_p99_ms", "status_summary_bytes",
            "status_page_p99_ms", "loadgen_cpu_cores"]
    lines = [f"# Controller under load ({result['label'] or 'current'})", "",
             f"Window {result['window_s']} s per fleet after a {result['warmup_s']} s warm-up; pacing "
             f"`{result['pacing']}`; full `/status` every {result.get('full_status_every_rounds', FULL_STATUS_EVERY)} "
             f"round(s) of 0.5 s; machine: {result['machine']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in [*rows, *result.get("baseline", [])]:
        lines.append("| " + " | ".join(str(r.get(c, "this checkout" if c == "code" else "-")) for c in cols) + " |")
    lines += ["", f"Load average at the end of each window: {[r['loadavg_1m'] for r in rows]} (this checkout)."]
    for entry in result.get("status_render_cpu", []):
        mine, base = entry["this_checkout"], entry.get("baseline")
        lines.append(
            f"- `/status` CPU in-process at {entry['workers']} workers (median of 20): full "
            f"{mine['full']['cpu_ms_median']} ms"
            + (f" vs baseline {base['full']['cpu_ms_median']} ms (ratio {entry['full_cpu_vs_baseline_ratio']})"
               if base else "")
            + f", summary {mine['summary']['cpu_ms_median']} ms, page of 100 {mine['page']['cpu_ms_median']} ms."
        )
    lines += ["", "Targets: " + ", ".join(f"{k} < {v}" for k, v in TARGETS.items()) + ", 0 false deaths.", ""]
    for k, v in result.get("meets_target", {}).items():
        lines.append(f"- {k}: {'met' if v else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[500, 1000, 10000])
    ap.add_argument("--window", type=float, default=30.0, help="Measurement window per fleet (s).")
    ap.add_argument("--warmup", type=float, default=5.0, help="Seconds after registration before measuring.")
    ap.add_argument("--pacing", choices=["deadline", "after-reply"], default="deadline")
    ap.add_argument("--quick", action="store_true", help="500 and 1,000 workers, 15 s windows.")
    ap.add_argument("--label", default="", help="Suffix of the result files (e.g. 'before').")
    ap.add_argument("--baseline-src", help="Also measure a controller running this src directory (side by side).")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument(
        "--full-status-every",
        type=int,
        default=FULL_STATUS_EVERY,
        help="Ask the full /status every Nth round of 0.5 s (1: twice a second, enough samples for its p99).",
    )
    ap.add_argument(
        "--render-cpu",
        action="store_true",
        help="Also measure the CPU of one /status answer in-process (median of 20, per mode), side by side with "
        "--baseline-src when given.",
    )
    args = ap.parse_args()
    if args.full_status_every < 1:
        ap.error("--full-status-every must be at least 1")
    if args.quick:
        args.workers, args.window, args.warmup = [500, 1000], 15.0, 4.0
    from dist_llm_train.experiments.machine import describe_machine, machine_info

    rows, baseline = [], []
    for size in args.workers:
        row = asyncio.run(measure_fleet(size, args.window, args.warmup, args.pacing, None, args.full_status_every))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.baseline_src:
            base = asyncio.run(
                measure_fleet(size, args.window, args.warmup, args.pacing, args.baseline_src, args.full_status_every)
            )
            base["code"] = f"baseline ({args.baseline_src})"
            print(json.dumps(base), flush=True)
            baseline.append(base)
            for key in ("heartbeat_p99_ms", "controller_cpu_us_per_heartbeat", "status_full_p99_ms"):
                if row.get(key) and base.get(key):
                    row[f"{key}_vs_baseline_ratio"] = round(row[key] / base[key], 3)
    render: list[dict[str, Any]] = []
    if args.render_cpu:
        for size in args.workers:
            entry: dict[str, Any] = {"workers": size, "this_checkout": measure_render_cpu(size, 20)}
            if args.baseline_src:
                entry["baseline"] = measure_render_cpu(size, 20, args.baseline_src)
                entry["full_cpu_vs_baseline_ratio"] = round(
                    entry["this_checkout"]["full"]["cpu_ms_median"] / entry["baseline"]["full"]["cpu_ms_median"], 3
                )
            print(json.dumps(entry), flush=True)
            render.append(entry)
    at_1000 = next((r for r in rows if r["workers"] == 1000), None)
    meets: dict[str, bool] = {}
    if at_1000 is not None:
        meets["heartbeat_p99_at_1000_meets_target"] = at_1000["heartbeat_p99_ms"] < TARGETS["heartbeat_p99_ms_at_1000"]
        meets["status_p99_at_1000_meets_target"] = (
            at_1000.get("status_full_p99_ms", float("inf")) < TARGETS["status_p99_ms_at_1000"]
        )
    for r in rows:
        meets[f"no_false_deaths_at_{r['workers']}_meets_target"] = r["false_deaths"] == 0
    result = {
        "benchmark": "controller_load",
        "label": args.label,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "pacing": args.pacing,
        "full_status_every_rounds": args.full_status_every,
        "machine": describe_machine(),
        "machine_info": machine_info(),
        "results": rows,
        "baseline": baseline,
        "status_render_cpu": render,
        "meets_target": meets,
    }
    stem = "controller_load" + (f"_{args.label}" if args.label else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
