"""The vectorised engine's round-close rule against the parameter server's own `JobState`."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.sim import adapters
from dist_llm_train.sim.barrier import close_time
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.events import VirtualClock

N = 6


@st.composite
def rounds(draw):
    members0 = draw(st.lists(st.booleans(), min_size=N, max_size=N))
    pushers = draw(st.lists(st.integers(0, N - 1), max_size=N, unique=True))
    times = draw(st.lists(st.integers(1, 60), min_size=len(pushers), max_size=len(pushers)))
    n_changes = draw(st.integers(0, 3))
    changes = []
    for t in sorted(draw(st.lists(st.integers(1, 60), min_size=n_changes, max_size=n_changes))):
        changes.append((float(t) + 0.5, np.array(draw(st.lists(st.booleans(), min_size=N, max_size=N)))))
    timeout = float(draw(st.integers(1, 40)))
    return np.array(members0), np.array(pushers, dtype=int), np.array(times, dtype=float), changes, timeout


def replay_through_jobstate(members0, pushers, times, changes, timeout):
    """Feed the same round to the real PS object in time order: membership changes first at equal times,
    the expiry timer after the pushes of its instant (the event order of the per-event engine)."""
    clock = VirtualClock()
    ids = [f"w{i}" for i in range(N)]
    js = adapters.make_job_state(adapters.job_spec(SimConfig(rounds=10, straggler_timeout_s=timeout)), [], clock)
    adapters.set_members(js, [ids[i] for i in np.nonzero(members0)[0]])
    events = [(t, 0, mask) for t, mask in changes]
    events += [(float(t), 1, int(s)) for s, t in zip(pushers, times, strict=True)]
    for t, kind, what in sorted(events, key=lambda e: (e[0], e[1])):
        deadline = adapters.round_deadline(js)
        if deadline is not None and deadline < t:
            clock.advance(deadline)
            if adapters.expire(js, deadline):
                return deadline, "timeout"
        clock.advance(t)
        if kind == 0:
            adapters.set_members(js, [ids[i] for i in np.nonzero(what)[0]])
            if js.version == 1:
                return t, "members"
        else:
            adapters.push(js, ids[what], 1, 0)
            if js.version == 1:
                return t, "push"
    deadline = adapters.round_deadline(js)
    if deadline is not None:
        return deadline, "timeout"
    return float("inf"), "never"


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_close_time_matches_the_parameter_server(case):
    members0, pushers, times, changes, timeout = case
    assert close_time(times, pushers, members0, changes, timeout) == replay_through_jobstate(*case)


def test_constant_membership_closes_at_the_last_member_or_the_timeout():
    members = np.array([True, True, True, False])
    t = np.array([1.0, 4.0, 2.0, 0.5])
    s = np.array([0, 1, 2, 3])  # slot 3 is not a member: its update neither opens nor closes anything
    assert close_time(t, s, members, [], timeout=10.0) == (4.0, "push")
    assert close_time(t, s, members, [], timeout=2.5) == (3.5, "timeout")
    assert close_time(t[:2], s[:2], members, [], timeout=10.0) == (11.0, "timeout")
    shrink = [(2.5, np.array([True, False, True, False]))]
    assert close_time(t[[0, 2]], s[[0, 2]], members, shrink, timeout=10.0) == (2.5, "members")
