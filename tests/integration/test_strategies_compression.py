"""Codecs on real training, in process: top-k at 1 % with error feedback vs uncompressed vs no feedback."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.sim.numerics import TrainingResult, simulate_training

pytestmark = pytest.mark.timeout(300)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
BASE = {
    "batch_size": 8,
    "seq_length": 16,
    "num_samples": 4000,
    "eval_batches": 16,
    "num_workers": 2,
    "steps": 300,
}


def train(**keys: Any) -> tuple[float, TrainingResult]:
    cfg = parse_config({"model": TINY, "training": {**BASE, **keys}})
    result, sources = simulate_training(cfg)
    return sources[0].trainer.evaluate(np.array(result.params), cfg.training.eval_batches), result


def gradient_bytes(result: TrainingResult) -> int:
    assert result.stats is not None
    return result.stats.counters["bytes_received_gradient"]


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[float, TrainingResult]]:
    topk = {"compression": "topk", "compression_ratio": 0.01}
    return {
        "none": train(),
        "topk_ef": train(**topk),
        "topk_no_ef": train(**topk, error_feedback=False),
        "int8": train(compression="int8"),
    }


def test_topk_with_error_feedback_is_within_5_percent_at_50x_fewer_gradient_bytes(
    runs: dict[str, tuple[float, TrainingResult]],
) -> None:
    (plain, plain_run), (ef, ef_run) = runs["none"], runs["topk_ef"]
    assert abs(ef - plain) <= 0.05 * plain, (ef, plain)
    ratio = gradient_bytes(plain_run) / gradient_bytes(ef_run)
    assert ratio >= 50, ratio  # index bytes included: 6 bytes per kept coordinate at 1 %


def test_topk_without_error_feedback_is_measurably_worse(runs: dict[str, tuple[float, TrainingResult]]) -> None:
    (ef, ef_run), (no_ef, no_ef_run) = runs["topk_ef"], runs["topk_no_ef"]
    assert gradient_bytes(no_ef_run) == gradient_bytes(ef_run)  # same bytes, only the residual differs
    assert no_ef > ef + 0.1, (no_ef, ef)


def test_int8_is_4x_smaller_and_as_good(runs: dict[str, tuple[float, TrainingResult]]) -> None:
    (plain, plain_run), (q, q_run) = runs["none"], runs["int8"]
    assert abs(q - plain) <= 0.05 * plain
    assert 3.9 < gradient_bytes(plain_run) / gradient_bytes(q_run) <= 4.0
