import json
from pathlib import Path

from typer.testing import CliRunner

from dist_llm_train.cli.main import app

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
    assert not any(tmp_path.iterdir()), "a refused run must not create a run folder"


def test_status_against_unreachable_controller_is_a_clear_error() -> None:
    res = runner.invoke(app, ["status", "--controller", "http://127.0.0.1:9"])
    assert res.exit_code == 1
    assert "cannot reach controller" in res.output
