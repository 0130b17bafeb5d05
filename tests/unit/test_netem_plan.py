"""Golden tests of `plan` per profile and backend: the exact commands are part of the interface.

Regenerate after an intended change with `DLT_UPDATE_GOLDEN=1 pytest tests/unit/test_netem_plan.py`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from dist_llm_train.netem.backends import ShapingError, get_shaping_backend
from dist_llm_train.netem.kernel.tc_tree import fmt_num, fmt_rate, fmt_time, netem_args
from dist_llm_train.netem.profile.loading import available_profiles, load_profile

GOLDEN = Path(__file__).parent / "golden"
PROFILES = sorted(n for n in available_profiles() if n in {
    "good", "cellular", "degraded", "brownout", "straggler", "satellite", "lan", "intercontinental"})
WORKERS = ["worker-0", "worker-1", "worker-2"]


@pytest.mark.parametrize("backend", ["tc_netem", "kernel_fallback"])
@pytest.mark.parametrize("name", PROFILES)
def test_plan_matches_golden(backend: str, name: str) -> None:
    assert len(PROFILES) == 8
    cmds = get_shaping_backend(backend).plan(load_profile(name), "worker-2", "eth0", WORKERS)
    text = "\n".join(shlex.join(c) for c in cmds) + "\n"
    path = GOLDEN / f"netem_plan_{backend}_{name}.txt"
    if os.environ.get("DLT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_tc_netem_plan_shape() -> None:
    cmds = get_shaping_backend("tc_netem").plan(load_profile("cellular"), None, "eth0")
    joined = [shlex.join(c) for c in cmds]
    assert joined[0] == "tc qdisc add dev eth0 root handle 1: htb default 10"
    netem = [c for c in joined if " netem " in c]
    assert len(netem) == 5  # default + four classes
    assert "delay 20000us 5000us distribution normal loss random 0.250313%" in netem[1]  # heartbeat
    assert "delay 40000us 20000us distribution normal loss random 1.005051%" in netem[4]  # ps_sync
    filters = [c for c in joined if "dsfield" in c]
    assert filters[0].endswith("match ip dsfield 0xc0 0xfc flowid 1:11")
    assert not any("ifb" in c for c in joined)  # symmetric: no IFB


def test_straggler_gets_ifb_only_on_the_straggler() -> None:
    b, p = get_shaping_backend("tc_netem"), load_profile("straggler")
    slow = [shlex.join(c) for c in b.plan(p, "worker-2", "eth0", WORKERS)]
    assert "ip link add name ifb-eth0 type ifb" in slow
    assert any("tc qdisc add dev ifb-eth0 root handle 1: htb" in c for c in slow)
    assert not any("ifb" in shlex.join(c) for c in b.plan(p, "worker-0", "eth0", WORKERS))


def test_formatting_never_uses_exponents() -> None:
    assert fmt_num(0.00001) == "0.00001" and fmt_num(2.0) == "2" and fmt_num(0) == "0"
    assert fmt_time(0.25) == "250us" and fmt_rate(0.5) == "500kbit" and fmt_rate(None) == "10000000kbit"
    ge = load_profile({"name": "g", "figures": "one_way", "link": {
        "loss": {"model": "gilbert_elliott", "p_pct": 1, "r_pct": 20, "bad_loss_pct": 50}, "duplicate_pct": 1,
        "delay_ms": 5, "reorder_pct": 2, "corrupt_pct": 0.1}})
    assert netem_args(ge.link) == ["limit", "1000", "delay", "5000us", "loss", "gemodel", "1%", "20%", "50%", "0%",
                                   "duplicate", "1%", "reorder", "2%", "corrupt", "0.1%"]


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ShapingError, match="unknown backend 'nope'"):
        get_shaping_backend("nope")
