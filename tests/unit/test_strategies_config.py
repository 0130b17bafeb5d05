"""Strategy keys: seed compatibility (migrated to the nested layout), config-time refusals, the PS job
they become (and its wire form), CLI flags."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from dist_llm_train.cli.run import apply_training_overrides
from dist_llm_train.config import Config, ConfigError, parse_config
from dist_llm_train.core.job import JobSpec


def training(**keys: Any) -> Config:
    return parse_config({"training": keys})


@pytest.mark.parametrize(
    "data,strategy",
    [
        ({}, "sync"),
        ({"training": {"use_async_training": True}}, "async"),
        ({"controller": {"use_async_training": True}}, "async"),
        ({"controller": {"use_async_training": True, "adaptive_staleness": True}}, "adaptive"),
        ({"training": {"mode": "async", "adaptive_staleness": True}}, "adaptive"),
        ({"training": {"mode": "diloco"}}, "diloco"),
        ({"training": {"strategy": "adaptive"}}, "adaptive"),
        ({"training": {"strategy": "sync", "use_async_training": True}}, "sync"),  # explicit strategy wins
    ],
)
def test_seed_keys_resolve_to_a_strategy(data: dict[str, Any], strategy: str) -> None:
    assert parse_config(data).training.strategy.name == strategy


def test_strategy_and_mode_must_agree() -> None:
    with pytest.raises(ConfigError, match="disagree"):
        training(strategy="diloco", mode="async")


@pytest.mark.parametrize(
    "keys,numbers",
    [
        ({"aggregation_rule": "krum", "num_workers": 4}, "krum' needs n >= 2f+3 = 5 (f=1) workers, got n=4"),
        ({"aggregation_rule": "krum", "krum_f": 2, "num_workers": 6}, "2f+3 = 7 (f=2) workers, got n=6"),
        ({"aggregation_rule": "multi_krum", "byzantine_f": 2, "num_workers": 6}, "2f+3 = 7 (f=2)"),
        (
            {"aggregation_rule": "bulyan", "bulyan_f": 1, "num_workers": 6},
            "bulyan' needs n >= 4f+3 = 7 (f=1)",
        ),
        (
            {"aggregation_rule": "bulyan", "byzantine_f": 2, "num_workers": 10},
            "4f+3 = 11 (f=2) workers, got n=10",
        ),
    ],
)
def test_aggregation_preconditions_fail_at_parse_time_with_the_numbers(
    keys: dict[str, Any], numbers: str
) -> None:
    with pytest.raises(ConfigError) as err:
        training(**keys)
    assert numbers in str(err.value)
    assert "training.num_workers" in str(err.value)


def test_aggregation_preconditions_hold_at_the_boundary() -> None:
    assert training(aggregation_rule="krum", byzantine_f=2, num_workers=7).training.num_workers == 7
    assert (
        training(aggregation_rule="bulyan", byzantine_f=2, num_workers=11).training.aggregation.rule
        == "bulyan"
    )


def aggregation_params(t: Any) -> dict[str, float]:
    return dict(t.aggregation.params(t.num_workers))


def test_rule_parameters_come_from_seed_keys_then_byzantine_f() -> None:
    t = training(aggregation_rule="trimmed_mean", byzantine_f=2, num_workers=7).training
    assert aggregation_params(t) == {"f": 2.0}  # a count, so a short round still cuts f from each side
    t = training(aggregation_rule="trimmed_mean", byzantine_f=2, trim_ratio=0.1, num_workers=7).training
    assert aggregation_params(t) == {"beta": 0.1}
    assert aggregation_params(training(aggregation_rule="trimmed_mean").training) == {"beta": 0.3}
    t = training(aggregation_rule="krum", krum_f=1, byzantine_f=2, num_workers=7).training
    assert aggregation_params(t) == {"f": 1.0}
    t = training(aggregation_rule="multi_krum", byzantine_f=2, multi_krum_m=3, num_workers=7).training
    assert aggregation_params(t) == {"f": 2.0, "m": 3.0}


@pytest.mark.parametrize(
    "keys,message",
    [
        ({"compression": "zip"}, "training.codec.name"),
        ({"strategy": "async", "aggregation_rule": "median"}, "applies each update on its own"),
        ({"attack": "sign_flip", "num_workers": 4}, "needs attackers"),
        ({"attackers": 1, "num_workers": 4}, "no attack is chosen"),
        ({"strategy": "bogus"}, "unknown strategy 'bogus'"),
        ({"attack": "gaussian", "attackers": 4, "num_workers": 4}, "no honest worker"),
        ({"attack": "ipm", "attackers": 1, "num_workers": 4, "attack_params": {"scale": 2}}, "not ['scale']"),
        ({"attack": "alie", "attackers": 1, "num_workers": 4, "strategy": "diloco"}, "one pseudo-gradient"),
        ({"enable_differential_privacy": True}, "epsilon = inf"),
        ({"dp_noise_multiplier": 1.0}, "enable_differential_privacy is false"),
        ({"dp_clip": 1.0}, "enable_differential_privacy is false"),
        (
            {"enable_differential_privacy": True, "dp_noise_multiplier": 1.0, "gradient_clip_norm": 0},
            "clip bound",
        ),
        (
            {
                "enable_differential_privacy": True,
                "dp_noise_multiplier": 1.0,
                "dp_mode": "central",
                "aggregation_rule": "median",
            },
            "central DP",
        ),
        ({"strategy": "diloco", "diloco_local_steps": 50, "steps": 20}, "not one round fits"),
        ({"strategy": {"name": "diloco", "inner_lr_scale": {"ngram": 0}}}, "must be in (0, 100]"),
        ({"strategy": {"name": "diloco", "inner_lr_scale": {"ngram": float("inf")}}}, "finite number"),
        ({"strategy": {"name": "streaming_diloco", "inner_lr_scale": {"": 2.0}}}, "must be non-empty"),
    ],
)
def test_nonsense_is_refused_at_parse_time(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="training|attack|enable_differential_privacy") as err:
        training(**keys)
    assert message in str(err.value)


def test_dp_seed_keys_on_the_controller_still_work() -> None:
    cfg = parse_config(
        {"controller": {"enable_differential_privacy": True, "dp_noise_multiplier": 1.5}, "training": {}}
    )
    dp = cfg.training.privacy
    assert dp is not None and dp.noise_multiplier == 1.5
    assert dp.clip == cfg.training.gradient_clip_norm  # the seed's clip norm is the DP bound by default
    assert training().training.privacy is None


def test_diloco_job_uses_the_outer_nesterov_optimizer_and_counts_rounds() -> None:
    t = training(strategy="diloco", steps=100, diloco_local_steps=25).training
    spec = t.job_spec("j")
    opt = spec.optimizer
    assert (spec.mode, opt.name, opt.learning_rate, opt.momentum, opt.nesterov) == ("diloco", "sgd", 0.7, 0.9, True)
    assert spec.to_wire().options["nesterov"] == "true"
    assert spec.total_steps == t.versions == 4
    assert training(strategy="diloco", steps=101, diloco_local_steps=25).training.job_spec("j").total_steps == 5


def test_adaptive_and_central_dp_travel_as_options_the_ps_accepts() -> None:
    t = training(
        strategy="adaptive",
        max_staleness=3,
        staleness_scaling="inverse",
        enable_differential_privacy=True,
        dp_noise_multiplier=0.8,
        dp_clip=0.5,
        dp_mode="central",
    ).training
    spec = JobSpec.from_wire(t.job_spec("j").to_wire())  # what the PS parses off the wire
    strategy = spec.strategy
    assert strategy.name == "adaptive"
    assert (strategy.min_staleness, strategy.max_staleness_multiplier, strategy.staleness_scaling) == (  # type: ignore[attr-defined]
        5,
        10.0,
        "inverse",
    )
    assert strategy.max_staleness == 3  # type: ignore[attr-defined]
    dp = spec.privacy
    assert dp is not None and (dp.noise_multiplier, dp.clip, dp.mode) == (0.8, 0.5, "central")
    assert spec.privacy_seed is None  # a real job: the PS draws its noise from OS entropy
    seeded = JobSpec.from_wire(t.job_spec("j", dp_seed=7).to_wire())
    assert seeded.privacy_seed == 7  # tests and simulations may fix it
    local_t = training(enable_differential_privacy=True, dp_noise_multiplier=1.0).training
    local = local_t.job_spec("j", dp_seed=7).to_wire()
    assert "dp_noise_multiplier" not in local.options and "dp_seed" not in local.options  # on workers


def test_status_view_reports_epsilon_from_the_accountant() -> None:
    t = training(enable_differential_privacy=True, dp_noise_multiplier=1.0, steps=50).training
    view = t.describe(releases=10)
    assert view["dp"]["enabled"] and view["dp"]["releases"] == 10 and view["dp"]["planned_releases"] == 50
    assert 0 < view["dp"]["epsilon"] < view["dp"]["planned_epsilon"]
    assert training().training.describe(10)["dp"] == {"enabled": False}


def test_cli_flags_are_validated_together_against_the_worker_count() -> None:
    cfg = Config()
    cfg.training.num_workers = 3
    with pytest.raises(typer.BadParameter, match="2f\\+3 = 5"):
        apply_training_overrides(cfg, {"aggregation_rule": "krum"})
    assert cfg.training.aggregation.rule == "mean"  # a refused flag changes nothing
    cfg.training.num_workers = 7
    out = apply_training_overrides(
        cfg,
        {
            "strategy": "sync",
            "compression": "topk",
            "aggregation_rule": "krum",
            "byzantine_f": 2,
            "attack": "sign_flip",
            "attackers": 2,
            "dp_noise_multiplier": 1.1,
            "dp_clip": 0.5,
        },
    )
    t = out.training
    assert (t.strategy.name, t.codec.name, t.aggregation.rule, t.aggregation.f) == ("sync", "topk", "krum", 2)
    assert t.attack is not None and (t.attack.name, t.attack.attackers) == ("sign_flip", 2)
    assert t.dp is not None and t.dp.noise_multiplier == 1.1


@pytest.mark.parametrize("scale", [None, {"tok_emb": 3.0, "pos_emb": 0.5}])
def test_diloco_job_with_its_mapping_field_survives_the_wire(scale: dict[str, float] | None) -> None:
    """A mapping strategy field (DiLoCo's inner_lr_scale) travels as a JSON object option; the default (empty)
    is left off the wire, so a PS the job is sent to parses exactly the job the worker made."""
    from dist_llm_train.core.job import WireJobSpec

    strategy: dict[str, Any] = {"name": "diloco"} | ({"inner_lr_scale": scale} if scale else {})
    spec = parse_config({"training": {"strategy": strategy}}).training.job_spec("j")
    wire = spec.to_wire()
    assert ("inner_lr_scale" in wire.options) == bool(scale)
    assert JobSpec.from_wire(wire) == spec
    assert JobSpec.from_dict(spec.to_dict()) == spec  # the ZMQ map and checkpoint form too
    bad = WireJobSpec(**{**spec.to_dict(), "options": {**wire.options, "inner_lr_scale": "{not json"}})
    with pytest.raises(ValueError, match="inner_lr_scale"):
        JobSpec.from_wire(bad)
