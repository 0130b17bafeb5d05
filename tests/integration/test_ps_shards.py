"""Sharded parameter servers: P = 1 and P = 3 train the same model to the same bits.

Two real workers (the worker's own training loop, in threads) train against one PS or three PS shards (real
gRPC / ZMQ servers on loopback, addressed as "host:port,host:port,host:port"). With the same seed every worker's
loss at every step and the final parameters must be identical: the shards apply the same element-wise maths to
their slices, and rounds sum their updates in worker-id order whatever the arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import ParamServerConfig, parse_config
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.sharding import ShardPlan, check_shardable
from dist_llm_train.core.types import ErrorCode, PSError, PushHeader, PushOutcome, TensorSpec
from dist_llm_train.paramserver.background import BackgroundServer
from dist_llm_train.paramserver.transport.client import connect
from dist_llm_train.paramserver.transport.sharded import ShardedPSClient
from dist_llm_train.worker.training_loop import TrainingContext, run_training

WORKERS = ("w0", "w1", "w2")  # three: a sum of three depends on its order, so the round order matters
_BUILD = threading.Lock()


@pytest.fixture(autouse=True)
def one_trainer_built_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer seeds torch's process-wide RNG while it builds its model (a worker process owns one trainer);
    two worker threads building at once would draw each other's numbers. Dropout is off, so after the build
    nothing else reads that RNG."""
    from dist_llm_train.worker import training_loop

    real = training_loop.LocalTrainer

    def build(*args: Any, **kwargs: Any) -> Any:
        with _BUILD:
            return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, "LocalTrainer", build)


@contextlib.contextmanager
def shards(transport: str, count: int) -> Iterator[str]:
    """`count` PS servers; yields the (comma-separated when count > 1) address."""
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(BackgroundServer(ParamServerConfig(port=0, metrics_port=0, transport=transport),
                                                 with_metrics=False))
            for _ in range(count)
        ]
        yield ",".join(s.address for s in servers)


def config(strategy: dict[str, Any], codec: str = "none", n_embd: int = 16) -> Any:
    return parse_config({
        "model": {"n_layer": 1, "n_embd": n_embd, "n_head": 2},
        "training": {"num_workers": 3, "steps": 8, "batch_size": 4, "seq_length": 8, "num_samples": 400,
                     "strategy": strategy, "codec": {"name": codec}, "seed": 7},
    })


def train(transport: str, address: str, cfg: Any, job_id: str) -> tuple[dict[str, list[float]], np.ndarray, int]:
    """Every worker's loss per step, the final parameters, and the update bytes the PS (all shards) received."""
    losses: dict[str, list[float]] = {w: [] for w in WORKERS}
    errors: list[BaseException] = []

    def worker(i: int, name: str) -> None:
        ctx = TrainingContext(job_id=job_id, worker_id=name, config=cfg, ps_transport=transport, ps_address=address,
                              shard_ids={i}, num_shards=len(WORKERS), members=list(WORKERS), worker_name=name)
        try:
            out = run_training(ctx, threading.Event(), lambda: {i}, lambda row: losses[name].append(row["loss"]))
            assert out.job_complete
        except BaseException as err:  # reported by the test thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, w)) for i, w in enumerate(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    with connect(transport, address) as ps:
        final = ps.pull(job_id, "reader")
        assert final.job_complete
        counters = ps.stats(job_id)[0].counters
    received = sum(v for k, v in counters.items() if k.startswith("bytes_received_"))
    return losses, final.params, received


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
@pytest.mark.parametrize(
    ("strategy", "codec", "n_embd"),
    [
        ({"name": "sync"}, "none", 16),
        ({"name": "diloco", "local_steps": 2}, "none", 16),
        ({"name": "sync"}, "int8", 16),  # 3,696 parameters: too few to cut between int8's chunks, pushed as floats
        ({"name": "diloco", "local_steps": 2}, "int4", 64),  # 51,648: each shard gets its slice in int4
        ({"name": "sync"}, "sparseloco", 64),
    ],
    ids=["sync", "diloco", "sync-int8-small", "diloco-int4", "sync-sparseloco"],
)
def test_one_and_three_shards_give_identical_training(
    transport: str, strategy: dict[str, Any], codec: str, n_embd: int
) -> None:
    cfg = config(strategy, codec, n_embd)
    with shards(transport, 1) as one:
        losses_1, params_1, bytes_1 = train(transport, one, cfg, "p1")
    with shards(transport, 3) as three:
        losses_3, params_3, bytes_3 = train(transport, three, cfg, "p3")
    assert all(len(v) >= 2 for v in losses_1.values())
    assert losses_3 == losses_1  # every worker's loss at every step, bit for bit
    assert params_3.dtype == np.float32 and np.array_equal(params_3, params_1)
    assert losses_1["w0"][-1] < losses_1["w0"][0]  # and it trained
    if n_embd == 64:  # compressed on every shard's link: int4 cut at chunk bounds costs nothing, SparseLoCo's
        # re-packed bit streams at most a padding byte per stream per shard
        pushes = sum(len(v) for v in losses_1.values()) // (2 if strategy["name"] == "diloco" else 1)
        assert bytes_1 <= bytes_3 <= bytes_1 + 2 * 3 * pushes
        if codec == "int4":
            assert bytes_3 == bytes_1


def spec(job_id: str, **kw: Any) -> JobSpec:
    return JobSpec.from_wire(WireJobSpec(job_id=job_id, optimizer="sgd", learning_rate=1.0, momentum=0.0, **kw))


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_a_version_is_complete_only_when_every_shard_has_it(transport: str) -> None:
    """Each shard holds its slice; a pull joins them and reports the lowest shard version."""
    with shards(transport, 3) as address:
        n = 10
        params = np.arange(n, dtype=np.float32)
        with connect(transport, address) as ps:
            assert isinstance(ps, ShardedPSClient)
            assert ps.init_job(spec("v", mode="sync"), [TensorSpec("a", (4,), 0), TensorSpec("b", (2, 3), 4)],
                               params, ["w0"]).created
            update = np.ones(n, dtype=np.float32)
            header = PushHeader(job_id="v", worker_id="w0", step=1, base_version=0, payload_bytes=4 * n)
            assert ps.push(header, update.tobytes()).outcome is PushOutcome.APPLIED
            pulled = ps.pull("v", "w0", min_version=1, wait_timeout_s=5)
            assert pulled.version == 1 and np.array_equal(pulled.params, params - 1)
            assert [t.name for t in pulled.layout] == ["a", "b"]
            # Each shard is an ordinary PS holding its slice, layout pieces named by element range.
            plan = ShardPlan.balanced(n, 3)
            for i, shard in enumerate(ps.shards):
                own = shard.pull("v", "w0")
                assert np.array_equal(own.params, (params - 1)[plan.slices()[i]])
            assert [t.name for t in ps.shards[1].pull("v", "w0").layout] == ["b[0:3]"]
            # Push to one shard alone (as if the others had not got it yet): the joined version stays at 1.
            one = PushHeader(job_id="v", worker_id="w0", step=2, base_version=1, payload_bytes=4 * plan.size(0))
            ps.shards[0].push(one, update[: plan.size(0)].tobytes())
            assert ps.pull("v", "w0").version == 1
            # The full push then completes version 2 everywhere; the shard that had it answers DUPLICATE.
            again = PushHeader(job_id="v", worker_id="w0", step=2, base_version=1, payload_bytes=4 * n)
            assert ps.push(again, update.tobytes()).outcome is PushOutcome.APPLIED
            assert ps.pull("v", "w0").version == 2
            stats = ps.stats("v")[0]
            assert stats.version == 2 and stats.num_params == n
            assert stats.counters["bytes_received"] == 4 * n * 2


def push_all(ps: Any, job_id: str, step: int, update: np.ndarray) -> PushOutcome:
    data = np.asarray(update, dtype="<f4").tobytes()
    header = PushHeader(job_id=job_id, worker_id="w0", step=step, base_version=step, payload_bytes=len(data))
    outcome: PushOutcome = ps.push(header, data).outcome
    return outcome


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_downlink_deltas_per_shard_keep_the_client_bit_identical_with_fewer_bytes(transport: str) -> None:
    """A job with a downlink codec on 3 shards: a pull passing the vector the client returned last gets each
    shard's deltas since its piece, and rebuilds exactly the shards' published parameters; a `have` the client
    did not return gets them in full."""
    n = 30_000
    with shards(transport, 3) as address, connect(transport, address) as ps:
        assert isinstance(ps, ShardedPSClient)
        ps.init_job(spec("dl", mode="async", options={"downlink": '{"name": "topk", "ratio": 0.01}'}),
                    [TensorSpec("w", (n,), 0)], np.linspace(-1, 1, n, dtype=np.float32), ["w0"])
        held = ps.pull("dl", "w0")
        assert held.epoch != 0
        rng = np.random.default_rng(0)
        for step in range(4):
            assert push_all(ps, "dl", step, rng.standard_normal(n)) is PushOutcome.APPLIED
            before = ps.bytes_received
            held = ps.pull("dl", "w0", min_version=step + 1, wait_timeout_s=5, have=held)
            assert held.version == step + 1
            assert ps.bytes_received - before < 0.05 * 4 * n  # 1 % of each slice and its indices, not the model
        full = ps.pull("dl", "w0")  # holds nothing: every shard's published slice in full
        assert full.params.tobytes() == held.params.tobytes()
        assert all(shard.stats("dl")[0].counters["pulls_delta"] == 4 for shard in ps.shards)
        stranger = dataclasses.replace(held)  # equal, but not a vector this client returned: full, still exact
        before = ps.bytes_received
        assert ps.pull("dl", "w0", have=stranger).params.tobytes() == held.params.tobytes()
        assert ps.bytes_received - before == 4 * n


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_a_worker_that_initialised_the_params_pulls_no_model_from_any_shard(transport: str) -> None:
    """`own` is cut as the job is split, and each shard checks its piece: a client that did not create the job
    (a fresh connection) gets nothing at version 0, then only the deltas; other parameters get the model."""
    n = 30_000
    initial = np.linspace(-1, 1, n, dtype=np.float32)
    job = spec("own", mode="async", options={"downlink": '{"name": "int8"}'})
    with shards(transport, 3) as address:
        with connect(transport, address) as creator:
            creator.init_job(job, [TensorSpec("w", (n,), 0)], initial, ["w0"])
        with connect(transport, address) as ps:
            first = ps.pull("own", "w0", own=initial.copy())
            assert ps.bytes_received == 0 and first.version == 0 and first.params.tobytes() == initial.tobytes()
            rng = np.random.default_rng(1)
            for step in range(2):
                assert push_all(ps, "own", step, rng.standard_normal(n)) is PushOutcome.APPLIED
        with connect(transport, address) as late:  # joins at version 2
            pulled = late.pull("own", "w0", own=initial.copy())
            plan = ShardPlan.balanced(n, 3)
            # two int8 deltas per shard, a scale per 1,024 values of each slice
            assert late.bytes_received == sum(2 * (k + 4 * -(-k // 1024)) for k in (plan.size(i) for i in range(3)))
            assert pulled.params.tobytes() == late.pull("own", "w0").params.tobytes()
            before = late.bytes_received
            late.pull("own", "w0", own=initial + np.float32(1.0))  # not the job's initial parameters
            assert late.bytes_received - before == 4 * n


def test_bad_push_is_refused_before_any_shard_sees_it() -> None:
    with shards("grpc", 2) as address, connect("grpc", address) as ps:
        ps.init_job(spec("bad", mode="sync"), [TensorSpec("w", (6,), 0)], np.zeros(6, np.float32), ["w0"])
        header = PushHeader(job_id="bad", worker_id="w0", step=1, base_version=0, payload_bytes=20)
        with pytest.raises(PSError) as err:
            ps.push(header, b"\0" * 20)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
        assert ps.stats("bad")[0].counters.get("pushes_applied", 0) == 0


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"aggregation": "krum", "aggregation_params": {"f": 1.0}}, "krum"),
        ({"aggregation": "multi_krum", "aggregation_params": {"f": 1.0}}, "multi_krum"),
        ({"aggregation": "bulyan", "aggregation_params": {"f": 1.0}}, "bulyan"),
        ({"aggregation": "centered_clipping", "aggregation_params": {"iterations": 1.0}}, "centered_clipping"),
        ({"aggregation": "median", "aggregation_params": {"bucket_size": 2.0}}, "bucketing"),
        ({"aggregation": "median", "aggregation_params": {"nnm_f": 1.0}}, "nnm"),
        ({"options": {"dp_noise_multiplier": "1.0", "dp_clip": "1.0"}}, "central DP"),
        ({"mode": "streaming_diloco"}, "streaming_diloco"),
    ],
)
def test_whole_vector_maths_is_refused_with_shards(kw: dict[str, Any], word: str) -> None:
    job = spec("refused", **kw)
    check_shardable(job, 1)  # one server: fine
    with pytest.raises(ValueError, match=word):
        check_shardable(job, 3)
    # The sharded client refuses it before any shard hears of the job.
    with shards("zmq", 2) as address, connect("zmq", address) as ps:
        with pytest.raises(PSError) as err:
            ps.init_job(job, [TensorSpec("w", (6,), 0)], np.zeros(6, np.float32), [])
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and word in err.value.message
        assert ps.stats() == []


def test_coordinate_wise_rules_are_allowed_with_shards() -> None:
    for rule, params in (("mean", {}), ("median", {}), ("trimmed_mean", {"beta": 0.1})):
        check_shardable(spec("ok", aggregation=rule, aggregation_params=params), 3)


def test_ingest_benchmark_writes_side_by_side_ratios(tmp_path: Any) -> None:
    """benchmarks/ps_shards.py with tiny trials: real PS processes, one row per P, ratios to P = 1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "ps_shards.py"), "--max-shards", "2",
                           "--mb", "0.4", "--seconds", "0.3", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "ps_shards.json").read_text())
    assert [r["shards"] for r in data["rows"]] == [1, 2]
    assert data["rows"][0]["ratio_to_one_shard"] == 1.0
    assert all(r["ingest_mb_per_s"] > 0 for r in data["rows"])
    assert "| 2 |" in (tmp_path / "ps_shards.md").read_text()
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "ps_shards.py"), "--max-shards", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-shards" in bad.stderr
