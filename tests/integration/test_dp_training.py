"""DP on real training, in process: the clip bound holds on every update, ε comes from the accountant."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.training.dp import epsilon
from dist_llm_train.training.strategies import simulate, strategy_summary

pytestmark = pytest.mark.timeout(300)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
CLIP = 0.05  # below the typical gradient norm, so clipping really happens
BASE = {
    "batch_size": 8,
    "seq_length": 16,
    "num_samples": 4000,
    "eval_batches": 16,
    "num_workers": 4,
    "steps": 60,
    "enable_differential_privacy": True,
    "dp_clip": CLIP,
    "dp_noise_multiplier": 0.3,
}


def run(**keys: Any) -> tuple[Any, Any, float]:
    cfg = parse_config({"model": TINY, "training": {**BASE, **keys}})
    result, sources = simulate(cfg)
    return (
        cfg,
        (result, sources),
        sources[0].trainer.evaluate(np.array(result.params), cfg.training.eval_batches),
    )


def test_local_dp_clips_every_update_and_reports_the_accountants_epsilon() -> None:
    cfg, (result, sources), loss = run()
    for src in sources:
        dp = src.strategy.dp
        assert dp is not None
        assert dp.releases == 60  # one release per sync round
        assert dp.clipped == dp.releases  # every update was longer than the bound ...
        assert dp.max_sent_norm <= CLIP  # ... and none left the worker above it
    summary = strategy_summary(cfg.training, result.stats, [])
    assert summary["dp"]["releases"] == 60
    assert summary["dp"]["epsilon"] == pytest.approx(epsilon(0.3, 60, 1e-5))
    assert loss < 2.6  # z = 0.3 still trains (untrained: ~2.8)


def test_central_dp_clips_on_the_ps_and_noise_lowers_epsilon() -> None:
    cfg, (result, _), loss = run(dp_mode="central", dp_noise_multiplier=1.0)
    assert result.store is not None and result.stats is not None
    job = result.store.job_state("inprocess")
    assert job.central_dp is not None
    assert job.central_dp.max_clipped_norm <= CLIP
    counters = result.stats.counters
    assert counters["dp_releases"] == 60 and counters["dp_clipped_updates"] == 4 * 60
    noisy = strategy_summary(cfg.training, result.stats, [])["dp"]["epsilon"]
    quieter = parse_config({"model": TINY, "training": {**BASE, "dp_mode": "central"}}).training
    assert noisy < strategy_summary(quieter, result.stats, [])["dp"]["epsilon"]  # z=1.0 vs z=0.3
    assert loss < 2.6
