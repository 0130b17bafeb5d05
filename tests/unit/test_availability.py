"""Availability traces of transient workers: the format, its validation errors, the seeded generators'
statistics and determinism, the config section and the `--availability` flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dist_llm_train.cli.main import app
from dist_llm_train.config import (
    AvailabilityConfig,
    ConfigError,
    load_availability_file,
    load_config,
    parse_config,
    read_trace,
)
from dist_llm_train.core.availability import (
    AvailabilityTrace,
    CorrelatedPreemption,
    DiurnalPattern,
    ExponentialSessions,
    TraceError,
    build_trace,
    generate,
    parse_csv,
    parse_mapping,
)

EXAMPLES = Path(__file__).parents[2] / "examples"
runner = CliRunner()


# -- the format ----------------------------------------------------------------------------------------------
def test_csv_rows_names_comments_and_open_sessions() -> None:
    text = "# a comment\nworker,join_s,leave_s\n0,0,10\nworker-0,20,\n\n2,5,8.5\n"
    t = parse_csv(text, workers=3, source="t.csv")
    assert t.to_rows() == [(0, 0.0, 10.0), (0, 20.0, None), (2, 5.0, 8.5)]
    assert t.controlled == {0, 2}
    assert t.present_at_start(0) and t.present_at_start(1) and not t.present_at_start(2)  # 1: no row, stable
    assert t.events() == [(5.0, 2, "join"), (8.5, 2, "leave"), (10.0, 0, "leave"), (20.0, 0, "join")]
    # offered worker-seconds up to 30 s: worker 0 10 + 10, worker 1 (no row) 30, worker 2 3.5
    assert t.offered_s(30.0) == pytest.approx(53.5)
    assert t.available_at(6.0) == 3 and t.available_at(15.0) == 1
    assert parse_csv(t.to_csv(), workers=3).to_rows() == t.to_rows()  # round trip


def test_yaml_mapping_and_list_rows() -> None:
    data = yaml.safe_load(
        "workers: 2\nsessions:\n  - {worker: worker-1, join_s: 0, leave_s: 4}\n  - [1, 6, null]\n  - [0, 2]\n"
    )
    t = parse_mapping(data, workers=2)
    assert t.to_rows() == [(0, 2.0, None), (1, 0.0, 4.0), (1, 6.0, None)]
    assert parse_mapping(t.to_mapping(), workers=2).to_rows() == t.to_rows()
    with pytest.raises(TraceError, match="for 2 workers but this run has 3"):
        parse_mapping(data, workers=3)


def test_a_session_that_ends_as_the_next_begins_is_not_an_overlap() -> None:
    t = parse_csv("0,0,5\n0,5,9\n", workers=1)
    assert t.events() == [(5.0, 0, "leave"), (5.0, 0, "join"), (9.0, 0, "leave")]  # the leave first


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,0,10\n1,0,\n0,5,20\n", r"line 3: worker 0's session from 5 s overlaps line 1 \(from 0 s to 10 s\)"),
        ("0,0,\n0,50,60\n", r"line 2: .*overlaps line 1 \(from 0 s to the end\)"),
        ("0,-1,3\n", r"line 1: join_s: .*negative"),
        ("0,1,-3\n", r"line 1: leave_s: .*negative"),
        ("worker,join_s,leave_s\n0,0,1\n3,0,1\n", r"line 3: worker 3 does not exist \(this run has workers 0..2\)"),
        ("worker-7,0,1\n", r"line 1: worker 7 does not exist"),
        ("0,3,1\n", r"line 1: leave_s 1 is not after join_s 3"),
        ("bob,0,1\n", r"line 1: worker: worker 'bob' is not an index or a name worker-<i>"),
        ("0,soon,1\n", r"line 1: join_s 'soon' is not a number"),
        ("0,1,2,3\n", r"line 1: expected worker,join_s,leave_s, got 4 columns"),
        ("0,inf,\n", r"line 1: join_s: .*not finite"),
    ],
)
def test_bad_rows_are_named(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_csv(text, workers=3)


def test_mapping_rows_are_named_by_position() -> None:
    with pytest.raises(TraceError, match=r"row 2: worker 9 does not exist"):
        build_trace([{"worker": 0, "join_s": 0}, {"worker": 9, "join_s": 1}], workers=2)
    with pytest.raises(TraceError, match=r"row 1: join_s"):
        build_trace([[0, -2, 1]], workers=2)


# -- generators ------------------------------------------------------------------------------------------------
def _valid(t: AvailabilityTrace) -> AvailabilityTrace:
    """A generated trace passes the same validation a file does."""
    return AvailabilityTrace.model_validate(t.model_dump())


def test_exponential_sessions_have_the_configured_means() -> None:
    spec = ExponentialSessions(mean_up_s=50, mean_down_s=25, horizon_s=20_000, seed=4)
    t = _valid(generate(spec, 200))
    ups, downs = [], []
    for w in range(200):
        sessions = t.sessions_of(w)
        ups += [s.leave_s - s.join_s for s in sessions if s.leave_s is not None]
        downs += [b.join_s - a.leave_s for a, b in zip(sessions, sessions[1:], strict=False) if a.leave_s]
    assert len(ups) > 40_000
    assert np.mean(ups) == pytest.approx(50, rel=0.03)
    assert np.mean(downs) == pytest.approx(25, rel=0.03)
    assert np.std(ups) == pytest.approx(50, rel=0.05)  # exponential: sd = mean
    # stationary start: two thirds of the pool is up at any time, from the first second on
    for at in (0.0, 5_000.0, 19_000.0):
        assert t.available_at(at) / 200 == pytest.approx(2 / 3, abs=0.1)
    everyone = generate(spec.model_copy(update={"start": "up"}), 50)
    assert all(everyone.present_at_start(w) for w in range(50))


def test_generators_are_deterministic_per_seed() -> None:
    specs = [
        ExponentialSessions(mean_up_s=30, mean_down_s=10, horizon_s=500, seed=1),
        DiurnalPattern(period_s=60, horizon_s=300, seed=1),
        CorrelatedPreemption(fraction=0.25, down_s=20, rate_per_s=0.05, horizon_s=500, seed=1),
    ]
    for spec in specs:
        a, b = generate(spec, 20), generate(spec, 20)
        assert a.to_rows() == b.to_rows() and a.source == b.source
        other = generate(spec.model_copy(update={"seed": 2}), 20)
        assert other.to_rows() != a.to_rows()
        _valid(a)
    # each worker has its own stream: a smaller pool is a prefix of a larger one
    small, large = generate(specs[0], 5), generate(specs[0], 40)
    assert small.to_rows() == [r for r in large.to_rows() if r[0] < 5]


def test_diurnal_availability_follows_the_curve() -> None:
    spec = DiurnalPattern(period_s=100, min_available=0.2, max_available=0.9, peak_s=30, horizon_s=400, seed=3)
    n = 3000
    t = _valid(generate(spec, n))
    for at in np.linspace(1, 399, 23):
        assert t.available_at(float(at)) / n == pytest.approx(float(spec.available(at)), abs=0.035)
    assert t.available_at(30.0) / n == pytest.approx(0.9, abs=0.03)  # peak
    assert t.available_at(80.0) / n == pytest.approx(0.2, abs=0.03)  # trough
    # one session per worker around each peak: no worker has two sessions within one period
    for w in range(50):
        starts = [s.join_s for s in t.sessions_of(w)]
        assert all(b - a > 50 for a, b in zip(starts, starts[1:], strict=False))


def test_correlated_preemption_takes_an_exact_fraction_together() -> None:
    spec = CorrelatedPreemption(fraction=0.3, down_s=40, at_s=[100, 300], horizon_s=1000, seed=5)
    t = _valid(generate(spec, 50))
    leaves = [e for e in t.events() if e[2] == "leave"]
    joins = [e for e in t.events() if e[2] == "join"]
    assert [sum(1 for e in leaves if e[0] == at) for at in (100, 300)] == [15, 15]
    assert len(leaves) == 30 and sorted(e[0] for e in joins) == [140.0] * 15 + [340.0] * 15
    assert t.available_at(120) == 35 and t.available_at(200) == 50
    # overlapping events pick among the workers still up; a Poisson rate gives rate × horizon events
    dense = _valid(generate(CorrelatedPreemption(fraction=0.5, down_s=100, at_s=[10, 20, 30], seed=5), 10))
    assert dense.available_at(25) == 0 and dense.available_at(35) == 0 and dense.available_at(115) == 5
    poisson = generate(CorrelatedPreemption(fraction=0.1, down_s=1, rate_per_s=0.02, horizon_s=100_000), 10)
    events = {e[0] for e in poisson.events() if e[2] == "leave"}
    assert len(events) == pytest.approx(2000, rel=0.1)


def test_generator_specs_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at_s, a Poisson rate_per_s"):
        CorrelatedPreemption(fraction=0.5, down_s=10)
    with pytest.raises(ValueError, match="exceeds max_available"):
        DiurnalPattern(min_available=0.8, max_available=0.5)
    with pytest.raises(ValueError):
        ExponentialSessions(mean_up_s=0, mean_down_s=10)


# -- the config section and files -----------------------------------------------------------------------------
def test_config_section_takes_exactly_one_source(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLES / "availability.yaml")
    assert cfg.availability is not None and cfg.availability.generator is not None
    assert cfg.availability.resolve(4).workers == 4
    with pytest.raises(ConfigError, match="exactly one of trace, sessions or generator"):
        parse_config({"availability": {}})
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"availability": {"trace": "x.csv", "generator": {"kind": "preemption", "fraction": 1,
                                                                        "down_s": 1, "at_s": [1]}}})
    with pytest.raises(ConfigError, match=r"availability.sessions.1.leave_s"):
        parse_config({"availability": {"sessions": [{"worker": 0, "join_s": 0}, {"worker": 1, "join_s": 0,
                                                                                 "leave_s": -1}]}})
    inline = parse_config({"availability": {"sessions": [{"worker": 0, "join_s": 0, "leave_s": 5},
                                                         {"worker": "worker-0", "join_s": 3}]}})
    assert inline.availability is not None
    with pytest.raises(ConfigError, match=r"availability: availability.sessions.1: worker 0's session from 3 s"):
        inline.availability.resolve(2)
    with pytest.raises(ConfigError, match="trace file not found"):
        AvailabilityConfig(trace=str(tmp_path / "nope.csv")).resolve(2)


def test_trace_files_and_the_flag_s_file(tmp_path: Path) -> None:
    csv_trace = EXAMPLES / "availability_trace.csv"
    assert read_trace(csv_trace, 3).to_rows()[:2] == [(0, 0.0, None), (1, 0.0, 20.0)]
    yml = tmp_path / "trace.yaml"
    yml.write_text("sessions:\n  - [0, 0, 5]\n  - [1, 2]\n")
    assert read_trace(yml, 2).to_rows() == [(0, 0.0, 5.0), (1, 2.0, None)]
    with pytest.raises(TraceError, match=r"trace.yaml: row 2: worker 1 does not exist"):
        read_trace(yml, 1)
    # --availability FILE: a generator section is kept as a generator (the run's config.yaml records it) ...
    assert load_availability_file(EXAMPLES / "availability.yaml").generator is not None
    gen = tmp_path / "gen.yaml"
    gen.write_text("generator: {kind: preemption, fraction: 0.5, down_s: 5, at_s: [3]}\n")
    assert load_availability_file(gen).generator is not None
    # ... anything else is a trace file
    assert load_availability_file(csv_trace).trace == str(csv_trace)
    assert load_availability_file(yml).trace == str(yml)


def test_simulate_flag_applies_and_names_bad_rows(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("0,0,2\n0,4,\n")
    res = runner.invoke(app, ["simulate", "--workers", "2", "--steps", "50", "--params", "100", "--profile", "none",
                              "--no-report", "--json", "--availability", str(good)])
    assert res.exit_code == 0, res.output
    av = json.loads(res.stdout.splitlines()[-1])["simulation"]["availability"]
    assert av["trace"]["sessions"] == 2 and av["leaves"] == 1 and av["trace_joins"] == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("0,0,2\n5,1,\n")
    res = runner.invoke(app, ["simulate", "--workers", "2", "--no-report", "--availability", str(bad)])
    assert res.exit_code == 2 and "availability: line 2: worker 5 does not exist" in " ".join(res.output.split())


def test_run_flag_refuses_a_bad_trace_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("0,0,10\n0,5,\n")
    runs = tmp_path / "runs"
    res = runner.invoke(app, ["run", "--workers", "2", "--runs-dir", str(runs), "--availability", str(bad)])
    out = " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())  # the error box's borders and wrapping
    assert res.exit_code == 2 and "line 2: worker 0's session from 5 s overlaps line 1" in out
    res = runner.invoke(app, ["run", "--workers", "2", "--runs-dir", str(runs),
                              "--availability", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "not found" in res.output
    assert not runs.exists(), "a refused run must not create a run folder"
