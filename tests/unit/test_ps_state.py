"""ParameterStore rules without a transport: fake clock for straggler deadlines, threads for
the blocking and async waits, and a concurrent-push check of the locking."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.job import JobSnapshot, ParameterStore


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_store(**kw: Any) -> tuple[ParameterStore, FakeClock]:
    clock = FakeClock()
    return ParameterStore(1 << 20, clock=clock, **kw), clock


def init(
    store: ParameterStore, job_id: str = "j", n: int = 4, members: list[str] | None = None, **spec_kw: Any
) -> np.ndarray:
    spec = JobSpec.from_wire(WireJobSpec(job_id, optimizer="sgd", learning_rate=1.0, momentum=0.0, **spec_kw))
    params = np.zeros(n, np.float32)
    store.init_job(spec, [TensorSpec("w", (n,), 0)], params, members or [])
    return params


def push(
    store: ParameterStore,
    worker: str,
    step: int,
    base: int,
    value: float = 1.0,
    n: int = 4,
    job_id: str = "j",
) -> PushOutcome:
    payload = np.full(n, value, "<f4").tobytes()
    return store.push(PushHeader(job_id, worker, step, base, payload_bytes=len(payload)), payload).outcome


def test_straggler_deadline_follows_the_clock() -> None:
    store, clock = make_store()
    init(store, members=["a", "b"], straggler_timeout_s=5.0)
    assert store.next_deadline() is None  # no round open before the first update
    assert push(store, "a", 1, 0) is PushOutcome.BUFFERED
    assert store.next_deadline() == pytest.approx(105.0)
    clock.t = 104.9
    assert store.expire_rounds() == 0 and store.stats("j")[0].version == 0
    clock.t = 105.0
    assert store.expire_rounds() == 1
    stats = store.stats("j")[0]
    assert stats.version == 1 and stats.counters["rounds_timed_out"] == 1
    assert store.next_deadline() is None
    np.testing.assert_array_equal(store.pull("j", "a").params, np.full(4, -1.0))


def test_round_mean_of_members() -> None:
    store, _ = make_store()
    init(store, members=["a", "b"])
    push(store, "a", 1, 0, value=1.0)
    assert push(store, "b", 1, 0, value=3.0) is PushOutcome.APPLIED
    np.testing.assert_array_equal(store.pull("j", "a").params, np.full(4, -2.0))


def test_same_worker_twice_in_a_round_is_duplicate_not_double_counted() -> None:
    store, _ = make_store()
    init(store, members=["a", "b"])
    push(store, "a", 1, 0)
    assert push(store, "a", 2, 0, value=100.0) is PushOutcome.DUPLICATE
    push(store, "b", 1, 0, value=1.0)
    np.testing.assert_array_equal(store.pull("j", "a").params, np.full(4, -1.0))


def test_blocking_pull_wakes_when_the_round_closes() -> None:
    store, _ = make_store()
    init(store, members=["a", "b"])
    push(store, "a", 1, 0)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(store.pull("j", "a", min_version=1, wait_timeout_s=30).version))
    t.start()
    push(store, "b", 1, 0)
    t.join(timeout=30)
    assert result == [1]


def test_async_pull_wakes_from_a_push_in_another_thread() -> None:
    store, _ = make_store()
    init(store, members=["a", "b"])
    push(store, "a", 1, 0)

    async def main() -> int:
        waiting = asyncio.create_task(store.pull_async("j", "a", min_version=1, wait_timeout_s=30))
        await asyncio.sleep(0)
        await asyncio.to_thread(push, store, "b", 1, 0)
        return (await asyncio.wait_for(waiting, 30)).version

    assert asyncio.run(main()) == 1


def test_async_pull_timeout_returns_current_version() -> None:
    store, _ = make_store()
    init(store)
    assert asyncio.run(store.pull_async("j", "a", min_version=3, wait_timeout_s=0.01)).version == 0


def test_concurrent_async_pushes_are_all_applied_exactly_once() -> None:
    store, _ = make_store()
    # Exact arithmetic of racing pushes: unit updates of norm 31.6 on zero parameters, unclipped.
    unbounded = {"update_bound": '{"enabled": false}'}
    init(store, n=1000, mode="async", max_staleness=10_000, total_steps=10_000, options=unbounded)
    workers, per_worker = 4, 25

    def run(w: int) -> None:
        for s in range(per_worker):
            base = store.pull("j", f"w{w}").version
            push(store, f"w{w}", s, base, n=1000)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    pulled = store.pull("j", "w0")
    assert pulled.version == workers * per_worker
    np.testing.assert_array_equal(pulled.params, np.full(1000, -float(workers * per_worker)))


def test_inverse_staleness_scaling_is_an_option() -> None:
    store, _ = make_store()
    init(store, mode="async", options={"staleness_scaling": "inverse"})
    push(store, "a", 1, 0)  # staleness 0: full step
    push(store, "b", 1, 0)  # staleness 1: half step
    np.testing.assert_allclose(store.pull("j", "a").params, np.full(4, -1.5))
    with pytest.raises(ValueError, match="staleness_scaling"):  # refused where the wire form is parsed
        init(store, job_id="k", mode="async", options={"staleness_scaling": "magic"})
    with pytest.raises(ValueError, match="unknown keys"):  # sync has no such field
        init(store, job_id="k", options={"staleness_scaling": "inverse"})


def test_returned_params_are_read_only_and_never_change() -> None:
    store, _ = make_store()
    init(store, mode="async")
    before = store.pull("j", "a").params
    with pytest.raises(ValueError):
        before[0] = 1.0
    push(store, "a", 1, 0)
    assert np.array_equal(before, np.zeros(4))  # a new version is a new array


def test_checkpoint_hook_gets_creation_every_n_and_completion() -> None:
    seen: list[JobSnapshot] = []
    store, _ = make_store(checkpoint_hook=seen.append, checkpoint_every=2)
    init(store, mode="async", total_steps=5)
    for s in range(5):
        push(store, "a", s, s)
    assert [s.version for s in seen] == [0, 2, 4, 5]


def test_open_membership_first_pusher_closes_round_alone() -> None:
    """Documented trade-off: without SetMembers a sync round counts only workers already seen."""
    store, _ = make_store()
    init(store)
    assert push(store, "a", 1, 0) is PushOutcome.APPLIED
    assert push(store, "b", 1, 0) is PushOutcome.LATE_DROPPED
    assert push(store, "b", 2, 1) is PushOutcome.BUFFERED  # b joined: the next round waits for both
    assert push(store, "a", 2, 1) is PushOutcome.APPLIED
    assert store.stats("j")[0].members == ["a", "b"]


def test_set_members_to_nobody_denies_everyone() -> None:
    store, _ = make_store()
    init(store, members=["a"])
    assert store.set_members("j", []) == (0, [])
    with pytest.raises(PSError) as err:
        push(store, "a", 1, 0)
    assert err.value.code is ErrorCode.PERMISSION_DENIED


def test_members_are_deduplicated_and_validated() -> None:
    store, _ = make_store()
    init(store)
    assert store.set_members("j", ["a", "b", "a"]) == (0, ["a", "b"])
    with pytest.raises(PSError):
        store.set_members("j", ["ok", "x" * 300])
    assert store.stats("j")[0].members == ["a", "b"]


def _push_encoded(store: ParameterStore, worker: str, step: int, base: int, vec: np.ndarray, codec: str) -> PushOutcome:
    import msgpack

    from dist_llm_train.core.codecs import get_codec

    enc = get_codec(codec, ratio=0.5).encode(vec)
    header = PushHeader(
        "j",
        worker,
        step,
        base,
        codec=codec,
        codec_meta=msgpack.packb(enc.meta),
        payload_bytes=len(enc.payload),
    )
    return store.push(header, enc.payload).outcome


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4", "int2", "topk", "sparseloco"])
def test_registry_codecs_are_decoded(codec: str) -> None:
    store, _ = make_store()
    init(store, n=8, mode="async")
    vec = np.array([4.0, -2.0, 0.5, 0.0, 1.0, -8.0, 0.25, 2.0], np.float32)
    assert _push_encoded(store, "a", 1, 0, vec, codec) is PushOutcome.APPLIED
    got = -store.pull("j", "a").params  # lr 1 from zeros: params = -decoded update
    if codec == "topk":  # keeps the 4 largest magnitudes
        np.testing.assert_array_equal(got, np.where(np.abs(vec) >= 2.0, vec, 0.0))
    elif codec == "int2":  # absmax 8: levels ±2, ±6 (the centres of four cells of width 4)
        np.testing.assert_array_equal(got, [6.0, -2.0, 2.0, 2.0, 2.0, -6.0, 2.0, 2.0])
    elif codec == "sparseloco":  # one chunk of 8 keeps its 4 largest, 2-bit values: levels ±1, ±3 · 8/4
        np.testing.assert_array_equal(got, [6.0, -2.0, 0.0, 0.0, 0.0, -6.0, 0.0, 2.0])
    else:  # int4: error <= 8/14
        np.testing.assert_allclose(got, vec, atol=0.07 if codec != "int4" else 8 / 14)


def test_robust_rule_ignores_an_outlier() -> None:
    store, _ = make_store()
    init(store, members=["a", "b", "c"], aggregation="median")
    push(store, "a", 1, 0, value=1.0)
    push(store, "b", 1, 0, value=2.0)
    push(store, "c", 1, 0, value=1e6)
    np.testing.assert_array_equal(store.pull("j", "a").params, np.full(4, -2.0))


def test_rule_undefined_for_a_short_round_falls_back_to_median() -> None:
    store, clock = make_store()
    init(
        store,
        members=["a", "b", "c", "d"],
        aggregation="krum",
        aggregation_params={"f": 1.0},
        straggler_timeout_s=1.0,
    )
    for w, value in (("a", 1.0), ("b", 3.0), ("c", 1e6)):
        push(store, w, 1, 0, value=value)
    clock.t += 2
    assert store.expire_rounds() == 1  # 3 updates < 2f+3: krum is undefined for this round
    np.testing.assert_array_equal(store.pull("j", "a").params, np.full(4, -3.0))
    assert store.stats("j")[0].counters["aggregation_fallback_median"] == 1


def test_unknown_rule_or_bad_params_refused_at_init() -> None:
    store, _ = make_store()
    for kw in ({"aggregation": "vibes"}, {"aggregation": "krum", "aggregation_params": {"f": 0.5}}):
        with pytest.raises(PSError) as err:
            init(store, job_id="bad", **kw)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert store.stats("bad") == []
