"""The heartbeat book and the adaptive interval (controller/heartbeats.py), and the worker's fixed-rate schedule."""

from __future__ import annotations

import asyncio
import time

import pytest

from dist_llm_train.controller.heartbeats import HeartbeatBook, interval_for
from dist_llm_train.worker.agent import next_due


@pytest.mark.parametrize(
    ("fleet", "expected"),
    [(0, 1.0), (1000, 1.0), (1001, 2.0), (2000, 2.0), (10_000, 10.0), (10_001, 11.0), (10**9, 300.0)],
)
def test_interval_grows_in_whole_steps_to_keep_the_rate_under_the_budget(fleet: int, expected: float) -> None:
    interval = interval_for(fleet, 1.0, 1000.0)
    assert interval == expected
    assert fleet / interval <= 1000.0 or interval == 300.0


def test_no_budget_means_a_fixed_interval() -> None:
    assert interval_for(10**6, 0.5, None) == 0.5


def test_only_admitted_workers_take_the_fast_path() -> None:
    book = HeartbeatBook()
    assert not book.beat("w1", 10.0, 1.0, "idle") and book.take_dirty() == []
    book.admit("w1", 10.0, 1.0)
    assert book.take_dirty() == []  # the store already has the registration
    assert book.beat("w1", 11.0, 1.0, "training")
    assert book.beat("w1", 10.5, 1.0, None)  # a late-arriving older beat never moves the time back
    assert book.take_dirty() == [("w1", 11.0, "training")]
    assert book.take_dirty() == []


def test_a_worker_is_dead_only_past_the_interval_it_was_told() -> None:
    book = HeartbeatBook()
    book.admit("slow", 100.0, 10.0)  # told 10 s when the fleet was large
    # The fleet shrank (current timeout 3 s) but this worker may still wait 10 s between beats.
    assert not book.forget_if_silent("slow", 100.0, 125.0, 3, 3.0)
    assert book.forget_if_silent("slow", 100.0, 130.5, 3, 3.0)
    assert book.get("slow") is None
    # A worker this process never heard is judged by its stored time and the current timeout.
    assert not book.forget_if_silent("other", 100.0, 102.0, 3, 3.0)
    assert book.forget_if_silent("other", 100.0, 103.5, 3, 3.0)
    # The store's time counts when newer than the book's (beats written by someone else, e.g. the simulator).
    book.admit("w", 0.0, 1.0)
    assert not book.forget_if_silent("w", 50.0, 52.0, 3, 3.0)


def test_next_beat_is_due_one_interval_after_the_last_was_due() -> None:
    assert next_due(10.0, 1.0, 10.3) == 11.0  # a 0.3 s reply does not stretch the period
    assert next_due(10.0, 1.0, 12.5) == 12.5  # overdue: at once, and no burst to catch up


async def test_the_heartbeat_loop_keeps_its_rate_when_replies_are_slow() -> None:
    """Replies take half the interval; sleeping a full interval after each would make the period 1.5×."""
    from dist_llm_train.worker.agent import WorkerAgent, WorkerOptions

    interval, reply_s = 0.2, 0.1
    starts: list[float] = []

    class SlowAPI:
        async def heartbeat(self, worker_id: str, state: str) -> object:
            starts.append(time.perf_counter())
            await asyncio.sleep(reply_s)
            return type("Reply", (), {"heartbeat_interval_s": interval})()

    agent = WorkerAgent(WorkerOptions(controller_url="http://127.0.0.1:9", name="w"))
    await agent.api.aclose()
    agent.api = SlowAPI()  # type: ignore[assignment]
    agent.worker_id, agent.heartbeat_interval_s = "w-1", interval
    loop_task = asyncio.create_task(agent._heartbeat_loop())
    await asyncio.sleep(12 * interval)
    agent.stop.set()
    loop_task.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)
    periods = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(periods) >= 5
    # A late wake-up is made up by the next, shorter sleep, so the mean holds even on a busy machine;
    # the old schedule would give interval + reply_s = 0.3 s.
    assert sum(periods) / len(periods) < interval + reply_s / 2, periods


def test_a_lagging_controller_doubles_the_interval_and_halves_it_once_calm() -> None:
    from dist_llm_train.controller.heartbeats import LoopLoad

    load = LoopLoad(window_s=5.0, calm_s=10.0, max_factor=4, min_samples=20)
    t = 0.0

    def feed(lag: float, until: float, interval: float) -> None:
        nonlocal t
        while t < until:
            t = round(t + 0.1, 6)
            load.observe(lag, t, interval)

    load.observe(0.9, 0.0, 1.0)  # one stall: the detector's grace, not a slower fleet
    assert load.factor == 1 and load.lag_s() == 0.9
    feed(0.3, 2.0, 1.0)  # sustained: over a quarter of the 1 s interval
    assert load.factor == 2
    feed(0.6, 5.0, 2.0)
    assert load.factor == 2  # at most once per window: the workers have not all heard of 2 s yet
    feed(0.6, 7.5, 2.0)
    assert load.factor == 4
    feed(5.0, 20.0, 4.0)
    assert load.factor == 4 and load.lag_s() == 5.0  # capped; the lag is still the detector's grace
    feed(0.01, 25.5, 4.0)  # the 5 s lag ages out of the window
    assert load.factor == 4 and load.lag_s() == 0.01
    feed(0.01, 35.6, 4.0)  # calm (under a twentieth of the interval) for 10 s: halve
    assert load.factor == 2


def test_the_controllers_own_lateness_is_not_counted_against_a_worker() -> None:
    book = HeartbeatBook()
    book.admit("w", 100.0, 1.0)
    assert book.forget_if_silent("w", 100.0, 104.0, 3, 3.0, grace_s=0.0)
    book.admit("w", 100.0, 1.0)
    assert not book.forget_if_silent("w", 100.0, 104.0, 3, 3.0, grace_s=1.5)


async def test_the_loop_watch_feeds_the_load_gauge() -> None:
    from dist_llm_train.controller.heartbeats import LoopLoad, watch_loop

    load = LoopLoad()
    task = asyncio.create_task(watch_loop(load, lambda: 1.0, time.monotonic, period_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # the loop is blocked: the next wake-up is ~0.3 s late
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert load.lag_s() >= 0.25 and load.factor == 1  # one stall is grace, not a slower fleet
