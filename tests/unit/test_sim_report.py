"""Config validation, the report folder, and the `simulate` command function."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from dist_llm_train.cli.simulate import simulate as simulate_command
from dist_llm_train.embedded.report import RunSummary
from dist_llm_train.sim.config import SimConfigError, build_sim_config, estimate_params
from dist_llm_train.sim.report import write_report
from dist_llm_train.sim.runner import simulate


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"compute": {"kind": "weird"}}, "compute.kind"),
        ({"compute": {"mean_s": -1}}, "compute.mean_s"),
        ({"failures": {"kills": [{"worker": 9, "at_s": 1}]}, "workers": 3}, "failures.kills"),
        ({"churn": {"join_rate_per_s": 1.0}}, "churn"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_config_is_refused_naming_the_field(data, field):
    with pytest.raises(SimConfigError, match=field.replace(".", r"\.")):
        build_sim_config(data)


def test_bad_profile_and_engine_are_refused_before_anything_runs():
    with pytest.raises(SimConfigError, match="unknown profile 'nowhere'"):
        simulate(build_sim_config({"profile": "nowhere"}))
    with pytest.raises(SimConfigError, match="vectorised runs round-based strategies only"):
        simulate(build_sim_config({"mode": "async", "engine": "vectorised"}))
    with pytest.raises(SimConfigError, match="payload: .*unknown codec 'zip'"):
        build_sim_config({"payload": {"codec": "zip"}})


@pytest.mark.parametrize(
    "model",
    [
        {"name": "gpt", "n_layer": 2, "n_embd": 32, "n_head": 2},
        {"name": "gpt", "n_layer": 1, "n_embd": 16, "n_head": 2, "ngram_order": 2},
        {"name": "lstm", "n_layer": 2, "n_embd": 24},
    ],
)
def test_parameter_estimate_is_the_real_models_count(model):
    torch = pytest.importorskip("torch")
    from dist_llm_train.config import ModelConfig
    from dist_llm_train.training.models import build_model

    mc = ModelConfig(**model)
    real = sum(p.numel() for p in build_model(mc, vocab_size=16, block_size=32, seed=0).parameters())
    assert isinstance(torch.__version__, str)
    assert estimate_params(mc, 16, 32) == real


def test_report_folder_has_the_real_runs_summary_keys(tmp_path):
    r = simulate(
        build_sim_config({"workers": 3, "rounds": 7, "profile": "cellular", "payload": {"params": 5000}})
    )
    run_dir, data = write_report(r, tmp_path)
    assert {f.name for f in dataclasses.fields(RunSummary)} <= set(data)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == data and on_disk["steps"] == 7 and on_disk["transport"] == "sim"
    assert on_disk["simulation"]["round_time_s"]["p95"] >= on_disk["simulation"]["round_time_s"]["p50"] > 0
    with (run_dir / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and float(rows[-1]["publish_time_s"]) == pytest.approx(
        on_disk["wall_seconds"], rel=1e-6
    )
    assert "round time mean / p50 / p95" in (run_dir / "summary.md").read_text()
    assert (run_dir / "config.yaml").is_file()


def test_command_prints_json_and_refuses_bad_flags(tmp_path):
    app = typer.Typer()
    app.command()(simulate_command)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "--workers",
            "4",
            "--steps",
            "5",
            "--profile",
            "satellite",
            "--strategy",
            "async",
            "--params",
            "3000",
            "--json",
            "--runs-dir",
            str(tmp_path),
        ],
    )
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout.strip().splitlines()[-1])
    assert data["workers"] == 4 and data["steps"] == 5 and data["mode"] == "async"
    assert (tmp_path / data["run_id"] / "summary.json").is_file()
    bad = runner.invoke(app, ["--strategy", "bogus", "--runs-dir", str(tmp_path / "none")])
    assert bad.exit_code == 2 and "mode" in bad.output
    assert not (tmp_path / "none").exists()


def test_experiment_cell_leaves_a_run_folder_like_an_embedded_run(tmp_path):
    from dist_llm_train.config import parse_config
    from dist_llm_train.embedded.report import CSV_COLUMNS
    from dist_llm_train.sim.experiment import run_cell

    cfg = parse_config({"training": {"steps": 12, "mode": "sync"}})
    run_dir = run_cell(cfg, workers=3, profile="cellular", runs_dir=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["workers"] == 3 and summary["steps"] == 12 and summary["simulation"]["profile"] == "cellular"
    )
    with (run_dir / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == summary["simulation"]["push_outcomes"]["APPLIED"] + summary["simulation"][
        "push_outcomes"
    ].get("BUFFERED", 0)
    times = [float(r["wall_time"]) for r in rows]
    # A 3-worker cell trains (real numerics): every row carries its update's training loss.
    assert times == sorted(times) and all(float(r["loss"]) > 0 for r in rows)
    assert summary["simulation"]["numerics"] == "real" and summary["final_loss"] < summary["initial_loss"]
    last = {r["worker"]: r for r in rows}
    assert sum(int(r["bytes_sent"]) for r in last.values()) == summary["bytes_sent"]
    unshaped = run_cell(cfg, workers=3, profile=None, runs_dir=tmp_path, train=False)
    free = json.loads((unshaped / "summary.json").read_text())
    assert free["simulation"]["profile"] is None and free["simulation"]["numerics"] == "free"
    with (unshaped / "metrics.csv").open() as f:
        assert all(r["loss"] == "" for r in csv.DictReader(f))


def test_the_simulator_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys, dist_llm_train.cli.simulate, dist_llm_train.sim.experiment\n"
        "from dist_llm_train.sim.config import build_sim_config\n"
        "from dist_llm_train.sim.runner import simulate\n"
        "simulate(build_sim_config({'workers': 2, 'rounds': 2, 'payload': {'params': 100}}))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
