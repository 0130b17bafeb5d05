"""The per-message delay model: scalar and vectorised forms agree, and each term behaves as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.sim import linkmath as lm
from dist_llm_train.sim.network import Timeline, Topology

unit = st.floats(min_value=1e-9, max_value=1 - 1e-9)
normal = st.floats(min_value=-6, max_value=6)


@settings(max_examples=200, deadline=None)
@given(
    dist=st.integers(0, 3),
    delay=st.floats(0, 2),
    jitter=st.floats(0, 1),
    z=normal,
    u=unit,
    loss=st.floats(0, 0.3),
    nbytes=st.integers(1, 50_000_000),
    rtt=st.floats(0, 2),
    transfer=st.floats(0, 100),
    uz=normal,
    ul=unit,
)
def test_scalar_and_vector_forms_agree(dist, delay, jitter, z, u, loss, nbytes, rtt, transfer, uz, ul):
    rto = rtt + 0.2
    vec_prop = lm.propagation(
        np.array([delay]), np.array([jitter]), np.array([dist]), np.array([z]), np.array([u])
    )
    assert vec_prop[0] == pytest.approx(lm.propagation_1(delay, jitter, dist, z, u), rel=1e-12, abs=1e-15)
    vec_pen = lm.loss_penalty(
        np.array([loss]),
        nbytes,
        1448,
        np.array([rtt]),
        np.array([rto]),
        np.array([transfer]),
        np.array([ul]),
        np.array([uz]),
        15,
    )
    one = lm.loss_penalty_1(loss, nbytes, 1448, rtt, rto, transfer, ul, uz, 15)
    assert vec_pen[0] == pytest.approx(one, rel=1e-12, abs=1e-15)


def test_no_loss_means_no_penalty_and_delay_never_negative():
    z = np.linspace(-8, 8, 101)
    prop = lm.propagation(np.full(101, 0.01), np.full(101, 0.05), np.zeros(101, int), z, np.full(101, 0.5))
    assert prop.min() == 0.0 and prop.max() > 0.01
    pen = lm.loss_penalty(
        np.zeros(101),
        10_000_000,
        1448,
        np.full(101, 0.08),
        np.full(101, 0.3),
        np.full(101, 8.0),
        np.linspace(0.01, 0.99, 101),
        z,
        15,
    )
    assert not pen.any()


def test_short_message_waits_for_exponential_backoff():
    # One lost attempt costs one RTO, two cost RTO + 2·RTO: u below p² means at least two failures.
    p, rto = 0.1, 0.3
    assert lm.small_penalty_1(p, 1, rto, 0.5, 15) == 0.0
    assert lm.small_penalty_1(p, 1, rto, 0.05, 15) == pytest.approx(rto)
    assert lm.small_penalty_1(p, 1, rto, 0.005, 15) == pytest.approx(3 * rto)
    assert lm.small_penalty_1(p, 1, rto, 1e-300, 4) == pytest.approx(rto * (2**4 - 1))  # retry cap


def test_bulk_loss_count_has_the_poisson_mean_and_is_capped_by_windows():
    rng = np.random.default_rng(0)
    n, k, p, rtt = 200_000, 2000, 0.001, 0.1
    u, z = rng.random(n), rng.standard_normal(n)
    pen = lm.bulk_penalty(np.full(n, p), k, np.full(n, rtt), np.full(n, 100.0), u, z)
    assert (pen / rtt).mean() == pytest.approx(k * p / (1 - p), rel=0.02)
    few_windows = lm.bulk_penalty(np.full(n, 0.05), k, np.full(n, rtt), np.full(n, 0.25), u, z)
    assert few_windows.max() == pytest.approx(
        3 * rtt
    )  # ⌈0.25 / 0.1⌉ windows, however many segments were lost


def test_fifo_closed_form_matches_the_recurrence():
    rng = np.random.default_rng(1)
    starts = np.sort(rng.uniform(0, 10, 500))
    service = rng.uniform(0, 0.1, 500)
    done, free = [], 3.0
    for s, d in zip(starts, service, strict=True):
        free = max(s, free) + d
        done.append(free)
    np.testing.assert_allclose(lm.fifo_completion(starts, service, 3.0), done, rtol=1e-12)


def test_timeline_cycles_and_holds():
    cyc = Timeline([5.0, 2.0], cycle=True)
    assert [cyc.index_1(t) for t in (0.0, 4.99, 5.0, 6.9, 7.0, 12.5)] == [0, 0, 1, 1, 0, 1]
    np.testing.assert_array_equal(cyc.index(np.array([0.0, 5.5, 7.1, 13.0])), [0, 1, 0, 1])
    once = Timeline([1.0, 1.0, 1.0], cycle=False)
    assert [once.index_1(t) for t in (0.5, 1.5, 2.5, 99.0)] == [0, 1, 2, 2]


def test_topology_resolves_the_profile_files_like_the_backends():
    cellular = Topology(load_profile("cellular"), capacity=3, initial_workers=3, rto_min_s=0.2)
    up = cellular.up.hops[0][0]
    assert up.delay == pytest.approx(0.040)  # 80 ms round trip, split in two
    assert up.rate == pytest.approx(10e6)
    assert up.loss == pytest.approx(1 - math.sqrt(0.98), abs=1e-6)
    assert cellular.hb.hops[0][0].delay == pytest.approx(0.020)  # heartbeat class override
    straggler = Topology(load_profile("straggler"), capacity=5, initial_workers=4, rto_min_s=0.2)
    assert straggler.group.tolist() == [0, 0, 0, 1, 0]  # $last_worker is the last *initial* worker
    assert straggler.compute_slowdown.tolist() == [1, 1, 1, 4, 1]
    assert straggler.up.hops[1][0].rate == pytest.approx(5e6)
    assert straggler.down.hops[1][0].rate == pytest.approx(5e6)  # its ingress override
    brownout = Topology(load_profile("brownout"), capacity=1, initial_workers=1, rto_min_s=0.2)
    assert brownout.n_segments == 2 and brownout.ps_rate.tolist() == [5e6, 0.5e6]
