"""Centered clipping, bucketing and NNM on real training at n = 11 under ALIE and small-ε IPM (issue 13), and the
rules running on what the PS decodes: compressed gradients and DiLoCo pseudo-gradients."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.core.aggregation import Aggregator
from dist_llm_train.paramserver import job as ps_job
from dist_llm_train.sim.numerics import simulate_training

pytestmark = pytest.mark.timeout(600)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
BASE = {"batch_size": 8, "seq_length": 16, "num_samples": 4000, "eval_batches": 16}
N, F, STEPS = 11, 2, 40
NEW_RULES: dict[str, dict[str, Any]] = {
    "centered_clipping": {"rule": "centered_clipping", "iterations": 3},
    "median+bucketing": {"rule": "median", "bucketing": 2, "bucket_seed": 0},
    "krum+nnm": {"rule": "krum", "nnm": True},
}
ATTACKS = {"alie": {"name": "alie"}, "ipm": {"name": "ipm", "params": {"epsilon": 0.1}}}


def config(aggregation: dict[str, Any], attack: dict[str, Any] | None, **training: Any) -> Any:
    keys: dict[str, Any] = {**BASE, "num_workers": N, "steps": STEPS, "aggregation": {**aggregation, "f": F},
                            **training}
    if attack is not None:
        keys["attack"] = {**attack, "attackers": F}
    return parse_config({"model": TINY, "training": keys})


@functools.cache
def losses(rule: str, attack: str | None) -> tuple[float, float]:
    """(initial, final) held-out loss of the global model."""
    aggregation = NEW_RULES.get(rule, {"rule": rule})
    cfg = config(aggregation, ATTACKS[attack] if attack else None)
    result, sources = simulate_training(cfg)
    trainer = sources[0].trainer
    final = trainer.evaluate(np.array(result.params), cfg.training.eval_batches)
    return float(result.losses[0]) if result.losses else float("nan"), final


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("rule", sorted(NEW_RULES))
def test_new_rule_converges_under_attack(rule: str, attack: str) -> None:
    _, clean_mean = losses("mean", None)
    _, clean = losses(rule, None)
    _, attacked = losses(rule, attack)
    # Training happened (the model's untrained loss on this corpus is ~2.8 nats) and the attack did not undo it:
    # within 5 % of the rule's own clean run and of the clean mean.
    assert clean < 2.3 and attacked < 2.3, (clean, attacked)
    assert attacked <= 1.05 * clean, (rule, attack, clean, attacked)
    assert attacked <= 1.05 * clean_mean, (rule, attack, clean_mean, attacked)


class Spy(Aggregator):
    """Records what the rule receives, then lets it aggregate."""

    name = "spy"

    def __init__(self, inner: Aggregator, seen: list[np.ndarray]) -> None:
        self.inner, self.seen = inner, seen
        self.transforms_single = inner.transforms_single

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(x))
        return self.inner.aggregate(x)


@pytest.mark.parametrize(
    "update,training",
    [
        ("int8", {"codec": {"name": "int8", "int8_chunk": 256}}),
        ("topk_ef", {"codec": {"name": "topk", "ratio": 0.05, "error_feedback": True}}),
        ("diloco", {"strategy": {"name": "diloco", "local_steps": 5, "inner_lr": 0.003}}),
    ],
)
def test_the_rule_runs_on_what_the_ps_decodes(update: str, training: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    build = ps_job.build_aggregator
    monkeypatch.setattr(ps_job, "build_aggregator", lambda spec: Spy(build(spec), seen))
    cfg = config(NEW_RULES["centered_clipping"], {"name": "ipm", "params": {"epsilon": 0.1}},
                 **{**training, "steps": 10})
    simulate_training(cfg)
    assert seen and all(rows.shape[0] == N for rows in seen)  # one decoded update per worker per round
    rows = seen[-1]
    if update == "int8":  # every 256-element chunk holds at most 255 levels of one scale
        chunks = rows[:, : rows.shape[1] // 256 * 256].reshape(N, -1, 256)
        assert max(len(np.unique(c)) for r in chunks for c in r) <= 255
    elif update == "topk_ef":  # the k largest only, error feedback keeps the rest on the worker
        k = int(np.ceil(0.05 * rows.shape[1]))
        assert (np.count_nonzero(rows, axis=1) <= k).all()
    else:  # pseudo-gradients: θ before the H local steps minus θ after, one per worker and round
        assert len(seen) == 10 // 5
