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


def close_time(
    push_time: np.ndarray, push_slot: np.ndarray, members: np.ndarray, changes: list[MembershipChange],
    timeout: float,
) -> tuple[float, bool]:
    """(close time, timed out) for updates arriving at `push_time` from `push_slot` (any order).

    `members` is the mask when the round starts; `changes` are later (time, mask) pairs in time order.
    Returns (inf, False) when the round cannot close on what is known."""
    order = np.argsort(push_time, kind="stable")
    t_sorted, s_sorted = push_time[order], push_slot[order]
    fast = _constant_membership(t_sorted, s_sorted, members, timeout)
    if not changes or changes[0][0] >= fast[0]:
        return fast
    return _replay(t_sorted, s_sorted, members, changes, timeout)


def _constant_membership(t: np.ndarray, slots: np.ndarray, members: np.ndarray,
                         timeout: float) -> tuple[float, bool]:
    is_member = members[slots]
    mt = t[is_member]
    if mt.size == 0:
        return math.inf, False
    deadline = float(mt[0]) + timeout
    pushed = np.unique(slots[is_member])
    if pushed.size == int(members.sum()):
        # Everyone contributes: the round closes with the last member's first update, unless that is late.
        first_each = _first_per_slot(mt, slots[is_member])
        last = float(first_each.max())
        if last <= deadline:
            return last, False
    return deadline, True


def _first_per_slot(t: np.ndarray, slots: np.ndarray) -> np.ndarray:
    _, first_idx = np.unique(slots, return_index=True)
    return t[first_idx]


def _replay(t: np.ndarray, slots: np.ndarray, members: np.ndarray, changes: list[MembershipChange],
            timeout: float) -> tuple[float, bool]:
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
            return opened + timeout, True
        if t_change <= t_push:
            current = changes[ci][1]
            ci += 1
            outstanding = int(current.sum()) - sum(1 for s in contributed if current[s])
            if contributed and outstanding == 0:
                return now, False
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
            return now, False
    if opened is not None:
        return opened + timeout, True
    return math.inf, False
