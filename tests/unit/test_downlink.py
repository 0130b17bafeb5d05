"""Downlink compression (core.downlink): deltas with server-side error feedback, bit-consistent workers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_llm_train.config import parse_config
from dist_llm_train.core.codecs import CodecConfig, get_codec
from dist_llm_train.core.downlink import DownlinkPublisher, apply_deltas, params_digest
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import PushHeader, TensorSpec
from dist_llm_train.paramserver.job import JobState, ParameterStore


def _walk(rng: np.random.Generator, d: int, steps: int) -> list[np.ndarray]:
    """A parameter trajectory like an optimizer's: small correlated moves."""
    theta = rng.standard_normal(d).astype(np.float32)
    out = [theta]
    drift = rng.standard_normal(d).astype(np.float32) * 0.01
    for _ in range(steps):
        theta = (theta + drift + rng.standard_normal(d).astype(np.float32) * 0.01).astype(np.float32)
        out.append(theta)
    return out


@pytest.mark.parametrize("codec", [get_codec("topk", ratio=0.05), get_codec("int8"), get_codec("fp16")])
def test_a_worker_applying_every_delta_holds_the_published_params_bit_for_bit(codec: object) -> None:
    rng = np.random.default_rng(0)
    path = _walk(rng, 997, 40)
    pub = DownlinkPublisher(codec, path[0], version=0)  # type: ignore[arg-type]
    worker = path[0].copy()
    for v, theta in enumerate(path[1:], start=1):
        pub.publish(theta, v)
        reply = pub.since(pub.epoch, v - 1)
        assert reply is not None and len(reply.deltas) == 1
        worker = apply_deltas(worker, reply.deltas)
        assert worker.tobytes() == pub.published.tobytes()


def test_error_feedback_keeps_the_published_params_close_to_the_masters() -> None:
    """Top-k 1 % drops 99 % of every delta, yet θ − θ̂ stays bounded: what was dropped is sent later."""
    rng = np.random.default_rng(1)
    path = _walk(rng, 2000, 300)
    pub = DownlinkPublisher(get_codec("topk", ratio=0.01), path[0], version=0)
    gaps = []
    for v, theta in enumerate(path[1:], start=1):
        pub.publish(theta, v)
        gaps.append(float(np.linalg.norm(theta - pub.published)))
    travelled = float(np.linalg.norm(path[-1] - path[0]))
    # Without feedback the gap would be the whole distance travelled; with it, it plateaus well below.
    assert max(gaps[-50:]) < 0.5 * travelled
    assert max(gaps[-50:]) < 1.5 * max(gaps[100:150])  # bounded, not growing


def test_several_versions_behind_gets_every_delta_in_order() -> None:
    rng = np.random.default_rng(2)
    path = _walk(rng, 300, 10)
    pub = DownlinkPublisher(get_codec("int8"), path[0], version=0, history=4)
    held = {0: path[0].copy()}
    for v, theta in enumerate(path[1:], start=1):
        pub.publish(theta, v)
        held[v] = pub.published.copy()
    reply = pub.since(pub.epoch, 7)
    assert reply is not None and [d.version for d in reply.deltas] == [8, 9, 10]
    assert apply_deltas(held[7], reply.deltas).tobytes() == pub.published.tobytes()
    assert pub.since(pub.epoch, 6) is not None and pub.since(pub.epoch, 5) is None  # only 4 deltas kept
    current = pub.since(pub.epoch, 10)
    assert current is not None and current.deltas == ()
    assert pub.since(pub.epoch + 1, 10) is None  # another lineage: full pull
    assert pub.since(pub.epoch, 11) is None  # ahead of the publisher: full pull


def test_versions_are_published_in_order() -> None:
    pub = DownlinkPublisher(get_codec("fp16"), np.zeros(4, np.float32), version=3)
    with pytest.raises(ValueError, match="in order"):
        pub.publish(np.ones(4, np.float32), 5)
    with pytest.raises(ValueError, match="history"):
        DownlinkPublisher(get_codec("fp16"), np.zeros(4, np.float32), version=0, history=0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["topk", "int8", "fp16"]), st.integers(0, 2**31 - 1))
def test_bit_consistency_for_any_size(d: int, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path = _walk(rng, d, 5)
    pub = DownlinkPublisher(get_codec(name, ratio=0.1), path[0], version=0)
    for v, theta in enumerate(path[1:], start=1):
        pub.publish(theta, v)
    reply = pub.since(pub.epoch, 0)
    assert reply is not None
    assert apply_deltas(path[0], reply.deltas).tobytes() == pub.published.tobytes()


# -- the job spec and the PS job -----------------------------------------------------------------------
def _spec(downlink: CodecConfig | None, **kw: object) -> JobSpec:
    base = JobSpec.from_wire(WireJobSpec(job_id="dl", optimizer="sgd", learning_rate=0.5, momentum=0.0, **kw))
    return JobSpec(**{**base.__dict__, "downlink": downlink})


def test_the_downlink_codec_travels_in_the_job_spec() -> None:
    spec = _spec(CodecConfig(name="topk", ratio=0.02))
    back = JobSpec.from_wire(spec.to_wire())
    assert back.downlink == CodecConfig(name="topk", ratio=0.02)
    assert JobSpec.from_wire(_spec(None).to_wire()).downlink is None
    assert "downlink" not in _spec(CodecConfig(name="none")).to_wire().options
    with pytest.raises(ValueError, match="downlink"):
        JobSpec.from_wire(WireJobSpec(job_id="x", options={"downlink": '{"name": "gzip"}'}))


def test_training_config_sends_its_downlink_codec_to_the_ps() -> None:
    cfg = parse_config({"training": {"downlink": {"name": "topk", "ratio": 0.01}}})
    assert cfg.training.job_spec("j").downlink == CodecConfig(name="topk", ratio=0.01)
    assert parse_config({}).training.job_spec("j").downlink is None
    with pytest.raises(ValueError):
        parse_config({"training": {"downlink": {"name": "zip"}}})


def _push(store: ParameterStore, worker: str, step: int, base: int, vec: np.ndarray) -> None:
    payload = vec.astype("<f4").tobytes()
    header = PushHeader(job_id="dl", worker_id=worker, step=step, base_version=base, payload_bytes=len(payload))
    store.push(header, payload)


def test_ps_pulls_send_deltas_to_holders_and_full_params_to_everyone_else() -> None:
    d = 500
    store = ParameterStore()
    spec = _spec(CodecConfig(name="topk", ratio=0.02))
    store.init_job(spec, [TensorSpec("w", (d,), 0)], np.zeros(d, np.float32), ["a"])
    first = store.pull("dl", "a")
    assert first.delta is None and first.epoch != 0  # holds nothing yet: full
    held = np.array(first.params)
    rng = np.random.default_rng(3)
    for step in range(5):
        _push(store, "a", step, step, rng.standard_normal(d).astype(np.float32))
        reply = store.pull("dl", "a", have_epoch=first.epoch, have_version=step)
        assert reply.delta is not None and len(reply.delta.deltas) == 1
        held = apply_deltas(held, reply.delta.deltas)
        assert held.tobytes() == reply.params.tobytes()  # `params` is θ̂, what the worker now holds
    job = store.job_state("dl")
    assert not np.array_equal(job.params, job.published)  # the PS keeps its masters apart
    counters = store.stats("dl")[0].counters
    assert counters["pulls_delta"] == 5 and counters["params_bytes_sent"] == 4 * d  # one full pull only
    assert 0 < counters["params_delta_bytes_sent"] < 5 * 4 * d * 0.1


def test_a_restored_job_starts_a_new_lineage_so_old_holders_pull_in_full() -> None:
    d = 64
    store = ParameterStore()
    store.init_job(_spec(CodecConfig(name="int8")), [TensorSpec("w", (d,), 0)], np.zeros(d, np.float32), ["a"])
    old = store.pull("dl", "a")
    _push(store, "a", 0, 0, np.ones(d, np.float32))
    snap = store.job_state("dl").snapshot()
    restored = JobState.restore(snap, clock=lambda: 0.0, observer=store.job_state("dl")._obs)
    assert restored.downlink is not None and restored.downlink.epoch != old.epoch
    again = restored.read(old.epoch, 1)
    assert again.delta is None and again.params.tobytes() == restored.params.tobytes()


def test_bad_have_fields_are_refused() -> None:
    store = ParameterStore()
    store.init_job(_spec(None), [TensorSpec("w", (4,), 0)], np.zeros(4, np.float32), [])
    with pytest.raises(Exception, match="have_epoch"):
        store.pull("dl", "a", have_epoch=-1)
    with pytest.raises(Exception, match="have_version"):
        store.pull("dl", "a", have_epoch=5, have_version=-3)
    plain = store.pull("dl", "a", have_epoch=5, have_version=0)  # no downlink codec: always full
    assert plain.delta is None and plain.epoch == 0


def test_a_holder_of_the_initial_params_named_by_digest_gets_only_the_deltas_since() -> None:
    d = 300
    store = ParameterStore()
    initial = np.linspace(-1, 1, d, dtype=np.float32)
    store.init_job(_spec(CodecConfig(name="int8")), [TensorSpec("w", (d,), 0)], initial, ["a"])
    own = params_digest(initial)
    first = store.pull("dl", "a", have_digest=own)
    assert first.delta is not None and first.delta.deltas == () and first.delta.base_version == 0
    rng = np.random.default_rng(5)
    for step in range(3):
        _push(store, "a", step, step, rng.standard_normal(d).astype(np.float32))
    later = store.pull("dl", "a", have_digest=own)
    assert later.delta is not None and [x.version for x in later.delta.deltas] == [1, 2, 3]
    assert apply_deltas(initial, later.delta.deltas).tobytes() == later.params.tobytes()
    other = store.pull("dl", "a", have_digest=params_digest(initial + np.float32(1e-3)))
    assert other.delta is None  # different parameters: in full
    counters = store.stats("dl")[0].counters
    assert counters["pulls_delta"] == 2 and counters["params_bytes_sent"] == 4 * d
    with pytest.raises(Exception, match="have_digest"):
        store.pull("dl", "a", have_digest=b"short")


def test_a_restored_publisher_does_not_answer_the_initial_digest_with_deltas() -> None:
    d = 64
    store = ParameterStore()
    initial = np.zeros(d, np.float32)
    store.init_job(_spec(CodecConfig(name="int8")), [TensorSpec("w", (d,), 0)], initial, ["a"])
    _push(store, "a", 0, 0, np.ones(d, np.float32))
    snap = store.job_state("dl").snapshot()
    restored = JobState.restore(snap, clock=lambda: 0.0, observer=store.job_state("dl")._obs)
    again = restored.read(have_digest=params_digest(initial))
    assert again.delta is None  # its deltas start at the restored version, not at the initial params


def test_a_job_without_deltas_ignores_the_digest() -> None:
    store = ParameterStore()
    initial = np.zeros(4, np.float32)
    store.init_job(_spec(None), [TensorSpec("w", (4,), 0)], initial, [])
    assert store.pull("dl", "a", have_digest=params_digest(initial)).delta is None
