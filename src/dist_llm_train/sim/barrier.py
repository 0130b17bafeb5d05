"""When does a sync round close? The PS's rule (`paramserver.job.JobState`), evaluated over a whole round.

The rule: a round opens with its first update from a member; it closes when every current member has
contributed, when a membership change leaves no member outstanding, or `straggler_timeout_s` after it opened
(the PS's expiry timer fires after any update arriving at that same instant). Updates from non-members are
refused and change nothing.

The vectorised engine cannot afford one `JobState.push` per update (10⁷ of them for 10⁴ workers × 10³ rounds),
so it evaluates the rule here: in closed form when membership is constant through the round (almost every
round), by an exact replay when it changes. A property test replays random rounds through the real
`JobState` and demands the same close time.
"""

from __future__ import annotations

import math

import numpy as np

MembershipChange = tuple[float, np.ndarray]  # (time, boolean member mask over slots)
Close = tuple[float, str]  # (time, how: "push" | "timeout" | "members" | "never")
NEVER: Close = (math.inf, "never")


def close_time(
    push_time: np.ndarray,
    push_slot: np.ndarray,
    members: np.ndarray,
    changes: list[MembershipChange],
    timeout: float,
) -> Close:
    """(close time, how it closed) for updates arriving at `push_time` from `push_slot` (any order).

    How: the last outstanding member's update ("push"), the straggler timeout ("timeout"), or a membership
    change that left nobody outstanding ("members"). `members` is the mask when the round starts; `changes`
    are later (time, mask) pairs in time order. Returns NEVER when the round cannot close on what is known."""
    order = np.argsort(push_time, kind="stable")
    t_sorted, s_sorted = push_time[order], push_slot[order]
    fast = _constant_membership(t_sorted, s_sorted, members, timeout)
    if not changes or changes[0][0] > fast[0]:
        return fast
    return _replay(t_sorted, s_sorted, members, changes, timeout)


def _constant_membership(t: np.ndarray, slots: np.ndarray, members: np.ndarray, timeout: float) -> Close:
    is_member = members[slots]
    mt, ms = t[is_member], slots[is_member]
    if mt.size == 0:
        return NEVER
    deadline = float(mt[0]) + timeout
    n_members = int(np.count_nonzero(members))
    if ms.size >= n_members:
        seen = np.zeros(members.size, dtype=bool)
        seen[ms] = True
        if int(np.count_nonzero(seen)) == n_members:
            # Everyone contributes: the round closes with the last member's first update, unless that is late.
            if ms.size == n_members:  # one update each (the usual case); times are sorted
                last = float(mt[-1])
            else:
                _, first_idx = np.unique(ms, return_index=True)
                last = float(mt[first_idx].max())
            if last <= deadline:
                return last, "push"
    return deadline, "timeout"


def _replay(
    t: np.ndarray, slots: np.ndarray, members: np.ndarray, changes: list[MembershipChange], timeout: float
) -> Close:
    """Event-by-event evaluation; membership changes at the same instant as an update come first."""
    current = members.copy()
    contributed: set[int] = set()
    outstanding = int(current.sum())
    opened: float | None = None
    ci = 0
    i = 0
    n = t.size
    while i < n or ci < len(changes):
        t_change = changes[ci][0] if ci < len(changes) else math.inf
        t_push = float(t[i]) if i < n else math.inf
        now = min(t_change, t_push)
        if opened is not None and now > opened + timeout:
            return opened + timeout, "timeout"
        if t_change <= t_push:
            current = changes[ci][1]
            ci += 1
            outstanding = int(current.sum()) - sum(1 for s in contributed if current[s])
            if contributed and outstanding == 0:
                return now, "members"
            continue
        slot = int(slots[i])
        i += 1
        if not current[slot] or slot in contributed:
            continue
        contributed.add(slot)
        outstanding -= 1
        if opened is None:
            opened = now
        if outstanding == 0:
            return now, "push"
    if opened is not None:
        return opened + timeout, "timeout"
    return NEVER
