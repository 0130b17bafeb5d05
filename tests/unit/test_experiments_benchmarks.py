"""benchmarks/run_all.py: discovering quick arguments, collecting ratios, composing BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def run_all() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "benchmarks" / "run_all.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run_all"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_args_from_literal_option_or_nothing(run_all: ModuleType) -> None:
    assert run_all.quick_args('QUICK_ARGS = ["--count", "5"]\n') == ["--count", "5"]
    assert run_all.quick_args('ap.add_argument("--quick", action="store_true")\n') == ["--quick"]
    assert run_all.quick_args("print('no options')\n") == []
    with pytest.raises(ValueError):
        run_all.quick_args("QUICK_ARGS = [1, 2]\n")


def test_quick_skip_says_why_or_runs(run_all: ModuleType) -> None:
    assert run_all.quick_skip('QUICK_SKIP = "needs minutes"\n') == "needs minutes"
    assert run_all.quick_skip('QUICK_ARGS = ["--quick"]\n') is None
    with pytest.raises(ValueError):
        run_all.quick_skip("QUICK_SKIP = True\n")
    # The soak judges growth over minutes: CI's quick pass leaves it to `make soak`.
    assert run_all.quick_skip((ROOT / "benchmarks" / "soak.py").read_text())


def test_figures_pick_ratios_bounds_and_targets(run_all: ModuleType) -> None:
    data = {"rows": [{"measured_over_bound": 1.2, "mb_per_s": 900}, {"profile": "cellular", "speedup": 3}],
            "fitted_exponent": 0.9, "target": {"met": True, "name": "x"}, "ratio_vs_raw_tcp": 0.5}
    assert dict(run_all.figures(data)) == {
        "rows[0].measured_over_bound": 1.2, "rows[profile=cellular].speedup": 3,
        "fitted_exponent": 0.9, "target.met": True, "ratio_vs_raw_tcp": 0.5,
    }


def test_runs_a_benchmark_and_composes_the_report(run_all: ModuleType, tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    ok = bench / "fake_ok.py"
    ok.write_text(
        "import argparse, json, pathlib\n"
        "QUICK_ARGS = ['--n', '2']\n"
        "ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=9)\n"
        "ap.add_argument(\"--out\", type=pathlib.Path)\n"
        "a = ap.parse_args()\n"
        "(a.out / 'fake_ok.json').write_text(json.dumps({'n': a.n, 'speedup_ratio': a.n / 4}))\n"
        "(a.out / 'fake_ok.md').write_text('# Fake\\n\\n| n |\\n|---|\\n| %d |\\n' % a.n)\n"
    )
    bad = bench / "fake_bad.py"
    bad.write_text("raise SystemExit(3)\n")
    results = tmp_path / "results"
    res_ok = run_all.run_one(ok, True, results, timeout_s=60)
    res_bad = run_all.run_one(bad, True, results, timeout_s=60)
    assert res_ok.ok and not res_ok.error and [p.name for p in res_ok.json_files] == ["fake_ok.json"]
    assert not res_bad.ok and res_bad.error == "exit status 3"
    text = run_all.compose([res_ok, res_bad], quick=True)
    assert "| fake_ok | speedup_ratio | 0.5 |" in text
    assert "**failed**: exit status 3" in text
    assert "### Fake" in text and "cores" in text
    assert (results / "logs" / "fake_bad.log").is_file()
