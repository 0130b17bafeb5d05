"""A parameter server that restarts from a checkpoint is a pause for the worker, never a failed task.

The worker's real training loop runs against an in-process `ParameterStore` behind a client that can "restart"
it: the store is replaced by one restored from an earlier snapshot (what the PS does from its checkpoint) and the
next calls find the server unreachable, as a worker sees a PS killed and restarted by its supervisor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushResult
from dist_llm_train.paramserver.job import JobSnapshot, ParameterStore
from dist_llm_train.paramserver.transport.client import PSClient
from dist_llm_train.worker.training_loop import TrainingContext, TrainingOutcome, run_training

STEPS = 10


def tiny_config() -> Any:
    return parse_config(
        {
            "model": {"n_layer": 1, "n_embd": 16, "n_head": 2},
            "training": {"num_workers": 1, "steps": STEPS, "batch_size": 4, "seq_length": 8, "num_samples": 400},
        }
    )


class RestartingClient(PSClient):
    """An in-process PS whose `restart(snapshot, unreachable_calls)` mimics kill -9 + resume from a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.store = ParameterStore()
        self.unreachable_calls = 0
        self.pushes: list[tuple[int, str]] = []  # (base_version, outcome or error code) as the server saw them
        self.before_push: Any = None  # hook(client, header) run before each push reaches the server
        self.after_push: Any = None  # hook(client, header, result) run after a push was answered

    def snapshot(self) -> JobSnapshot:
        return self.store.snapshots()[0]

    def restart(self, snap: JobSnapshot, unreachable_calls: int = 0) -> None:
        self.store = ParameterStore()
        self.store.restore(snap)
        self.unreachable_calls = unreachable_calls

    def _reachable(self) -> None:
        if self.unreachable_calls > 0:
            self.unreachable_calls -= 1
            raise PSError(ErrorCode.UNAVAILABLE, "connection refused (restarting)")

    def init_job(self, *a: Any) -> Any:
        self._reachable()
        return self.store.init_job(*a)

    def pull(self, job_id: str, worker_id: str, min_version: int = 0, wait_timeout_s: float = 0.0,
             have: Any = None, own: Any = None) -> Any:
        self._reachable()
        kw = {} if have is None else {"have_epoch": have.epoch, "have_version": have.version}
        return self.store.pull(job_id, worker_id, min_version, min(wait_timeout_s, 5.0), **kw)

    def push(self, header: PushHeader, payload: bytes) -> PushResult:
        if self.before_push is not None:
            self.before_push(self, header)
        self._reachable()
        try:
            result = self.store.push(header, payload)
        except PSError as err:
            self.pushes.append((header.base_version, err.code.value))
            raise
        self.pushes.append((header.base_version, result.outcome.value))
        if self.after_push is not None:
            self.after_push(self, header, result)
        return result

    def set_members(self, *a: Any) -> Any:
        raise NotImplementedError

    def stats(self, *a: Any) -> Any:
        return self.store.stats(*a)

    def close(self) -> None:
        pass


def train(client: RestartingClient) -> TrainingOutcome:
    ctx = TrainingContext(job_id="restart", worker_id="w0", config=tiny_config(), ps_transport="grpc",
                          ps_address="", shard_ids={0}, num_shards=1, members=["w0"])
    return run_training(ctx, threading.Event(), lambda: {0}, lambda row: None, client=client)


def restart_behind(checkpoint_at: int, dies_at: int) -> Callable[[RestartingClient, PushHeader], None]:
    """A before-push hook: checkpoint when a push is based on `checkpoint_at`, and when one is based on `dies_at`
    restart the server from that checkpoint (unreachable for two calls), once."""
    saved: dict[str, JobSnapshot] = {}

    def before(c: RestartingClient, header: PushHeader) -> None:
        if header.base_version == checkpoint_at and "ckpt" not in saved:
            saved["ckpt"] = c.snapshot()
        if header.base_version == dies_at and "restarted" not in saved:
            saved["restarted"] = saved["ckpt"]
            c.restart(saved["ckpt"], unreachable_calls=2)

    return before


def test_push_refused_by_a_server_restarted_behind_it_is_pulled_again() -> None:
    """Checkpoint at version 3, server dies at 6: the worker's update on 6 is refused (ABORTED), it pulls
    version 3 and trains on to the end; the run loses 3 versions, not the task."""
    client = RestartingClient()
    client.before_push = restart_behind(checkpoint_at=3, dies_at=6)
    out = train(client)
    assert out.job_complete
    assert out.restarts.rebases == 1 and out.restarts.outages >= 2
    assert (6, ErrorCode.ABORTED.value) in client.pushes
    assert client.store.stats("restart")[0].version == STEPS
    assert client.store.stats("restart")[0].counters["rejected_aborted"] == 1


def test_acknowledged_update_lost_with_the_server_is_sent_again() -> None:
    """The server acknowledges the update on version 5, then dies before checkpointing version 6 and comes back
    at 5: the worker's wait for 6 would last a straggler timeout, so it sends the same update again (same step:
    a server that has it answers DUPLICATE) and the round closes at once."""
    client = RestartingClient()
    saved: dict[str, JobSnapshot] = {}

    def before(c: RestartingClient, header: PushHeader) -> None:
        if header.base_version == 5 and "ckpt" not in saved:
            saved["ckpt"] = c.snapshot()

    def after(c: RestartingClient, header: PushHeader, result: PushResult) -> None:
        if header.base_version == 5 and "restarted" not in saved:
            saved["restarted"] = saved["ckpt"]
            c.restart(saved["ckpt"], unreachable_calls=1)  # the pull that follows finds it away

    client.before_push, client.after_push = before, after
    out = train(client)
    assert out.job_complete
    assert out.restarts.resends == 1 and out.restarts.rebases == 0
    assert [p for p in client.pushes if p[0] == 5] == [(5, "APPLIED"), (5, "APPLIED")]
    assert client.store.stats("restart")[0].version == STEPS


def test_an_update_the_restarted_server_took_is_not_sent_again() -> None:
    """The push itself found the server away and was taken by the restarted one at its base version: the worker
    checks where the server is (an outage happened) but has nothing to resend."""
    client = RestartingClient()
    saved: dict[str, JobSnapshot] = {}

    def before(c: RestartingClient, header: PushHeader) -> None:
        if header.base_version == 5 and "restarted" not in saved:
            saved["restarted"] = c.snapshot()
            c.restart(saved["restarted"], unreachable_calls=2)

    client.before_push = before
    out = train(client)
    assert out.job_complete and out.restarts.outages == 2
    assert out.restarts.resends == 0 and out.restarts.rebases == 0
    assert [p for p in client.pushes if p[0] == 5] == [(5, "APPLIED")]


def test_a_restart_hidden_between_two_calls_still_rebases() -> None:
    """No call saw the server away (it restarted while the worker computed): the push itself tells."""
    client = RestartingClient()
    saved: dict[str, JobSnapshot] = {}

    def before(c: RestartingClient, header: PushHeader) -> None:
        if header.base_version == 2 and "ckpt" not in saved:
            saved["ckpt"] = c.snapshot()
        if header.base_version == 4 and "restarted" not in saved:
            saved["restarted"] = saved["ckpt"]
            c.restart(saved["ckpt"])

    client.before_push = before
    out = train(client)
    assert out.job_complete and out.restarts.rebases == 1 and out.restarts.outages == 0


def test_other_refusals_still_fail_the_task() -> None:
    """Only ABORTED is a restart; a refused update of any other kind still ends training with the error."""
    client = RestartingClient()

    def before(c: RestartingClient, header: PushHeader) -> None:
        if header.base_version == 2:
            raise PSError(ErrorCode.PERMISSION_DENIED, "not a member")

    client.before_push = before
    with pytest.raises(PSError) as err:
        train(client)
    assert err.value.code is ErrorCode.PERMISSION_DENIED


class OverlappingClient(RestartingClient):
    """The same in-process PS behind a client whose calls overlap (as gRPC's do): the worker sends each round's
    waiting pull alongside its push. Records when every call starts and ends. A push takes up to `wire_s` on
    the wire, as a real one takes hundreds of ms, and is answered as soon as the next pull is out: on this
    in-process server an instant push would otherwise race the pull's thread."""

    overlaps_calls = True

    def __init__(self, wire_s: float = 2.0) -> None:
        super().__init__()
        self.wire_s = wire_s
        self.events: list[tuple[str, int]] = []
        self._changed = threading.Condition()

    def _log(self, event: str, version: int) -> None:
        with self._changed:
            self.events.append((event, version))
            self._changed.notify_all()

    def pull(self, job_id: str, worker_id: str, min_version: int = 0, wait_timeout_s: float = 0.0,
             have: Any = None, **more: Any) -> Any:
        self._log("pull sent", min_version)
        return super().pull(job_id, worker_id, min_version, wait_timeout_s, have, **more)

    def push(self, header: PushHeader, payload: bytes) -> PushResult:
        self._log("push sent", header.base_version)
        with self._changed:
            self._changed.wait_for(lambda: ("pull sent", header.base_version + 1) in self.events, self.wire_s)
        result = super().push(header, payload)
        self._log("push answered", header.base_version)
        return result


def test_a_round_s_pull_is_sent_before_its_push_is_answered() -> None:
    """Sync (a barrier per version): the pull waiting for v + 1 leaves while the push on v is still unanswered,
    so a round costs the link one round trip; training ends where it does without the overlap."""
    client = OverlappingClient()
    out = train(client)
    assert out.job_complete and client.store.stats("restart")[0].version == STEPS
    for v in range(1, STEPS):
        answered = client.events.index(("push answered", v))
        assert ("pull sent", v + 1) in client.events[:answered], f"the pull for {v + 1} waited for the push on {v}"


def test_overlapping_pulls_survive_a_restart_behind_the_worker() -> None:
    """A pull sent alongside a push that the restarted server refuses is dropped; the worker rebases as before."""
    client = OverlappingClient()
    client.before_push = restart_behind(checkpoint_at=3, dies_at=6)
    out = train(client)
    assert out.job_complete and out.restarts.rebases == 1
    assert client.store.stats("restart")[0].version == STEPS
