"""MembershipSync: only differences are sent, failures never escape, finished jobs are emptied once."""

from __future__ import annotations

import socket

from dist_llm_train.controller.membership import MembershipSync, PSMembershipNotifier
from dist_llm_train.core.types import ErrorCode, PSError


class Notifier:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.error: Exception | None = None

    def set_members(self, job_id: str, members: list[str]) -> None:
        if self.error:
            raise self.error
        self.calls.append((job_id, members))

    def close(self) -> None:
        pass


def test_sends_only_differences_and_empties_finished_jobs() -> None:
    desired: dict[str, list[str]] = {"j1": ["b", "a"], "j2": []}
    n = Notifier()
    sync = MembershipSync(n, lambda: {k: list(v) for k, v in desired.items()})
    assert sync.sync().sent == {"j1": ["a", "b"]}  # j2 never had members: nothing to tell the PS
    assert sync.sync().sent == {}
    desired["j1"] = ["a"]
    assert sync.sync().sent == {"j1": ["a"]}
    del desired["j1"]  # job finished: no longer in the desired set
    assert sync.sync().sent == {"j1": []}
    assert sync.sync().sent == {}
    assert n.calls == [("j1", ["a", "b"]), ("j1", ["a"]), ("j1", [])]


def test_errors_are_counted_and_the_difference_retried() -> None:
    n = Notifier()
    sync = MembershipSync(n, lambda: {"j": ["a"]})
    n.error = RuntimeError("boom")
    assert sync.sync().failed == {"j": "RuntimeError: boom"} and sync.failures == 1
    n.error = PSError(ErrorCode.DEADLINE_EXCEEDED, "slow")
    sync.sync()
    assert sync.failures == 2 and sync.pending() == {"j": ["a"]}
    n.error = PSError(ErrorCode.NOT_FOUND, "no such job")
    assert sync.sync().waiting == ["j"] and sync.failures == 2
    n.error = None
    assert sync.sync().sent == {"j": ["a"]} and sync.pending() == {}
    assert sync.acknowledged() == {"j": ["a"]}


def test_real_notifier_against_a_dead_port_fails_cleanly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    notifier = PSMembershipNotifier("grpc", f"127.0.0.1:{port}", timeout_s=0.5)
    sync = MembershipSync(notifier, lambda: {"j": ["a"]})
    for _ in range(2):
        report = sync.sync()
        assert list(report.failed) == ["j"]
    assert sync.failures == 2 and sync.pending() == {"j": ["a"]}
    notifier.close()


def test_a_ps_that_lost_the_membership_gets_it_again() -> None:
    """A PS restarted from a checkpoint holds the members of that checkpoint: the controller notices it in its
    stats poll and sends the current membership again (once, not every poll)."""
    from types import SimpleNamespace

    class RestartableNotifier(Notifier):
        def __init__(self) -> None:
            super().__init__()
            self.held: dict[str, list[str]] = {}
            self.polls = 0

        def set_members(self, job_id: str, members: list[str]) -> None:
            super().set_members(job_id, members)
            self.held[job_id] = list(members)

        def job_stats(self, job_id: str) -> SimpleNamespace:
            self.polls += 1
            return SimpleNamespace(members=list(reversed(self.held[job_id])), workers=[], counters={})

    n = RestartableNotifier()
    sync = MembershipSync(n, lambda: {"j": ["a", "b"]})
    assert sync.sync().sent == {"j": ["a", "b"]}
    sync.refresh_worker_stats(now=0.0)
    assert sync.pending() == {} and sync.resyncs == 0  # same members in another order: nothing to resend
    n.held["j"] = ["a", "b", "c"]  # the checkpoint still had c, who died after it was written
    sync.refresh_worker_stats(now=1.0)
    assert n.polls == 1  # polled at most every 2 s
    sync.refresh_worker_stats(now=2.5)
    assert sync.resyncs == 1 and sync.pending() == {"j": ["a", "b"]}
    assert sync.sync().sent == {"j": ["a", "b"]} and n.held["j"] == ["a", "b"]
    sync.refresh_worker_stats(now=5.0)
    assert sync.resyncs == 1 and sync.pending() == {}
