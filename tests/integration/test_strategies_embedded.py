"""One short embedded run per strategy family: real controller, PS and worker processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_llm_train.core.privacy import epsilon

pytestmark = pytest.mark.timeout(400)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
DATA = {"batch_size": 8, "seq_length": 16, "num_samples": 4000, "eval_batches": 8}


def run(tmp_path: Path, training: dict[str, Any], *flags: str, min_drop: float = 0.2) -> dict[str, Any]:
    """Train through the CLI; it must complete and lower the held-out loss by at least `min_drop` nats."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model": TINY, "training": {**DATA, **training}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_llm_train",
            "run",
            "--config",
            str(config),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--json",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job_state"] == "completed"
    assert summary["final_loss"] < summary["initial_loss"] - min_drop, summary
    assert "## Strategy" in (Path(summary["run_dir"]) / "summary.md").read_text()
    return summary


@pytest.mark.parametrize("ps_shards", [1, 2])
def test_diloco_pushes_compressed_pseudo_gradients_and_pulls_compressed_deltas(tmp_path: Path, ps_shards: int) -> None:
    s = run(
        tmp_path,
        {"diloco_local_steps": 10, "downlink": {"name": "topk", "ratio": 0.05}},
        "--workers",
        "2",
        "--steps",
        "40",
        "--strategy",
        "diloco",
        "--codec",
        "topk",
        "--ps-shards",
        str(ps_shards),
    )
    st = s["strategy"]
    assert (st["strategy"], st["codec"], st["error_feedback"]) == ("diloco", "topk", True)
    assert s["steps"] == 4  # 40 inner steps / H = 10 -> 4 outer rounds
    wire = st["wire_bytes"]
    assert wire["bytes_received_gradient"] == 0
    # Top-k 1 %: 8 bytes per kept coordinate, 1/50 of float32. With shards each gets its slice's kept coordinates
    # (`Codec.split`), so the total is the same.
    assert wire["raw_bytes_pseudo_gradient"] >= 50 * wire["bytes_received_pseudo_gradient"] > 0
    # Each worker initialised the model itself from the job's seed, so none pulls it: its first pull names the
    # parameters by digest and gets the deltas since, then one top-k 5 % delta per round — both directions
    # compressed, with one PS or per shard. The one full model on the wire is the launcher's final read (a model
    # is a push's raw size).
    assert st["downlink"] == "topk"
    model_bytes = wire["raw_bytes_pseudo_gradient"] // (2 * 4)  # 2 workers x 4 rounds of pushes
    assert wire["params_bytes_sent"] == model_bytes
    assert 0 < wire["params_delta_bytes_sent"] < 2 * 4 * 0.5 * model_bytes


def test_adaptive_with_int8_and_local_dp(tmp_path: Path) -> None:
    """Real worker processes draw DP noise from OS entropy (as in production) and adaptive runs race on real
    time, so the loss differs run to run: 12 runs (4 idle, 8 beside two CPU-burning processes) lowered it by
    0.199-0.255 nats (mean 0.232, sd 0.018). The former 0.2 bar failed 1 in 12; 0.1 is ~7 sd below the mean
    and still says "trains under this noise" (the held-out batches are fixed, so evaluation adds no noise)."""
    s = run(
        tmp_path,
        {"max_staleness": 2},
        "--workers",
        "2",
        "--steps",
        "60",
        "--strategy",
        "adaptive",
        "--codec",
        "int8",
        "--dp-noise",
        "0.2",
        "--dp-clip",
        "1.0",
        min_drop=0.1,
    )
    st = s["strategy"]
    assert st["strategy"] == "adaptive" and len(st["workers"]) == 2
    for w in st["workers"]:
        assert w["staleness_bound"] >= 2 and 0 < w["acceptance_rate"] <= 1
    wire = st["wire_bytes"]
    assert 3.9 < wire["raw_bytes_gradient"] / wire["bytes_received_gradient"] <= 4.0
    dp = st["dp"]
    assert dp["enabled"] and dp["releases"] >= 30
    assert dp["epsilon"] == pytest.approx(epsilon(0.2, dp["releases"], 1e-5))


@pytest.mark.slow  # the sync path itself is covered by test_embedded_run; this adds the attacker process
def test_sync_median_survives_a_sign_flip_attacker(tmp_path: Path) -> None:
    attack = {"attack": "sign_flip", "attackers": 1, "attack_params": {"scale": 10.0}}
    s = run(tmp_path, attack, "--workers", "3", "--steps", "40", "--aggregation", "median")
    st = s["strategy"]
    assert (
        st["aggregation"] == "median"
        and st["attack"]["name"] == "sign_flip"
        and st["attack"]["attackers"] == 1
    )


def test_streaming_diloco_syncs_one_fragment_at_a_time(tmp_path: Path) -> None:
    strategy = {"name": "streaming_diloco", "local_steps": 8, "fragments": 4, "overlap_steps": 1}
    s = run(tmp_path, {"strategy": strategy}, "--workers", "2", "--steps", "40")
    st = s["strategy"]
    assert st["strategy"] == "streaming_diloco" and st["strategy_params"]["fragments"] == 4
    assert s["steps"] == 20  # 40 inner steps / (H/P = 2) fragment syncs
    wire = st["wire_bytes"]
    model_bytes = wire["params_bytes_sent"]  # the launcher's final read; workers hold their own initial model
    # Every push and every pull carries one fragment: a quarter of the model, not all of it.
    assert abs(wire["raw_bytes_pseudo_gradient"] / (40 * model_bytes / 4) - 1) < 0.05
    assert 0 < wire["params_delta_bytes_sent"] <= 40 * model_bytes / 4 * 1.05
