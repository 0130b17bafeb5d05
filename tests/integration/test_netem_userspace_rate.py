"""Userspace backend: bulk TCP goodput through a relay is the configured rate ±5 % (rates ≥ 1 Mbit/s).

The relay meters payload bytes, so goodput *is* the shaped rate here (kernel shapers meter wire bytes). Loss
stalls only delay delivery — the bottleneck keeps draining — and the least-squares fit over the window keeps a
stall at its edge from biasing the figure. The check runs with the profile's loss set to zero: a modelled
loss delays delivery by up to an RTO without changing what the bottleneck drains, and a stall at the window's
edge would read as a rate error that is not one (loss is checked in test_netem_userspace_fidelity.py).
"""

from __future__ import annotations

import pytest

from dist_llm_train.netem.measure.userspace_fidelity import measure

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("profile", "src"),
    [
        ("good", "a"),
        ("cellular", "a"),
        ("degraded", "a"),
        ("satellite", "a"),
        ("intercontinental", "a"),
        ("brownout", "a"),
        ("straggler", "b"),
        ("lan", "a"),
    ],
)
def test_rate(profile: str, src: str) -> None:
    r = measure("rate", "--profile", profile, "--src", src, "--seconds", "3.0")
    configured, measured = r["configured_mbit"], r["measured_mbit"]
    assert configured is not None and configured >= 1
    assert abs(measured - configured) <= 0.05 * configured, (
        f"{profile}: {measured:.3f} vs {configured} Mbit/s"
    )
