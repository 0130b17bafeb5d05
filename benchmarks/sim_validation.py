"""The simulator against real runs: {good, cellular, satellite, straggler} × {sync, async, diloco}.

Every cell is first run for real (`run-experiments`' embedded backend: controller, PS and workers as processes,
every link shaped by the userspace relays), then simulated from its run folder with real numerics
(`sim.validation.validate_trained`: the same config, profile file, shaper semantics and measured compute
times). Three figures are compared, simulated against measured: mean round time (one PS version; within
10 %), time to the target loss counted from the end of start-up (within 15 %; start-up — every worker's first,
warm-up update — is not modelled) and final eval loss (within 2 %). Every cell is reported, misses included,
with the machine it ran on.

    python benchmarks/sim_validation.py                  # the full table (~30 min on 2 cores)
    python benchmarks/sim_validation.py --quick          # cellular × sync and good × diloco
    python benchmarks/sim_validation.py --update-docs    # also rewrite the table in docs/simulation.md

Writes results/sim_validation.json and results/sim_validation.md. Run it on an otherwise idle machine: the
real runs' timing degrades under CPU contention the simulator does not model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.grid import Target, parse_grid
from dist_llm_train.experiments.machine import describe_machine, machine_info
from dist_llm_train.experiments.runner import run_grid
from dist_llm_train.sim.validation import TOLERANCES, RunFolderError, validate_trained

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "simulation.md"
BEGIN, END = "<!-- sim-validation:begin -->", "<!-- sim-validation:end -->"
PROFILES = ["good", "cellular", "satellite", "straggler"]
WORKERS = 3
STRATEGIES: dict[str, tuple[int, dict[str, Any], Target]] = {
    # name: (per-worker step budget, training settings, target). Sync and DiLoCo get within 0.10 nats of the
    # floor well inside their versions; async moves one worker's step per version, so its target is looser.
    "sync": (60, {"training.strategy.name": "sync"}, Target(floor_plus=0.10)),
    "async": (180, {"training.strategy.name": "async", "training.strategy.max_staleness": 5},
              Target(floor_plus=0.25)),
    "diloco": (150, {"training.strategy.name": "diloco", "training.strategy.local_steps": 10},
               Target(floor_plus=0.10)),
}
QUICK = [("cellular", "sync"), ("good", "diloco")]


def run_cell(profile: str, strategy: str, out: Path) -> dict[str, Any]:
    steps, settings, target = STRATEGIES[strategy]
    grid = parse_grid({
        "name": f"val-{profile}-{strategy}", "steps": steps, "target": target.model_dump(exclude_none=True),
        "axes": {"profile": [profile], "strategy": [{"name": strategy, "set": settings}],
                 "workers": [WORKERS]},
        "timeout_s": 1800,
    })
    cell_out = out / f"{profile}-{strategy}"
    result = run_grid(grid, cell_out, backend="embedded")
    row = result.rows[0]
    base = {"profile": profile, "strategy": strategy, "workers": WORKERS, "steps": steps}
    if row.get("status") != "ok" or not row.get("run_dir"):
        return {**base, "error": f"embedded run failed: {row.get('error')}"}
    try:
        v = validate_trained(Path(str(row["run_dir"])), cell_out / "sim", target=target)
    except RunFolderError as err:
        return {**base, "error": str(err)}
    return {**base, **v.as_dict()}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/r" if x is None else fmt.format(x)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| profile | strategy | versions | round measured / simulated (s) | error | time to target after "
            "start-up, measured / simulated (s) | error | final eval loss measured / simulated | error | within |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['profile']} | {r['strategy']} | - | {r['error']} | | | | | | no |")
            continue
        m, s, e = r["measured"], r["simulated"], r["errors"]
        lines.append(
            f"| {r['profile']} | {r['strategy']} | {r['versions']} | {_num(m['round_s'])} / {_num(s['round_s'])} | "
            f"{_pct(e['round_s'])} | {_num(m['time_to_target_s'], '{:.1f}')} / "
            f"{_num(s['time_to_target_s'], '{:.1f}')} | {_pct(e['time_to_target_s'])} | "
            f"{_num(m['final_loss'], '{:.4f}')} / {_num(s['final_loss'], '{:.4f}')} | {_pct(e['final_loss'])} | "
            f"{'yes' if not r['misses'] else '; '.join(r['misses'])} |"
        )
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], info: dict[str, Any], wall_s: float) -> str:
    ok = sum(1 for r in rows if "error" not in r and not r["misses"])
    tol = ", ".join(f"{k} {100 * v:.0f} %" for k, v in TOLERANCES.items())
    targets = ", ".join(f"{name} floor + {t.floor_plus}" for name, (_, _, t) in STRATEGIES.items())
    return "\n".join([
        f"{WORKERS} workers per cell; target (nats above the entropy floor): {targets}; tolerances: {tol}. "
        f"{ok} of {len(rows)} cells within every tolerance. Generated by `python benchmarks/sim_validation.py` "
        f"in {wall_s / 60:.0f} min on {describe_machine(info)}, load average {os.getloadavg()[0]:.1f} at the "
        "end. n/r: target not reached within the run's versions (on both sides: not a miss).",
        "",
        table(rows),
    ])


def update_docs(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN not in doc:
        raise SystemExit(f"{DOC} has no {BEGIN} marker")
    DOC.write_text(re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, doc, flags=re.S))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two cells: cellular × sync and good × diloco")
    ap.add_argument("--update-docs", action="store_true", help="rewrite the table in docs/simulation.md")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    cells = QUICK if args.quick else [(p, s) for s in STRATEGIES for p in PROFILES]
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sim-validation-") as tmp:
        for i, (profile, strategy) in enumerate(cells, 1):
            print(f"[{i}/{len(cells)}] {profile} × {strategy} ...", flush=True)
            row = run_cell(profile, strategy, Path(tmp))
            print(json.dumps({k: row.get(k) for k in ("errors", "misses", "error") if k in row}), flush=True)
            rows.append(row)
    wall = time.monotonic() - started
    info = machine_info()
    text = report(rows, info, wall)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "sim_validation_quick" if args.quick else "sim_validation"
    (args.out / f"{name}.json").write_text(json.dumps({"rows": rows, "machine": info, "wall_s": wall,
                                                       "tolerances": TOLERANCES}, indent=2, default=str) + "\n")
    (args.out / f"{name}.md").write_text(f"# Simulator validation\n\n{text}\n")
    print(text)
    if args.update_docs:
        update_docs(text)
    print(json.dumps({"cells": len(rows), "within": sum(1 for r in rows if "error" not in r and not r["misses"]),
                      "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
