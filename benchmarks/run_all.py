"""`make bench`: run every benchmarks/*.py, then compose results/BENCHMARKS.md from what they wrote.

Conventions a benchmark follows to be picked up (nothing else is required):
* it is a script `benchmarks/<name>.py` (files starting with `_` and this driver are skipped);
* it writes `results/<name>*.json` and `results/<name>*.md` (an `--out DIR` option, when it has one, is
  pointed at the results folder);
* for `--quick` (CI) it declares `QUICK_ARGS = [...]` (a literal list, read without importing the script) or
  accepts `--quick` itself; otherwise it runs with its defaults;
* a benchmark whose quick run needs longer than the default limit declares `QUICK_TIMEOUT_S = <seconds>`;
* one with no meaningful quick run declares `QUICK_SKIP = "<why>"`: `--quick` skips it and says why.

Each benchmark runs in its own interpreter with a time limit; its output goes to results/logs/<name>.log. A
failing benchmark is reported in BENCHMARKS.md and makes the exit status 1, after every other one has run.
Ratios are gathered from the JSON files: every numeric or boolean leaf whose key mentions a ratio, a bound,
a fitted exponent or whether a target was met.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--results results]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.machine import describe_machine, machine_info

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
RATIO_KEY = re.compile(r"ratio|over_bound|exponent|meets_target|^met$|speedup", re.IGNORECASE)
LABEL_KEYS = ("name", "label", "backend", "profile", "workers", "mode")
MAX_FIGURES = 40
"""Per benchmark, in BENCHMARKS.md's figure table (the JSON files keep everything)."""


@dataclass
class BenchResult:
    name: str
    argv: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    error: str = ""
    json_files: list[Path] = field(default_factory=list)
    md_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def discover(only: list[str] | None = None) -> list[Path]:
    scripts = sorted(p for p in BENCH_DIR.glob("*.py")
                     if not p.name.startswith("_") and p.name != Path(__file__).name)
    if only:
        unknown = sorted(set(only) - {p.stem for p in scripts})
        if unknown:
            raise SystemExit(f"unknown benchmarks {unknown}; have {[p.stem for p in scripts]}")
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def _literal(source: str, name: str) -> object | None:
    """A module-level `NAME = <literal>` of a benchmark script, read without importing it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def quick_args(source: str) -> list[str]:
    """The script's `QUICK_ARGS` literal, else ["--quick"] when it has that option, else nothing."""
    value = _literal(source, "QUICK_ARGS")
    if value is not None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("QUICK_ARGS must be a list of strings")
        return value
    return ["--quick"] if '"--quick"' in source else []


def quick_skip(source: str) -> str | None:
    """Why `--quick` skips this script (its `QUICK_SKIP` literal), or None: it runs."""
    value = _literal(source, "QUICK_SKIP")
    if value is not None and not isinstance(value, str):
        raise ValueError("QUICK_SKIP must be a string saying why")
    return value


def result_stem(script: Path) -> str:
    """Results are `results/<stem>*`; a script whose files carry another name says so in `RESULT_STEM`."""
    value = _literal(script.read_text(), "RESULT_STEM")
    return value if isinstance(value, str) else script.stem


def build_argv(script: Path, quick: bool, results: Path) -> list[str]:
    source = script.read_text()
    argv = [sys.executable, str(script)]
    if quick:
        argv += quick_args(source)
    if '"--out"' in source:
        argv += ["--out", str(results)]
    return argv


def run_one(script: Path, quick: bool, results: Path, timeout_s: float) -> BenchResult:
    res = BenchResult(script.stem, build_argv(script, quick, results))
    log_dir = results / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started_wall = time.time()
    started = time.monotonic()
    with (log_dir / f"{script.stem}.log").open("w") as log:
        try:
            proc = subprocess.run(res.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s,
                                  check=False)
            res.returncode = proc.returncode
            if proc.returncode:
                res.error = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            res.error = f"timed out after {timeout_s:.0f}s"
    res.seconds = time.monotonic() - started
    fresh = [p for p in sorted(results.glob(f"{result_stem(script)}*")) if p.stat().st_mtime >= started_wall - 1]
    res.json_files = [p for p in fresh if p.suffix == ".json"]
    res.md_files = [p for p in fresh if p.suffix == ".md"]
    if res.ok and not res.json_files:
        res.error = "wrote no results/*.json"
    return res


def figures(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) for each numeric/boolean leaf whose key names a ratio, bound or target."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict | list):
                out += figures(v, path)
            elif RATIO_KEY.search(str(k)) and isinstance(v, bool | int | float):
                out.append((path, v))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += figures(v, f"{prefix}[{_item_label(v, i)}]")
    return out


def _item_label(item: Any, index: int) -> str:
    """`backend=sim,profile=cellular` for a list item that names itself, else its index."""
    if isinstance(item, dict):
        parts = [f"{k}={item[k]}" for k in LABEL_KEYS if isinstance(item.get(k), str | int) and k in item]
        if parts:
            return ",".join(parts[:3])
    return str(index)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def compose(results: list[BenchResult], quick: bool) -> str:
    info = machine_info()
    lines = [
        "# Benchmarks",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %z')} "
        f"({'quick' if quick else 'full'} run of `make bench`)",
        f"- machine: {describe_machine(info)}",
        f"- kernel / OS: {info['os']}",
        "",
        "| benchmark | status | seconds | command |",
        "|---|---|---:|---|",
    ]
    for r in results:
        status = "ok" if r.ok and not r.error else f"**failed**: {r.error}"
        cmd = " ".join(Path(a).name if a.endswith(".py") else a for a in r.argv[1:])
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} | `{cmd}` |")
    lines += ["", "## Ratios and targets", "", "| benchmark | figure | value |", "|---|---|---:|"]
    for r in results:
        for path in r.json_files:
            try:
                found = figures(json.loads(path.read_text()))
            except (OSError, ValueError) as err:
                lines.append(f"| {r.name} | {path.name} unreadable | {err} |")
                continue
            for key, value in found[:MAX_FIGURES]:
                lines.append(f"| {path.stem} | {key} | {_fmt(value)} |")
            if len(found) > MAX_FIGURES:
                lines.append(f"| {path.stem} | ... {len(found) - MAX_FIGURES} more in {path.name} | |")
    for r in results:
        for md in r.md_files:
            body = md.read_text().strip()
            body = re.sub(r"^# ", "### ", body, flags=re.MULTILINE)
            lines += ["", f"## {md.stem}", "", body]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description="Run every benchmark and write results/BENCHMARKS.md.")
    ap.add_argument("--quick", action="store_true", help="short versions (CI)")
    ap.add_argument("--only", nargs="*", help="benchmark names (file stems) to run")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="per benchmark (default 600 quick, 3600 full)")
    args = ap.parse_args()
    timeout = args.timeout_s or (600.0 if args.quick else 3600.0)
    args.results.mkdir(parents=True, exist_ok=True)
    results = []
    for script in discover(args.only):
        print(f"== {script.stem}", flush=True)
        skip = quick_skip(script.read_text()) if args.quick else None
        if skip is not None:
            print(f"   skipped in --quick: {skip}", flush=True)
            continue
        own = _literal(script.read_text(), "QUICK_TIMEOUT_S") if args.quick and not args.timeout_s else None
        limit = float(own) if isinstance(own, int | float) else timeout
        res = run_one(script, args.quick, args.results.resolve(), limit)
        status = "ok" if res.ok and not res.error else "FAILED: " + res.error
        print(f"   {status} in {res.seconds:.0f}s", flush=True)
        results.append(res)
    (args.results / "BENCHMARKS.md").write_text(compose(results, args.quick))
    print(f"wrote {args.results / 'BENCHMARKS.md'}")
    return 0 if all(r.ok and not r.error for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
