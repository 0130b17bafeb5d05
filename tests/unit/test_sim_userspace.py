"""The userspace-relay delivery model (`sim.relaymodel`) and the empirical compute model.

The closed form is checked against the relay's own per-piece rules: a `netem.relay.Pipe` draws each piece's
delay and decides its loss stall exactly as in a running relay, and a Monte Carlo replay of a whole message
through those rules must give the same distribution as the table. Then the engines: both give identical
results under `shaper: userspace`, and with no jitter or loss a round is exact arithmetic.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import yaml

from dist_llm_train.netem.profile.schema import Link
from dist_llm_train.netem.userspace.relay import DirectionStats, Endpoint, LinkState, Pipe, Timer, TokenBucket
from dist_llm_train.sim.config import ComputeModel, SimConfig, SimConfigError, build_sim_config
from dist_llm_train.sim.draws import ComputeTime
from dist_llm_train.sim.relaymodel import LEVELS, delivery_quantiles, quantum_bytes
from dist_llm_train.sim.runner import simulate

P1 = 1.0 - math.sqrt(0.98)  # cellular's 2 % round-trip loss, one way


def relay_samples(link: Link, rtt: float, nbytes: int, n: int, seed: int) -> np.ndarray:
    """M for `n` messages, each piece's delay and stall decided by a real relay Pipe's own methods."""
    pipe = Pipe(
        LinkState(link, rtt),
        TokenBucket(),
        Timer(),
        random.Random(seed),
        DirectionStats(),
        cast(Endpoint, None),
        cast(Endpoint, None),
    )
    rate = link.rate_mbit * 1e6 if link.rate_mbit else math.inf
    q = quantum_bytes(rate, 1448)
    pieces = [q] * (-(-nbytes // q) - 1)
    pieces.append(nbytes - sum(pieces))
    out = np.empty(n)
    for i in range(n):
        worst, after = -math.inf, 0
        for size in reversed(pieces):  # backlog = bytes still queued behind the piece, as in the relay
            pipe.pending_bytes = after
            delivered = pipe._shaper.delay_s() + pipe._stall_s(size) - (8 * after / rate if rate < math.inf else 0)
            worst = max(worst, delivered)
            after += size
        out[i] = worst
    return out


def table_at(q: np.ndarray, u: np.ndarray) -> np.ndarray:
    pos = u * (LEVELS - 1)
    i = np.minimum(pos.astype(np.intp), LEVELS - 2)
    return q[i] + (pos - i) * (q[i + 1] - q[i])


@pytest.mark.parametrize(
    ("name", "jitter", "loss", "nbytes"),
    [
        ("bulk, cellular", 20.0, P1, 412_928),
        ("bulk, jitter only", 20.0, 0.0, 412_928),
        ("bulk, loss only", 0.0, P1, 412_928),
        ("small message", 20.0, 0.05, 256),
    ],
)
def test_closed_form_matches_the_relays_per_piece_rules(name, jitter, loss, nbytes):
    link = Link(delay_ms=40, jitter_ms=jitter, loss={"model": "random", "pct": 100 * loss}, rate_mbit=10)
    mc = relay_samples(link, 0.08, nbytes, 2500, seed=7)
    q = delivery_quantiles(nbytes, 0.04, jitter / 1e3, 0, loss, 10e6, 0.08, 1448)
    model = table_at(q, (np.arange(20_000) + 0.5) / 20_000)
    se = mc.std() / math.sqrt(mc.size)
    assert abs(model.mean() - mc.mean()) <= 4 * se + 5e-4, (name, model.mean(), mc.mean())
    for level in (0.25, 0.5, 0.9):
        assert np.quantile(model, level) == pytest.approx(np.quantile(mc, level), abs=0.004), (name, level)
    assert np.mean(model > 0.2) == pytest.approx(np.mean(mc > 0.2), abs=0.015)  # the RTO tail


def test_running_maximum_and_stalls_make_bulk_slower_than_one_draw():
    """Jitter alone: a bulk message sees the maximum of many draws, a small one a single draw (mean = delay);
    a lost segment early in a long message costs nothing, so loss adds far less than one RTT per loss."""
    small = delivery_quantiles(256, 0.04, 0.02, 0, 0.0, 10e6, 0.08, 1448)
    bulk = delivery_quantiles(412_928, 0.04, 0.02, 0, 0.0, 10e6, 0.08, 1448)
    lossy = delivery_quantiles(412_928, 0.04, 0.02, 0, P1, 10e6, 0.08, 1448)
    u = (np.arange(10_000) + 0.5) / 10_000
    assert table_at(small, u).mean() == pytest.approx(0.04, abs=1e-3)
    assert 0.05 < table_at(bulk, u).mean() < 0.07
    expected_losses = 286 * P1 / (1 - P1)
    assert table_at(bulk, u).mean() < table_at(lossy, u).mean() < table_at(bulk, u).mean() + 0.3 * (
        expected_losses * 0.08
    )


def test_no_jitter_no_loss_is_exactly_the_delay():
    q = delivery_quantiles(1_000_000, 0.025, 0.0, 0, 0.0, 50e6, 0.05, 1448)
    np.testing.assert_allclose(q[1:], 0.025, atol=1e-12)


FLAT = {"name": "flat", "figures": "one_way", "link": {"delay_ms": 5, "rate_mbit": 100}}


def _profile(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("engine", ["vectorised", "exact"])
def test_userspace_round_without_jitter_or_loss_is_exact(tmp_path, engine):
    """Every message then takes exactly its serialisation + the one-way delay: a steady round is the
    straggler's pull, its compute and its push (its next pull request left with the push: `early_pull`), as on
    a kernel path; a worker that pulls after the push's reply (ZMQ) adds that reply and the request."""
    n, k, d, rate = 4, 0.1, 0.005, 100e6
    slow = {**FLAT, "nodes": {"$last_worker": {"compute_slowdown": 4}}}
    common = {
        "workers": n,
        "rounds": 10,
        "engine": engine,
        "profile": _profile(tmp_path, slow),
        "compute": {"kind": "constant", "mean_s": k},
        "payload": {"params": 250_000},
    }
    r = simulate(build_sim_config({**common, "transport": {"shaper": "userspace"}}))
    assert r.sizes is not None
    pull, push = 8 * r.sizes.pull_bytes / rate, 8 * r.sizes.push_bytes / rate
    np.testing.assert_allclose(r.round_times[2:], pull + d + 4 * k + push + d, rtol=1e-9)
    kernel = simulate(build_sim_config({**common, "transport": {"shared_ps_egress": False}}))
    np.testing.assert_allclose(r.stats.publish_times, kernel.stats.publish_times, rtol=1e-12)
    serial = simulate(build_sim_config({**common, "transport": {"shaper": "userspace", "early_pull": False}}))
    np.testing.assert_allclose(serial.round_times[2:], 2 * d + pull + d + 4 * k + push + d, rtol=1e-9)


def test_engines_agree_under_userspace_shaping():
    """Lossy, jittery, a straggler node override and a brownout schedule: identical publish times."""
    for profile in ("straggler", "brownout"):
        base = {
            "workers": 5,
            "rounds": 40,
            "profile": profile,
            "seed": 5,
            "straggler_timeout_s": 2.0,
            "compute": {"kind": "empirical", "samples_s": [0.01, 0.02, 0.05, 0.3]},
            "failures": {"kills": [{"worker": 1, "at_s": 4.0}]},
            "transport": {"shaper": "userspace"},
        }
        vec = simulate(build_sim_config({**base, "engine": "vectorised"}))
        ex = simulate(build_sim_config({**base, "engine": "exact"}))
        assert vec.version == ex.version == 40
        np.testing.assert_allclose(vec.stats.publish_times, ex.stats.publish_times, rtol=1e-12)
        assert vec.stats.updates_per_version == ex.stats.updates_per_version
        kernel = simulate(build_sim_config({**base, "transport": {"shared_ps_egress": False}}))
        assert kernel.stats.publish_times != vec.stats.publish_times  # the shaper choice matters


def test_userspace_shaping_has_no_shared_ps_egress():
    cfg = build_sim_config({"transport": {"shaper": "userspace"}})
    assert cfg.transport.shared_ps_egress is False
    with pytest.raises(SimConfigError, match="transport: .*shared_ps_egress: the userspace shaper relays each worker"):
        build_sim_config({"transport": {"shaper": "userspace", "shared_ps_egress": True}})
    with pytest.raises(SimConfigError, match="transport.shaper"):
        build_sim_config({"transport": {"shaper": "tc"}})
    assert build_sim_config({}).transport.shaper == "kernel"


# -- empirical compute ----------------------------------------------------------------------------------------
def test_empirical_compute_resamples_the_measured_steps():
    samples = [0.01, 0.012, 0.011, 0.09]
    model = ComputeModel(kind="empirical", samples_s=samples)
    assert model.mean_s == pytest.approx(np.mean(samples))
    ct = ComputeTime(model, np.ones(3))
    u = np.random.default_rng(0).random(40_000)
    drawn = ct.sample(np.zeros(u.size, dtype=np.intp), np.zeros(u.size), u)
    assert set(np.unique(drawn)) == set(samples)
    assert drawn.mean() == pytest.approx(np.mean(samples), rel=0.03)
    assert [ct.sample_1(0, 0.0, x) for x in u[:50]] == drawn[:50].tolist()
    diloco = ComputeTime(model, np.ones(3), steps=10)  # H steps: a lognormal with the sum's mean
    assert diloco.mean == pytest.approx(10 * np.mean(samples))


@pytest.mark.parametrize(
    ("compute", "message"),
    [
        ({"kind": "empirical"}, "needs at least one sample"),
        ({"kind": "empirical", "samples_s": [0.1, -1]}, "samples_s.1"),
        ({"kind": "lognormal", "samples_s": [0.1]}, "only used by kind 'empirical'"),
    ],
)
def test_bad_empirical_compute_is_refused(compute, message):
    with pytest.raises(SimConfigError, match=message):
        build_sim_config({"compute": compute})


def test_a_run_config_shaped_in_userspace_is_simulated_with_relay_semantics():
    from dist_llm_train.config import Config

    cfg = Config()
    cfg.network.shaping = "userspace"
    sim = SimConfig.from_config(cfg)
    assert sim.transport.shaper == "userspace" and sim.transport.shared_ps_egress is False
    assert SimConfig.from_config(Config()).transport.shaper == "kernel"
