"""SparseLoCo (arXiv 2508.15706): DiLoCo whose outer momentum is the workers' decaying error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from dist_llm_train.config import ConfigError, parse_config
from dist_llm_train.core.codecs import ErrorFeedback, get_codec
from dist_llm_train.core.strategies import SparseLoCo, build_strategy


def test_decaying_error_feedback_follows_the_papers_accumulator() -> None:
    """e ← β·e + Δ; send Q(TopK(e)); e ← e − sent — checked against the recurrence written out by hand."""
    codec = get_codec("int4", chunk=64)
    beta = 0.9
    ef = ErrorFeedback(codec, decay=beta)
    rng = np.random.default_rng(0)
    e = np.zeros(500, np.float32)
    for _ in range(6):
        delta = rng.standard_normal(500).astype(np.float32)
        e = (np.float32(beta) * e + delta).astype(np.float32)
        sent = codec.decode(ef.compress(delta), 500)
        e = e - sent
        residual = ef.residual
        assert residual is not None
        np.testing.assert_array_equal(residual, e)
    with pytest.raises(ValueError, match="decay"):
        ErrorFeedback(codec, decay=0.0)


def test_the_ps_takes_a_plain_outer_sgd_step_and_workers_decay_their_feedback() -> None:
    cfg = parse_config(
        {
            "training": {
                "strategy": {"name": "sparseloco", "local_steps": 10, "outer_lr": 2.0, "error_decay": 0.9},
                "codec": {"name": "sparseloco", "ratio": 0.02},
            }
        }
    )
    opt = cfg.training.job_spec("j").optimizer
    assert (opt.name, opt.learning_rate, opt.momentum, opt.nesterov) == ("sgd", 2.0, 0.0, False)
    pipeline = cfg.training.worker_update(worker_name="w0", shard_ids=[0], num_shards=2)
    assert pipeline.strategy.error_feedback_decay == 0.9
    pipeline.encode(np.ones(4096, np.float32))
    assert pipeline.feedback is not None and pipeline.feedback[0].decay == np.float32(0.9)
    assert isinstance(build_strategy(cfg.training.strategy), SparseLoCo)


def test_sparseloco_needs_a_lossy_codec_with_error_feedback() -> None:
    with pytest.raises(ConfigError, match="training.codec"):
        parse_config({"training": {"strategy": "sparseloco"}})
    with pytest.raises(ConfigError, match="error feedback off"):
        parse_config({"training": {"strategy": "sparseloco", "codec": {"name": "int8"}}})
    with pytest.raises(ConfigError, match="outer_momentum"):
        parse_config(
            {"training": {"strategy": {"name": "sparseloco", "outer_momentum": 0.9}, "codec": {"name": "sparseloco"}}}
        )
