"""`core.sharding`: the split of the flat vector over P parameter-server shards, and why rounds sum in a fixed order."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dist_llm_train.core.codecs import get_codec
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.sharding import MAX_SHARDS, ShardPlan
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, TensorSpec
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.transport.sharded import parse_addresses, split_update


@given(n=st.integers(1, 10_000), p=st.integers(1, MAX_SHARDS))
def test_plan_is_contiguous_and_byte_balanced(n: int, p: int) -> None:
    if n < p:
        with pytest.raises(ValueError, match="cannot be split"):
            ShardPlan.balanced(n, p)
        return
    plan = ShardPlan.balanced(n, p)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == n and plan.shards == p
    sizes = [plan.size(i) for i in range(p)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # float32: bytes balanced = elements balanced
    vec = np.arange(n, dtype=np.float32)
    assert np.array_equal(plan.join(plan.split(vec)), vec)


@pytest.mark.parametrize("p", [0, MAX_SHARDS + 1, 2.0])
def test_shard_count_out_of_range_is_refused(p: object) -> None:
    with pytest.raises(ValueError, match="1..64"):
        ShardPlan.balanced(100, p)  # type: ignore[arg-type]


def test_join_refuses_slices_of_the_wrong_size() -> None:
    plan = ShardPlan.balanced(10, 3)
    with pytest.raises(ValueError, match="shard 1"):
        plan.join([np.zeros(4), np.zeros(2), np.zeros(3)])
    with pytest.raises(ValueError, match="2 slices"):
        plan.join([np.zeros(4), np.zeros(6)])


def test_shard_layouts_cover_their_slice_with_named_pieces() -> None:
    layout = [TensorSpec("a", (2, 2), 0), TensorSpec("b", (6,), 4)]  # 10 elements: slices [0,4) [4,7) [7,10)
    plan = ShardPlan.balanced(10, 3)
    assert plan.layout(layout, 0) == [TensorSpec("a", (2, 2), 0)]
    assert plan.layout(layout, 1) == [TensorSpec("b[0:3]", (3,), 0)]
    assert plan.layout(layout, 2) == [TensorSpec("b[3:6]", (3,), 0)]
    gappy = [TensorSpec("a", (2,), 0)]  # elements 2..9 belong to no tensor
    assert plan.layout(gappy, 2) == [TensorSpec("flat[7:10]", (3,), 0)]


def test_addresses() -> None:
    assert parse_addresses("h:1, h:2") == ["h:1", "h:2"]
    for bad, word in (("h:1,", "empty"), ("h:1,h:1", "twice"), (",".join(f"h:{i}" for i in range(65)), "64")):
        with pytest.raises(ValueError, match=word):
            parse_addresses(bad)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk"])
def test_split_update_carries_exactly_the_decoded_values(codec: str) -> None:
    vec = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    enc = get_codec(codec, ratio=0.1).encode(vec)
    header = PushHeader(job_id="j", worker_id="w", step=1, base_version=0, codec=codec,
                        codec_meta=msgpack.packb(enc.meta), payload_bytes=len(enc.payload))
    plan = ShardPlan.balanced(1000, 3)
    pieces = split_update(header, enc.payload, plan)
    whole = get_codec(codec, ratio=0.1).decode(enc, 1000)
    got = [get_codec(h.codec).decode(_encoded(h, p), plan.size(i)) for i, (h, p) in enumerate(pieces)]
    assert np.array_equal(np.concatenate(got), whole)
    assert all(h.payload_bytes == len(p) for h, p in pieces)
    if codec in ("none", "fp16"):  # cut as bytes: the same wire size
        assert sum(len(p) for _, p in pieces) == len(enc.payload) and pieces[0][0].codec == codec


def _encoded(header: PushHeader, payload: memoryview) -> object:
    from dist_llm_train.core.codecs import Encoded

    meta = msgpack.unpackb(header.codec_meta) if header.codec_meta else {}
    return Encoded(bytes(payload), meta)


def test_split_update_refuses_a_payload_of_the_wrong_size() -> None:
    header = PushHeader(job_id="j", worker_id="w", step=1, base_version=0, payload_bytes=12)
    with pytest.raises(PSError) as err:
        split_update(header, b"\0" * 12, ShardPlan.balanced(4, 2))
    assert err.value.code is ErrorCode.INVALID_ARGUMENT


def test_a_round_sums_in_worker_order_whatever_the_arrival_order() -> None:
    """Float addition is not associative: three updates summed in arrival order would give different bits for
    different orders, and P shards each see their own order. Rounds sum in worker-id order instead."""
    updates = {"a": np.float32(1e17), "b": np.float32(-1e17), "c": np.float32(1.0)}  # float64: (a+b)+c != (a+c)+b
    results = set()
    for order in itertools.permutations(updates):
        store = ParameterStore()
        spec = JobSpec.from_wire(WireJobSpec(job_id="r", mode="sync", optimizer="sgd", learning_rate=1.0,
                                             momentum=0.0, options={"update_bound": '{"enabled": false}'}))
        store.init_job(spec, [TensorSpec("w", (1,), 0)], np.zeros(1, np.float32), list(updates))
        for step, worker in enumerate(order, 1):
            payload = np.full(1, updates[worker], np.float32).tobytes()
            store.push(PushHeader(job_id="r", worker_id=worker, step=step, base_version=0, payload_bytes=4), payload)
        results.add(store.pull("r", "a").params.tobytes())
    assert len(results) == 1
