import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from dist_llm_train.cli.main import app
from dist_llm_train.cli.run import apply_training_overrides
from dist_llm_train.config import load_config

runner = CliRunner()
EXAMPLES = Path(__file__).parents[2] / "examples"


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("run", "serve", "submit-job", "status", "metrics", "validate-config", "config", "demo-ml",
                "demo-basic"):
        assert cmd in result.output


def test_validate_config_ok_and_bad(tmp_path: Path) -> None:
    ok = runner.invoke(app, ["validate-config", str(EXAMPLES / "priority.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "valid" in ok.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: -3\n  colour: blue\n")
    res = runner.invoke(app, ["validate-config", str(bad)])
    assert res.exit_code == 2
    assert "training.steps" in res.output and "training.colour" in res.output


def test_config_schema_is_json() -> None:
    res = runner.invoke(app, ["config", "schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert set(schema["properties"]) >= {"controller", "training", "model", "workers", "tasks", "network"}


def test_run_rejects_bad_options_before_starting_anything(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", "--workers", "0", "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", "--mode", "sideways", "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", "--strategy", "sideways", "--runs-dir", str(tmp_path)])
    assert res.exit_code != 0
    res = runner.invoke(app, ["run", "--strategy", "sync", "--mode", "async", "--runs-dir", str(tmp_path)])
    assert res.exit_code == 2 and "disagree" in res.output
    assert not any(tmp_path.iterdir()), "a refused run must not create a run folder"


def test_status_against_unreachable_controller_is_a_clear_error() -> None:
    res = runner.invoke(app, ["status", "--controller", "http://127.0.0.1:9"])
    assert res.exit_code == 1
    assert "cannot reach controller" in res.output


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Every leaf command of the click tree typer builds, with its full name ("serve worker")."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


COMMANDS = dict(_commands(typer.main.get_group(app)))


def _options(command: str) -> dict[str, bool]:
    """Each option spelling of `command`, mapped to whether --help hides it."""
    return {opt: bool(getattr(p, "hidden", False)) for p in COMMANDS[command].params for opt in p.opts}


def test_every_command_lives_under_the_cli_package() -> None:
    assert {"run", "simulate", "run-experiments", "serve worker", "config schema"} <= set(COMMANDS)
    outside = {name: cmd.callback.__module__ for name, cmd in COMMANDS.items()
               if not cmd.callback.__module__.startswith("dist_llm_train.cli.")}
    assert not outside, f"commands defined outside dist_llm_train.cli: {outside}"


@pytest.mark.parametrize("command", ["run", "simulate"])
def test_one_name_for_one_idea(command: str) -> None:
    options = _options(command)
    for canonical in ("--strategy", "--steps", "--workers", "--profile", "-p", "--config", "-c", "--codec",
                      "--json", "--runs-dir"):
        assert options.get(canonical) is False, f"{command} lacks a visible {canonical}"
    assert options["--mode"] is True, f"{command}: --mode must stay a hidden alias of --strategy"


@pytest.mark.parametrize("command", ["--help", "run --help", "simulate --help", "run-experiments --help",
                                     "demo-ml --help", "demo-basic --help"])
def test_help_works_and_hides_deprecated_spellings(command: str) -> None:
    res = runner.invoke(app, command.split())
    assert res.exit_code == 0, res.output
    assert not re.search(r"--(mode|rounds)\b", res.output)


def _simulate(*flags: str) -> tuple[int, str, str]:
    res = runner.invoke(app, ["simulate", "--workers", "2", "--params", "100", "--no-report", "--json", *flags])
    return res.exit_code, res.stdout, res.stderr


def test_simulate_deprecated_spellings_warn_once_each_and_mean_the_same() -> None:
    code, out, err = _simulate("--strategy", "async", "--steps", "3")
    assert code == 0, err
    assert "deprecated" not in err
    canonical = json.loads(out.splitlines()[-1])
    code, out, err = _simulate("--mode", "async", "--rounds", "3")
    assert code == 0, err
    old = json.loads(out.splitlines()[-1])
    assert (old["mode"], old["steps"]) == (canonical["mode"], canonical["steps"]) == ("async", 3)
    warnings = [line for line in err.splitlines() if "deprecated" in line]
    assert len(warnings) == 2, err
    assert any("--mode" in w and "--strategy" in w for w in warnings)
    assert any("--rounds" in w and "--steps" in w for w in warnings)
    code, _, err = _simulate("--strategy", "sync", "--mode", "async")
    assert code == 2 and "disagree" in err


def test_a_strategy_flag_replaces_the_files_strategy() -> None:
    cfg = load_config(EXAMPLES / "priority.yaml")  # it says `training.mode: sync`
    assert cfg.training.strategy.name == "sync"
    out = apply_training_overrides(cfg, {"strategy": "async", "num_workers": 2})
    assert out.training.strategy.name == "async" and out.training.num_workers == 2
