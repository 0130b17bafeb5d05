"""Grid files: expansion, stable cell ids, validation errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dist_llm_train.config import ConfigError
from dist_llm_train.experiments.grid import GridError, load_grid, parse_grid

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def _grid(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "t", "steps": 20,
                            "axes": {"strategy": ["sync", "async"], "workers": [2, 3]}}
    data.update(over)
    return data


def test_cartesian_expansion_and_labels() -> None:
    rg = parse_grid(_grid(axes={"strategy": ["sync", "async"], "codec": ["none", "fp16", "int8"],
                                "workers": [2, 3], "seed": [0, 1]}))
    cells = rg.expand()
    assert len(cells) == 2 * 3 * 2 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert {c.labels["codec"] for c in cells} == {"none", "fp16", "int8"}
    assert rg.varying_axes(cells) == ["strategy", "codec", "workers", "seed"]
    fp16 = next(c for c in cells if c.labels["codec"] == "fp16" and c.workers == 3 and c.seed == 1)
    cfg = rg.config_for(fp16)
    assert cfg.training.codec.name == "fp16"
    assert cfg.training.num_workers == 3 and cfg.training.seed == 1 and cfg.training.steps == 20


def test_omitted_axes_take_the_base_config_values() -> None:
    rg = parse_grid({"name": "t", "base": {"training": {"mode": "async", "compression": "int8", "steps": 7}}})
    (cell,) = rg.expand()
    assert cell.labels["strategy"] == "async" and cell.labels["codec"] == "int8"
    assert cell.labels["attack"] == "none" and cell.labels["profile"] == "none"
    assert cell.steps == 7 and cell.overrides == {}


def test_cell_ids_are_stable_and_depend_only_on_resolved_values() -> None:
    a = [c.cell_id for c in parse_grid(_grid()).expand()]
    assert a == [c.cell_id for c in parse_grid(_grid()).expand()]
    # Reordering an axis reorders cells but keeps each cell's id.
    b = parse_grid(_grid(axes={"strategy": ["async", "sync"], "workers": [2, 3]})).expand()
    assert sorted(a) == sorted(c.cell_id for c in b)
    # A different step count or base config is a different experiment.
    assert not set(a) & {c.cell_id for c in parse_grid(_grid(steps=21)).expand()}
    other_base = parse_grid(_grid(base={"training": {"learning_rate": 0.01}})).expand()
    assert not set(a) & {c.cell_id for c in other_base}
    # Renaming a value's label does not change what runs, so the id stays.
    named = parse_grid(_grid(axes={"strategy": [{"name": "barrier", "set": {"training.strategy.name": "sync"}}],
                                   "workers": [2]})).expand()
    plain = parse_grid(_grid(axes={"strategy": ["sync"], "workers": [2]})).expand()
    assert named[0].cell_id == plain[0].cell_id


def test_axis_value_mappings_set_several_keys() -> None:
    rg = parse_grid(_grid(axes={"codec": [{"name": "topk1", "set": {"training.codec.name": "topk",
                                                                    "training.codec.ratio": 0.01}}]}))
    (cell,) = rg.expand()
    cfg = rg.config_for(cell)
    assert (cfg.training.codec.name, cfg.training.codec.ratio) == ("topk", 0.01)


def test_refused_values_surface_when_the_cell_config_is_built() -> None:
    rg = parse_grid(_grid(axes={"strategy": ["warp-drive"],
                                "extra": {"x": [{"name": "y", "set": {"training.no_such_key": 1}}]}}))
    (cell,) = rg.expand()
    with pytest.raises(ConfigError) as err:
        rg.config_for(cell)
    assert "training.strategy" in str(err.value) and "training.no_such_key" in str(err.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_grid(axes={"workers": [0]}), "axes.workers.0"),
        (_grid(axes={"workers": []}), "axes.workers"),
        (_grid(axes={"strategy": [{"name": "x", "set": {"mode": "sync"}}]}), "axes.strategy.0"),
        (_grid(axes={"strategy": [{"name": "x", "set": {"trainingz.mode": "sync"}}]}), "unknown section"),
        (_grid(axes={"profile": ["no-such-profile"]}), "axes.profile"),
        (_grid(axes={"colour": ["red"]}), "axes.colour"),
        (_grid(target={"floor_plus": 0.1, "loss": 2.0}), "target"),
        (_grid(target={"floor_plus": -1}), "target.floor_plus"),
        (_grid(repeats=0), "repeats"),
        (_grid(axis_keys={"speed": "training.mode"}), "axis_keys"),
        (_grid(base={"training": {"steps": -3}}), "base.training.steps"),
        (_grid(name="has space"), "name"),
    ],
)
def test_validation_errors_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(GridError) as err:
        parse_grid(data)
    assert field in str(err.value)


def test_two_axes_may_not_set_the_same_key() -> None:
    data = _grid(axes={"codec": ["fp16"],
                       "extra": {"zip": [{"name": "z", "set": {"training.codec.name": "int8"}}]}})
    with pytest.raises(GridError, match="training.codec.name"):
        parse_grid(data)


def test_identical_cells_are_an_error() -> None:
    with pytest.raises(GridError, match="identical"):
        parse_grid(_grid(axes={"strategy": ["sync", {"name": "again", "set": {"training.strategy.name": "sync"}}]}))


def test_load_grid_reads_base_config_relative_to_the_grid(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("training:\n  learning_rate: 0.01\n")
    (tmp_path / "g.yaml").write_text(
        "name: g\nbase_config: base.yaml\nbase:\n  training:\n    batch_size: 8\n")
    rg = load_grid(tmp_path / "g.yaml")
    cfg = rg.config_for(rg.expand()[0])
    assert cfg.training.learning_rate == 0.01 and cfg.training.batch_size == 8
    (tmp_path / "bad.yaml").write_text("name: g\nbase_config: missing.yaml\n")
    with pytest.raises(GridError, match="base_config"):
        load_grid(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(GridError, match="cannot parse"):
        load_grid(tmp_path / "broken.yaml")
    with pytest.raises(GridError, match="not found"):
        load_grid(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "name", ["smoke", "wan_strategies", "compression", "byzantine", "privacy", "readme_wan", "frontier"]
)
def test_shipped_grids_load(name: str) -> None:
    rg = load_grid(EXPERIMENTS / f"{name}.yaml")
    cells = rg.expand()
    assert cells and rg.grid.name == name
    for cell in cells:  # every shipped cell must pass the config's own validation
        cfg = rg.config_for(cell)
        assert cfg.training.num_workers == cell.workers
        # A cell's own budget (an axis value setting training.steps) wins over the grid's.
        assert cfg.training.steps == cell.overrides.get("training.steps", cell.steps)


def test_frontier_grid_gives_every_method_the_same_samples() -> None:
    rg = load_grid(EXPERIMENTS / "frontier.yaml")
    samples = set()
    for cell in rg.expand():
        t = rg.config_for(cell).training
        per_update = t.build_strategy().steps_per_update()
        batches = t.versions * per_update * (t.strategy.buffer_size if t.strategy.name == "buffered_async" else 1)
        samples.add(batches if t.strategy.name == "buffered_async" else batches * t.num_workers)
    assert samples == {1200 * 4}


def test_smoke_grid_is_small() -> None:
    rg = load_grid(EXPERIMENTS / "smoke.yaml")
    cells = rg.expand()
    assert 2 <= len(cells) <= 4
    assert all(c.steps <= 40 for c in cells)
