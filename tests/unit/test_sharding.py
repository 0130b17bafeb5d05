"""`core.sharding`: the split of the flat vector over P parameter-server shards, and why rounds sum in a fixed order."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dist_llm_train.core.codecs import Encoded, get_codec
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.sharding import ALIGN, MAX_SHARDS, ShardPlan
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, TensorSpec
from dist_llm_train.paramserver.job import ParameterStore
from dist_llm_train.paramserver.transport.sharded import parse_addresses, split_update


@given(n=st.integers(1, 300_000), p=st.integers(1, MAX_SHARDS))
def test_plan_is_contiguous_and_byte_balanced(n: int, p: int) -> None:
    if n < p:
        with pytest.raises(ValueError, match="cannot be split"):
            ShardPlan.balanced(n, p)
        return
    plan = ShardPlan.balanced(n, p)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == n and plan.shards == p
    sizes = [plan.size(i) for i in range(p)]
    if n // ALIGN >= p:  # inner bounds between codec chunks; float32: bytes balanced = elements balanced
        assert all(b % ALIGN == 0 for b in plan.bounds[1:-1]) and max(sizes) - min(sizes) <= ALIGN
    else:
        assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1
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


SPLIT_CODECS = [
    ("none", {}),
    ("fp16", {}),
    ("int8", {}),
    ("int4", {}),
    ("int2", {}),
    ("topk", {"ratio": 0.01}),
    ("topk", {"ratio": 0.05, "index": "delta"}),
    ("sparseloco", {}),
    ("sparseloco", {"ratio": 0.03, "bits": 4, "chunk": 1024}),
]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60_000), p=st.integers(1, 5), which=st.integers(0, len(SPLIT_CODECS) - 1),
       seed=st.integers(0, 2**32 - 1))
def test_a_push_is_cut_into_pieces_that_decode_to_exactly_its_slices(n: int, p: int, which: int, seed: int) -> None:
    """Every codec's pieces decode, each at its slice's length, to exactly the slices of the whole decode; they
    stay in the pushed codec (same codes and scales) wherever the bounds fall between its chunks, which
    `ShardPlan.balanced` arranges for vectors of at least `ALIGN` elements per shard."""
    assume(n >= p)
    name, params = SPLIT_CODECS[which]
    codec = get_codec(name, **params)
    enc = codec.encode(np.random.default_rng(seed).standard_normal(n).astype(np.float32))
    plan = ShardPlan.balanced(n, p)
    pieces = split_update(_header(name, enc), enc.payload, plan)
    got = [get_codec(h.codec).decode(_encoded(h, piece), plan.size(i)) for i, (h, piece) in enumerate(pieces)]
    assert np.array_equal(np.concatenate(got), codec.decode(enc, n))
    assert all(h.payload_bytes == len(piece) for h, piece in pieces)
    sent = sum(len(piece) for _, piece in pieces)
    compressed = {h.codec for h, _ in pieces} == {name}
    if p == 1 or n // ALIGN >= p or name in ("none", "fp16", "topk"):
        assert compressed
    if compressed:  # cut between chunks and bytes: nothing added; SparseLoCo re-packs two bit streams per piece
        assert len(enc.payload) <= sent <= len(enc.payload) + (2 * p if name == "sparseloco" else 0)
    else:  # a chunk straddles a bound (possible only below ALIGN elements per shard): the slices go as float32
        assert {h.codec for h, _ in pieces} == {"none"} and sent == 4 * n


def test_a_chunk_size_that_straddles_the_bounds_falls_back_to_float32_slices() -> None:
    n = 3 * ALIGN + 5
    enc = get_codec("int8", chunk=1000).encode(np.linspace(-1, 1, n, dtype=np.float32))
    pieces = split_update(_header("int8", enc), enc.payload, ShardPlan.balanced(n, 3))
    assert [(h.codec, len(piece)) for h, piece in pieces] == [("none", 4 * ALIGN)] * 2 + [("none", 4 * (ALIGN + 5))]


def _header(codec: str, enc: Encoded) -> PushHeader:
    return PushHeader(job_id="j", worker_id="w", step=1, base_version=0, codec=codec,
                      codec_meta=msgpack.packb(enc.meta), payload_bytes=len(enc.payload))


def _encoded(header: PushHeader, payload: memoryview) -> Encoded:
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
