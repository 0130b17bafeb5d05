"""Profile schema, files, one-way split, overrides, schedules and trace parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_llm_train.netem.profile.loading import ENV_DIR, available_profiles, load_profile
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link, one_way_pct, to_one_way
from dist_llm_train.netem.profile.schema import GilbertElliottLoss, ProfileError
from dist_llm_train.netem.profile.trace import parse_mahimahi, trace_to_segments

EXPECTED = {"good", "cellular", "degraded", "brownout", "straggler", "satellite", "lan", "intercontinental"}
SEED = {  # round-trip seed figures: delay, jitter, loss %, rate
    "good": (20, 5, 0.1, 100), "cellular": (80, 40, 2, 10), "satellite": (400, 100, 1, 5),
    "degraded": (200, 80, 10, 2), "brownout": (80, 40, 5, 5),
}


def test_all_eight_profiles_load_with_seed_figures() -> None:
    assert set(available_profiles()) >= EXPECTED
    for name in EXPECTED:
        p = load_profile(name)
        assert p.name == name and p.figures == "round_trip"
        if name in SEED:
            d, j, loss, rate = SEED[name]
            assert (p.link.delay_ms, p.link.jitter_ms, p.link.loss_pct, p.link.rate_mbit) == (d, j, loss, rate)
    assert load_profile("degraded").link.duplicate_pct == 3


def test_round_trip_split_into_one_way() -> None:
    link = egress_links(load_profile("cellular"))[None]
    assert (link.delay_ms, link.jitter_ms, link.rate_mbit) == (40, 20, 10)
    p1 = link.loss_pct / 100
    assert 1 - (1 - p1) ** 2 == pytest.approx(0.02, abs=1e-6)
    assert one_way_pct(0) == 0 and one_way_pct(100) == 100
    once = to_one_way(load_profile("good"))
    assert to_one_way(once) == once  # idempotent


def test_class_override_only_changes_its_class() -> None:
    links = egress_links(load_profile("cellular"))
    assert links["heartbeat"].delay_ms == 20 and links["heartbeat"].rate_mbit == 10
    assert links["ps_sync"] == links[None] == links["task"]


def test_straggler_defaults_to_last_worker() -> None:
    p = load_profile("straggler")
    workers = ["w0", "w1", "w2"]
    slow, normal = egress_links(p, "w2", workers)[None], egress_links(p, "w0", workers)[None]
    assert slow.rate_mbit == 5 and slow.delay_ms == 50 and slow.loss_pct == normal.loss_pct
    assert normal.rate_mbit == 100 and ingress_link(p, "w0", workers) is None
    extra = ingress_link(p, "w2", workers)
    assert extra is not None and extra.rate_mbit == 5 and extra.delay_ms == 0
    assert p.node_override("w2", workers).compute_slowdown == 4  # type: ignore[union-attr]


def test_brownout_schedule_cycles() -> None:
    s = load_profile("brownout").schedule
    assert s is not None and s.kind == "cycle"
    assert [seg.duration_s for seg in s.segments] == [5, 2]
    assert egress_links(load_profile("brownout"), segment=s.segments[1].link)[None].rate_mbit == 0.5


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "link": {"delay_ms": -1}}, "link.delay_ms"),
        ({"name": "x", "link": {"loss": {"model": "random", "pct": 120}}}, "link.loss.pct"),
        ({"name": "x", "link": {"bogus": 1}}, "link.bogus"),
        ({"name": "x", "classes": {"gossip": {}}}, "classes.gossip"),
        ({"name": "x", "nodes": {"w": {"link": {"rate_mbit": 0}}}}, "nodes.w.link.rate_mbit"),
        ({"name": "x", "schedule": {"kind": "cycle", "segments": []}}, "schedule"),
        ({"name": "bad name!"}, "name"),
        ({"name": "x", "link": {"reorder_pct": 5}}, "link"),
    ],
)
def test_bad_profiles_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        load_profile(data)


def test_inline_json_and_yaml_and_unknown_name() -> None:
    p = load_profile(json.dumps({"name": "inl", "link": {"delay_ms": 10, "loss": {"model": "gilbert_elliott",
                                                                                 "p_pct": 1, "r_pct": 9}}}))
    assert isinstance(p.link.loss, GilbertElliottLoss) and p.link.loss_pct == pytest.approx(10)
    assert load_profile("name: y\nlink: {delay_ms: 3}").link.delay_ms == 3
    with pytest.raises(ProfileError, match="unknown profile 'nope'.*cellular"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="cannot parse"):
        load_profile("{not json")


def test_profile_dir_from_env_and_name_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.yaml").write_text("name: mine\nlink: {delay_ms: 7}\n")
    (tmp_path / "liar.yaml").write_text("name: other\n")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert load_profile("mine").link.delay_ms == 7
    with pytest.raises(ProfileError, match="does not match"):
        load_profile("liar")


def test_mahimahi_trace(tmp_path: Path) -> None:
    times = parse_mahimahi("# comment\n0\n0\n500\n999\n1500\n2000\n")
    segs = trace_to_segments(times, window_ms=1000)
    assert [s.duration_s for s in segs] == [1.0, 1.0]
    assert segs[0].link.rate_mbit == pytest.approx(4 * 1500 * 8 / 1e6)
    assert segs[1].link.rate_mbit == pytest.approx(2 * 1500 * 8 / 1e6)
    with pytest.raises(ProfileError, match=":3: time 5 goes backwards"):
        parse_mahimahi("10\n20\n5\n")
    with pytest.raises(ProfileError, match=":1: expected an integer"):
        parse_mahimahi("abc\n")
    (tmp_path / "t.trace").write_text("\n".join(str(i * 10) for i in range(300)))
    (tmp_path / "tr.yaml").write_text("name: tr\nschedule: {kind: trace, trace: {file: t.trace}}\n")
    p = load_profile(str(tmp_path / "tr.yaml"))
    assert p.schedule is not None and p.schedule.kind == "cycle" and len(p.schedule.segments) == 3
    assert p.schedule.segments[0].link.rate_mbit == pytest.approx(1.2)
