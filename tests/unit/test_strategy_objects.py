"""A strategy is one object: a new one is one new class (here, inside this file) and runs end to end.

The toy strategy below is "sign-SGD by majority": workers push the sign of their gradient, the PS
applies each round's mean sign. It reuses the round barrier; nothing outside this file names it.
Also: the legacy flat keys migrate once with one warning; every shipped example still loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from dist_llm_train.config import LegacyConfigWarning, load_config, parse_config
from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.strategies import (
    STRATEGIES,
    HonestUpdate,
    RoundStrategy,
    StrategyConfig,
    Trainer,
    build_strategy,
    register,
)
from dist_llm_train.sim.numerics import simulate_training

ROOT = Path(__file__).resolve().parents[2]


class SignSyncConfig(StrategyConfig):
    name: Literal["toy_sign_sync"] = "toy_sign_sync"


class SignSync(RoundStrategy):
    name = "toy_sign_sync"
    Config = SignSyncConfig
    computed = 0

    def compute(self, trainer: Trainer) -> HonestUpdate:
        grad, loss, samples = trainer.compute_gradient()
        SignSync.computed += 1
        return HonestUpdate(np.sign(grad).astype(np.float32), loss, samples)


@pytest.fixture
def toy_strategy() -> object:
    register(SignSync)
    yield SignSync
    STRATEGIES.pop(SignSync.name, None)


def test_a_strategy_defined_in_a_test_file_trains_end_to_end(toy_strategy: object) -> None:
    cfg = parse_config(
        {
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "training": {
                "strategy": {"name": "toy_sign_sync"},
                "steps": 30,
                "num_workers": 2,
                "batch_size": 8,
                "seq_length": 16,
                "num_samples": 2000,
                "eval_batches": 4,
                "optimizer": "sgd",
                "learning_rate": 0.01,
                "momentum": 0.0,
            },
        }
    )
    spec = cfg.training.job_spec("toy")
    assert JobSpec.from_wire(spec.to_wire()) == spec  # the wire carries it without a proto change
    before = SignSync.computed
    result, sources = simulate_training(cfg, job_id="toy")
    assert result.version == 30 and SignSync.computed - before == 60  # 30 rounds x 2 workers, via the PS
    assert result.stats is not None and result.stats.counters["rounds_closed"] == 30
    initial = sources[0].trainer.evaluate(None, 4)
    final = sources[0].trainer.evaluate(np.array(result.params), 4)
    assert final < initial  # sign descent trains


def test_unknown_strategy_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*diloco"):
        build_strategy("nope")


def test_legacy_keys_migrate_once_with_one_warning_naming_the_new_paths() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = parse_config(
            {
                "controller": {"use_async_training": True, "max_staleness": 3},
                "training": {"compression": "topk", "compression_ratio": 0.05, "aggregation_rule": "mean"},
            }
        )
    legacy = [w for w in caught if issubclass(w.category, LegacyConfigWarning)]
    assert len(legacy) == 1
    text = str(legacy[0].message)
    for path in ("training.codec.name", "training.codec.ratio", "training.aggregation.rule", "training.strategy"):
        assert path in text
    t = cfg.training
    assert (t.strategy.name, t.strategy.max_staleness, t.codec.name, t.codec.ratio) == ("async", 3, "topk", 0.05)  # type: ignore[attr-defined]


def test_new_layout_loads_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacyConfigWarning)
        cfg = parse_config({"training": {"strategy": {"name": "diloco", "local_steps": 5}, "codec": {"name": "int8"}}})
    assert cfg.training.strategy.name == "diloco" and cfg.training.codec.name == "int8"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_still_loads(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyConfigWarning)
        load_config(path)


def test_strategy_configs_refuse_non_finite_values_but_take_long_timeouts() -> None:
    # The simulator runs rounds with a straggler timeout of 10^6 s ("never"); infinity is refused.
    assert build_strategy({"name": "sync", "straggler_timeout_s": 1e6}).config.straggler_timeout_s == 1e6  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="straggler_timeout_s"):
        build_strategy({"name": "sync", "straggler_timeout_s": float("inf")})
