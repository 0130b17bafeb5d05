"""submit-job sizes a job to the cluster (`--workers`), and `status` shows every reported link."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from dist_llm_train.cli import client_cmds
from dist_llm_train.cli.main import app
from dist_llm_train.config import load_config
from dist_llm_train.controller.models import JobIn, LinkStatusOut

runner = CliRunner()
DEFAULT_JOB = Path(__file__).parents[2] / "deploy" / "jobs" / "default.yaml"


def _config(tmp_path: Path, training: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  name: gpt\ntraining:\n" + training)
    return path


def test_a_config_without_num_workers_takes_the_cluster_size(tmp_path: Path) -> None:
    cfg = client_cmds.use_every_worker(load_config(_config(tmp_path, "  steps: 10\n")), 5)
    assert cfg.training.num_workers == 5 and cfg.training.steps == 10


def test_a_config_that_sets_num_workers_keeps_it(tmp_path: Path) -> None:
    cfg = client_cmds.use_every_worker(load_config(_config(tmp_path, "  num_workers: 2\n")), 5)
    assert cfg.training.num_workers == 2


def test_without_workers_the_config_is_unchanged(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "  steps: 10\n"))
    assert client_cmds.use_every_worker(cfg, None).training.num_workers == cfg.training.num_workers


def test_the_new_worker_count_is_validated_with_the_rest(tmp_path: Path) -> None:
    # One attacker among one worker leaves no honest worker: refused before anything is sent, the config unchanged.
    cfg = load_config(_config(tmp_path, "  attack: {name: sign_flip, attackers: 1}\n"))
    with pytest.raises(typer.BadParameter, match="no honest worker"):
        client_cmds.use_every_worker(cfg, 1)
    assert cfg.training.num_workers == 2


def test_the_default_compose_job_leaves_the_worker_count_to_the_cluster() -> None:
    assert "num_workers" not in load_config(DEFAULT_JOB).training.model_fields_set


def _submitted(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[Any, JobIn | None]:
    sent: list[JobIn] = []

    class FakeSubmitted:
        def model_dump(self, mode: str) -> dict[str, str]:
            return {"job_id": "j1"}

    def fake_ask(url: str, token: str | None, call: Any) -> Any:
        class Client:
            def submit_job(self, job: JobIn) -> FakeSubmitted:
                sent.append(job)
                return FakeSubmitted()

        return call(Client())

    monkeypatch.setattr(client_cmds, "_ask", fake_ask)
    res = runner.invoke(app, ["submit-job", *args])
    return res, (sent[0] if sent else None)


def test_submit_job_with_workers_sends_that_many(monkeypatch: pytest.MonkeyPatch) -> None:
    res, job = _submitted(monkeypatch, ["--config", str(DEFAULT_JOB), "--workers", "4", "--name", "default"])
    assert res.exit_code == 0, res.output
    assert job is not None and job.config["training"]["num_workers"] == 4 and job.num_tasks is None


def test_submit_job_refuses_a_bad_worker_count_and_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    res, job = _submitted(monkeypatch, ["--config", str(DEFAULT_JOB), "--workers", "0"])
    assert res.exit_code == 2 and job is None


def _link(worker: str, **over: Any) -> LinkStatusOut:
    base: dict[str, Any] = dict(
        worker=worker, link=f"{worker}->paramserver", traffic_class="ps_sync", backend="kernel_fallback",
        configured_rtt_ms=80.0, measured_rtt_ms=83.5, rtt_samples=50, rtt_tolerance_ms=55.0, within_tolerance=True,
        configured_rate_mbit=10.0, measured_rate_mbit=9.1, configured_loss=0.0199, measured_loss=0.02,
        loss_kind="measured",
    )
    return LinkStatusOut.model_validate(base | over)


def test_links_table_shows_configured_and_measured_per_link() -> None:
    out = io.StringIO()
    Console(file=out, width=200).print(client_cmds.links_table([
        _link("worker-1"),
        _link("worker-2", measured_rtt_ms=None, measured_rate_mbit=None, measured_loss=None,
              within_tolerance=None, rtt_samples=0),
    ]))
    text = out.getvalue()
    row1 = next(line for line in text.splitlines() if "worker-1->paramserver" in line)
    for cell in ("ps_sync", "kernel_fallback", "80.0", "83.5", "10.0", "9.1", "1.99", "2.00"):
        assert cell in row1, (cell, row1)
    row2 = next(line for line in text.splitlines() if "worker-2->paramserver" in line)
    assert row2.count("-") >= 3  # nothing measured yet: dashes, not zeros
