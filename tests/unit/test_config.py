from pathlib import Path

import pytest

from dist_llm_train.config import ConfigError, config_json_schema, load_config, load_config_text, parse_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    load_config(path)


def test_examples_exist() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"priority", "gale_shapley", "capability", "submit_job"} <= names


def test_unknown_key_names_the_field_path() -> None:
    with pytest.raises(ConfigError, match=r"training\.bach_size"):
        parse_config({"training": {"bach_size": 8}})


def test_wrong_type_names_the_field_path() -> None:
    with pytest.raises(ConfigError, match=r"controller\.port"):
        load_config_text("controller:\n  port: eighty\n")


def test_seed_controller_keys_feed_training() -> None:
    cfg = parse_config({"controller": {"use_async_training": True, "max_staleness": 7, "use_zmq": True}})
    assert cfg.training.strategy.name == "async"
    assert cfg.training.initial_staleness_bound == 7
    assert cfg.paramserver.transport == "zmq"


def test_training_section_wins_over_controller() -> None:
    cfg = parse_config({"controller": {"use_async_training": True}, "training": {"use_async_training": False}})
    assert cfg.training.strategy.name == "sync"


def test_json_and_yaml_equivalent() -> None:
    a = load_config_text('{"training": {"steps": 5}}')
    b = load_config_text("training:\n  steps: 5\n")
    assert a == b


def test_invalid_yaml_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_text("training: [unclosed")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_text("- a\n- b\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_duplicate_worker_names_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        parse_config({"workers": [{"name": "a"}, {"name": "a"}]})


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        parse_config({"model": {"n_embd": 30, "n_head": 4}})


def test_schema_exports() -> None:
    schema = config_json_schema()
    assert "training" in schema["properties"]
