"""Server optimizers against hand-computed steps (float64 maths, float32 results)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.strategies import OptimizerSpec
from dist_llm_train.core.types import ErrorCode, PSError
from dist_llm_train.paramserver.optim import SGD, Adam, make_optimizer


def test_sgd_without_momentum_is_plain_descent() -> None:
    opt = SGD(3, lr=0.1)
    p = opt.step(np.array([1.0, 2.0, 3.0], np.float32), np.array([1.0, -2.0, 0.5], np.float32))
    np.testing.assert_allclose(p, [0.9, 2.2, 2.95], rtol=1e-6)


def test_sgd_momentum_matches_hand_computation() -> None:
    # p=1, lr=0.1, mu=0.9, grads 1, 2, -1:
    # buf1 = 1           p1 = 1    - 0.1*1    = 0.9
    # buf2 = 0.9+2 = 2.9 p2 = 0.9  - 0.29     = 0.61
    # buf3 = 2.61-1=1.61 p3 = 0.61 - 0.161    = 0.449
    opt = SGD(1, lr=0.1, momentum=0.9)
    p = np.array([1.0], np.float32)
    for g, expected in ((1.0, 0.9), (2.0, 0.61), (-1.0, 0.449)):
        p = opt.step(p, np.array([g], np.float32))
        assert p[0] == pytest.approx(expected, abs=1e-6)


def test_sgd_nesterov_uses_lookahead() -> None:
    # buf1 = 1, direction = g + mu*buf = 1 + 0.9 = 1.9 -> p = 1 - 0.19
    opt = SGD(1, lr=0.1, momentum=0.9, nesterov=True)
    assert opt.step(np.ones(1, np.float32), np.ones(1, np.float32))[0] == pytest.approx(0.81, abs=1e-6)


def test_adam_matches_hand_computation() -> None:
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = Adam(2, lr, b1, b2, eps)
    p = np.array([0.5, -0.5], np.float32)
    ref = p.astype(np.float64)
    m = np.zeros(2)
    v = np.zeros(2)
    for t, g in enumerate(([1.0, -3.0], [0.5, 2.0], [-2.0, 0.1]), start=1):
        g64 = np.array(g)
        m = b1 * m + (1 - b1) * g64
        v = b2 * v + (1 - b2) * g64**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        ref = ref - lr * m_hat / (np.sqrt(v_hat) + eps)
        p = opt.step(p, np.array(g, np.float32))
        np.testing.assert_allclose(p, ref, rtol=0, atol=1e-6)
    # the first Adam step moves every coordinate by ~lr regardless of gradient scale
    first = Adam(1, lr).step(np.zeros(1, np.float32), np.array([1234.0], np.float32))
    assert first[0] == pytest.approx(-lr, rel=1e-5)


def test_lr_scale_scales_the_step() -> None:
    full = SGD(1, lr=1.0).step(np.zeros(1, np.float32), np.ones(1, np.float32))
    half = SGD(1, lr=1.0).step(np.zeros(1, np.float32), np.ones(1, np.float32), lr_scale=0.5)
    assert half[0] == pytest.approx(full[0] / 2)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    spec = JobSpec.from_wire(WireJobSpec("j", optimizer=name, learning_rate=0.05, momentum=0.9))
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(4)]
    a = make_optimizer(spec.optimizer, 5)
    p = np.zeros(5, np.float32)
    for g in grads[:2]:
        p = a.step(p, g)
    arrays, scalars = a.state_dict()
    b = make_optimizer(spec.optimizer, 5)
    b.load_state_dict({k: x.copy() for k, x in arrays.items()}, dict(scalars))
    pa, pb = p, p.copy()
    for g in grads[2:]:
        pa, pb = a.step(pa, g), b.step(pb, g)
    np.testing.assert_array_equal(pa, pb)


def test_step_never_mutates_its_inputs() -> None:
    """Snapshots (pulls, checkpoints) share arrays with the optimizer, so nothing may be written in place."""
    opt = Adam(3, 0.1)
    p = np.ones(3, np.float32)
    g = np.full(3, 2.0, np.float32)
    opt.step(p, g)
    m_before = opt.state_dict()[0]["exp_avg"]
    m_copy = m_before.copy()
    opt.step(p, g)
    assert np.array_equal(p, np.ones(3)) and np.array_equal(g, np.full(3, 2.0))
    assert np.array_equal(m_before, m_copy)


def spec_of(**wire: object) -> JobSpec:
    return JobSpec.from_wire(WireJobSpec("j", **wire))  # type: ignore[arg-type]


def test_options_are_parsed_and_checked() -> None:
    opt = make_optimizer(spec_of(optimizer="adam", options={"adam_beta2": "0.99", "adam_eps": "1e-6"}).optimizer, 2)
    assert isinstance(opt, Adam) and math.isclose(opt.beta2, 0.99) and math.isclose(opt.eps, 1e-6)
    sgd = make_optimizer(spec_of(optimizer="sgd", options={"nesterov": "true"}).optimizer, 2)
    assert isinstance(sgd, SGD) and sgd.nesterov
    # Bad options are refused where the wire form is parsed, naming the key, before any job exists.
    for options in ({"adam_beta2": "lots"}, {"adam_beta2": "1.5"}, {"adam_eps": "nan"}):
        with pytest.raises(ValueError, match="adam_"):
            spec_of(optimizer="adam", options=options)
    with pytest.raises(ValueError, match="optimizer"):
        spec_of(optimizer="lion")
    with pytest.raises(PSError) as err:
        make_optimizer(OptimizerSpec("lion"), 2)
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="shape"):
        Adam(3, 0.1).load_state_dict({"exp_avg": np.zeros(2), "exp_avg_sq": np.zeros(3)}, {"step": 1})
