"""Simulating a finished run folder (`sim.validation`, `dist-llm-train simulate --from-run`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dist_llm_train.cli.main import app
from dist_llm_train.config import Config
from dist_llm_train.embedded.report import CSV_COLUMNS
from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.sim.validation import RunFolderError, read_run, sim_config_for_run, validate_run

ROUND_S = 0.5


def make_run(tmp_path: Path, profile: str | None = "good", versions: int = 12, workers: int = 2) -> Path:
    """A run folder as `dist-llm-train run` leaves it: sync rounds of exactly ROUND_S, known compute times."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.training.num_workers = workers
    cfg.training.steps = versions
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for v in range(1, versions + 1):
            for i in range(workers):
                w.writerow({
                    "wall_time": 1000.0 + v * ROUND_S + 0.01 * i, "worker": f"worker-{i}", "step": v,
                    "ps_version": v, "loss": 2.0, "step_time_s": ROUND_S,
                    "compute_time_s": 0.5 if v == 1 else 0.02 + 0.01 * i,  # first step: warm-up
                    "bytes_sent": v * 1000, "bytes_received": v * 1000, "push_outcome": "APPLIED",
                })
    if profile is not None:
        (run / "shaper").mkdir()
        (run / "shaper" / "profile.json").write_text(load_profile(profile).model_dump_json())
    return run


def test_a_shaped_run_is_simulated_with_its_profile_shaping_and_compute(tmp_path):
    run = read_run(make_run(tmp_path))
    assert run.workers == 2 and run.shaper == "userspace" and run.profile_name == "good"
    assert run.round_s == pytest.approx(ROUND_S) and run.versions == 11
    assert sorted(set(run.compute_samples_s)) == pytest.approx([0.02, 0.03])  # warm-up step left out
    cfg = sim_config_for_run(run, rounds=50)
    assert cfg.transport.shaper == "userspace" and cfg.transport.shared_ps_egress is False
    assert cfg.compute.kind == "empirical" and cfg.compute.mean_s == pytest.approx(0.025)
    assert cfg.workers == 2 and cfg.rounds == 50 and cfg.mode == "sync"
    assert cfg.param_count == 103_168  # the default GPT: 412,672 bytes per pull in a real run

    v = validate_run(run.run_dir, rounds=200)
    assert v.profile == "good" and v.measured_round_s == pytest.approx(ROUND_S) and v.simulated_rounds == 198
    # good: 20 ms RTT, 100 Mbit/s, ~0.4 MB each way -> about 0.11 s, far from the synthetic 0.5 s.
    assert 0.08 < v.simulated_round_s < 0.2 and v.relative_error < -0.5
    assert v.as_dict()["relative_error"] == v.relative_error


def test_an_unshaped_run_is_simulated_on_perfect_links(tmp_path):
    run = read_run(make_run(tmp_path, profile=None))
    assert run.shaper == "none" and run.profile is None
    cfg = sim_config_for_run(run, rounds=20)
    assert cfg.profile == "none" and cfg.transport.shaper == "kernel"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_metrics", "metrics file not found"),
        ("one_version", "fewer than two PS versions"),
        ("bad_profile", "not a profile"),
        ("no_folder", "run folder not found"),
    ],
)
def test_a_broken_run_folder_is_refused_with_the_reason(tmp_path, breakage, message):
    run = make_run(tmp_path, versions=1 if breakage == "one_version" else 12)
    if breakage == "no_metrics":
        (run / "metrics.csv").unlink()
    if breakage == "bad_profile":
        (run / "shaper" / "profile.json").write_text("[1, 2")
    if breakage == "no_folder":
        run = tmp_path / "missing"
    with pytest.raises(RunFolderError, match=message):
        validate_run(run)


def test_cli_simulates_a_run_folder_and_reports_the_measured_round(tmp_path):
    run = make_run(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["simulate", "--from-run", str(run), "--steps", "100", "--json",
                              "--runs-dir", str(tmp_path / "sims")])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout.strip().splitlines()[-1])
    m = data["measured_run"]
    assert m["measured_round_s"] == pytest.approx(ROUND_S) and m["profile"] == "good"
    assert data["simulation"]["shaper"] == "userspace" and data["simulation"]["ps_egress"] == "per-worker"
    assert data["steps"] == 100 and data["workers"] == 2
    written = json.loads(next((tmp_path / "sims").glob("*/summary.json")).read_text())
    assert written["measured_run"] == m
    assert "measured round time (11 versions)" in next((tmp_path / "sims").glob("*/summary.md")).read_text()

    both = runner.invoke(app, ["simulate", "--from-run", str(run), "-c", str(run / "config.yaml")])
    assert both.exit_code == 2 and "give one of them" in " ".join(both.output.split())
    missing = runner.invoke(app, ["simulate", "--from-run", str(tmp_path / "nope"), "--no-report"])
    assert missing.exit_code == 2 and "run folder not found" in " ".join(missing.output.split())
