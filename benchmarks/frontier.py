"""Low-communication training at the published frontier, measured on the markov-hard task.

Every cell trains the real model (examples/markov_hard.yaml: 2.2 M parameters, an order-2 Markov corpus with
an exact loss floor) with 4 workers in the simulator's real-numerics mode: the real worker pipelines, codecs,
PS job and optimizers, on a virtual clock driven by the profile's links. The global model (what a pull
returns) is evaluated on the held-out set as it trains (`simulate_trained(eval_every=...)`), so time and
bytes to target are the global model's, not the workers' own training losses. Bytes are every update that
reached the PS and every parameter pull or delta it sent: both directions, as the PS counted them.

Cells (`--quick` runs these; the full run adds the rest of experiments/frontier.yaml's methods on every
profile):

* sync × cellular — the baseline: float32 gradients up, the float32 model down, every step;
* DiLoCo + int4 (both directions) × cellular — the bytes and time figures; the full run adds DiLoCo,
  SparseLoCo (chunk-wise top-k + 2-bit values, decaying error feedback, int4 downlink deltas) and Streaming
  DiLoCo + int4 on cellular;
* Streaming DiLoCo × intercontinental — compute utilisation when the sync hides behind compute;
* buffered async and sync × good — buffered async's loss at sync's sample budget;
* one worker × good with a quarter of the compute — the task's sanity check (collaboration must matter).

Printed last, one JSON object: bytes_ratio (sync's bytes to target / the best method's), loss_ratio (that
method's final eval loss / sync's at equal total compute), time_ratio_cellular (sync's virtual time to
target on cellular / the best method's), utilization_intercontinental, single_worker_excess_ratio,
buffered_async_loss_ratio, the method each came from, and whether each target of the issue was met.

    python benchmarks/frontier.py            # every method × cellular, plus the decisive cells (~45 min)
    python benchmarks/frontier.py --quick    # the decisive cells (≤ 15 min on 2 cores)

Writes results/frontier.json and results/frontier.md (--quick: frontier_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dist_llm_train.config import Config, load_config, parse_config
from dist_llm_train.experiments.machine import describe_machine, machine_info
from dist_llm_train.sim.config import SimConfig
from dist_llm_train.sim.runner import json_safe, summary
from dist_llm_train.sim.training import simulate_trained

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "examples" / "markov_hard.yaml"
WORKERS = 4
TARGET_NATS = 0.10  # the target: the exact loss floor + this many nats
QUICK_STEPS = 1200  # per-worker inner-step budget (every method gets the same samples)
FULL_STEPS = 2000
EVAL_EVERY_STEPS = 60  # evaluate the global model every this many inner steps' worth of versions
QUICK_ARGS = ["--quick"]
QUICK_TIMEOUT_S = 1800  # run_all's limit for --quick: ~12 min measured here, with room for a busier CI machine

# The targets.
TARGET_BYTES_RATIO = 1000.0
TARGET_LOSS_RATIO = 1.02
TARGET_TIME_RATIO = 5.0
TARGET_UTILISATION = 0.90
TARGET_BUFFERED_LOSS = 1.05

# Tuned on this task at 1,200 steps (docs/training_protocol.md §7). The gap to sync does not depend on the sync
# interval H (plain averaging at H = 1 ends where H = 30 does), so H is as large as the loss allows: 240 (five
# rounds). Outer lr 1 without momentum (model averaging; Nesterov 0.7/0.9 ends 0.19 above the floor at H = 30,
# outer lr 2 diverges), inner lr 0.03, and twice that for the n-gram logit table, whose sparse rows each
# worker's Adam under-moves on its own small batches (excess 0.118 -> 0.093). int2 uplinks cost 0.03 nats here.
DILOCO = {
    "local_steps": 240,
    "inner_lr": 0.03,
    "outer_lr": 1.0,
    "outer_momentum": 0.0,
    "inner_lr_scale": {"ngram": 2.0},
}
METHODS: dict[str, dict[str, Any]] = {
    "sync": {},
    "diloco": {"strategy": {"name": "diloco", **DILOCO}},
    "diloco+int4": {"strategy": {"name": "diloco", **DILOCO}, "codec": {"name": "int4"}, "downlink": {"name": "int4"}},
    "sparseloco": {
        "strategy": {
            "name": "sparseloco",
            "local_steps": 30,
            "inner_lr": 0.03,
            "outer_lr": 1.0,
            "inner_lr_scale": {"ngram": 2.0},
        },
        "codec": {"name": "sparseloco", "ratio": 0.05, "sparse_bits": 2},
        "downlink": {"name": "int4"},
    },
    # Streaming: a fragment (a third of the model) syncs every H/P = 40 inner steps and the worker computes all
    # 40 while it is in flight (tau = H/P), so a 250 ms RTT hides behind compute.
    "streaming_diloco+int4": {
        "strategy": {"name": "streaming_diloco", **DILOCO, "local_steps": 120, "fragments": 3, "overlap_steps": 40},
        "codec": {"name": "int4"},
        "downlink": {"name": "int4"},
    },
    "buffered_async": {"strategy": {"name": "buffered_async", "buffer_size": 4}},
}
LOW_COMM = ["diloco", "diloco+int4", "sparseloco", "streaming_diloco+int4"]


@dataclass
class Cell:
    method: str
    profile: str
    workers: int = WORKERS


def config_for(method: str, workers: int, steps: int, task: Path = TASK) -> Config:
    """The task's config with the method's training settings; buffered async's budget counts updates."""
    data = yaml.safe_load(task.read_text())
    training = {**data["training"], **METHODS[method], "num_workers": workers}
    # Every method gets `steps` batches per worker; buffered async's step budget counts applied updates.
    training["steps"] = steps * workers if method == "buffered_async" else steps
    return parse_config({**data, "training": training})


def run_cell(cell: Cell, steps: int, task: Path = TASK) -> dict[str, Any]:
    cfg = config_for(cell.method, cell.workers, steps, task)
    sim = SimConfig.from_config(cfg, profile=cell.profile)
    per_version = sim.steps_per_push if cell.method != "buffered_async" else 1
    every = max(1, EVAL_EVERY_STEPS // per_version)
    if cell.method == "buffered_async":
        every = max(1, EVAL_EVERY_STEPS * cell.workers // sim.strategy_config.buffer_size)  # type: ignore[attr-defined]
    started = time.monotonic()
    result = simulate_trained(cfg, sim, eval_every=every)
    trained = result.trained
    assert trained is not None and trained.loss_floor is not None
    target = trained.loss_floor + TARGET_NATS
    hit = next((p for p in trained.eval_curve if p.loss <= target), None)
    sim_summary = summary(result)["simulation"]
    return {
        "method": cell.method,
        "profile": cell.profile,
        "workers": cell.workers,
        "steps_per_worker": steps,
        "versions": result.version,
        "outcome": result.outcome,
        "final_loss": trained.final_loss,
        "loss_floor": trained.loss_floor,
        "excess": trained.final_loss - trained.loss_floor,
        "target_loss": target,
        "time_to_target_s": hit.virtual_s if hit else None,
        "bytes_to_target": hit.wire_bytes if hit else None,
        "virtual_s": result.virtual_s,
        "wire_bytes": trained.eval_curve[-1].wire_bytes if trained.eval_curve else None,
        "compute_utilisation": sim_summary["compute_utilisation"],
        "curve": [[p.version, round(p.virtual_s, 3), p.wire_bytes, round(p.loss, 5)] for p in trained.eval_curve],
        "wall_s": round(time.monotonic() - started, 1),
    }


def plain(x: Any) -> Any:
    """JSON-ready: numpy scalars as Python ones, non-finite floats as null."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    return json_safe(x)


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures from the cells, each with the method it came from."""

    def row(method: str, profile: str, workers: int = WORKERS) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["method"], r["profile"], r["workers"]) == (method, profile, workers)), None
        )

    sync = row("sync", "cellular")
    out: dict[str, Any] = {"target_nats_above_floor": TARGET_NATS}
    candidates = []
    for method in LOW_COMM:
        r = row(method, "cellular")
        if r is None or sync is None:
            continue
        loss_ratio = r["final_loss"] / sync["final_loss"]
        bytes_ratio = _ratio(sync["bytes_to_target"], r["bytes_to_target"])
        time_ratio = _ratio(sync["time_to_target_s"], r["time_to_target_s"])
        candidates.append((method, bytes_ratio, loss_ratio, time_ratio))
    out["methods_cellular"] = [
        {"method": m, "bytes_ratio": b, "loss_ratio": lr, "time_ratio": t} for m, b, lr, t in candidates
    ]
    # The best method: the most bytes saved within the loss bound; else the most saved by any that reached the
    # target; else (none reached it) the one whose final loss came closest to sync's.
    eligible = [c for c in candidates if c[1] is not None and c[2] <= TARGET_LOSS_RATIO]
    reached = [c for c in candidates if c[1] is not None]
    if eligible or reached:
        best = max(eligible or reached, key=lambda c: c[1] or 0.0)
    else:
        best = min(candidates, key=lambda c: c[2], default=None)
    if best is not None:
        out |= {"best_method": best[0], "bytes_ratio": best[1], "loss_ratio": best[2]}
    fastest = max((c for c in candidates if c[3] is not None), key=lambda c: c[3], default=None)
    if fastest is not None:
        out |= {"time_ratio_cellular": fastest[3], "time_ratio_method": fastest[0]}
    inter = [r for r in rows if r["profile"] == "intercontinental" and r["method"] != "sync"]
    if inter:
        top = max(inter, key=lambda r: r["compute_utilisation"] or 0.0)
        out |= {"utilization_intercontinental": top["compute_utilisation"], "utilization_method": top["method"]}
    # Sync's numerics do not depend on the links: its cellular run is also its run on any other profile.
    single, together = row("sync", "good", 1), sync
    if single and together:
        out["single_worker_excess_ratio"] = _ratio(single["excess"], together["excess"])
    buffered = row("buffered_async", "good")
    if buffered and together:
        out["buffered_async_loss_ratio"] = buffered["final_loss"] / together["final_loss"]
    out["targets_met"] = {
        "bytes_ratio": (out.get("bytes_ratio") or 0) >= TARGET_BYTES_RATIO
        and (out.get("loss_ratio") or 9) <= TARGET_LOSS_RATIO,
        "time_ratio_cellular": (out.get("time_ratio_cellular") or 0) >= TARGET_TIME_RATIO,
        "utilization_intercontinental": (out.get("utilization_intercontinental") or 0) >= TARGET_UTILISATION,
        "buffered_async_loss_ratio": (out.get("buffered_async_loss_ratio") or 9) <= TARGET_BUFFERED_LOSS,
        "single_worker_excess_ratio": (out.get("single_worker_excess_ratio") or 0) >= 1.05,
    }
    return out


def _fmt(x: Any, spec: str = "{:.3g}") -> str:
    return "-" if x is None else spec.format(x)


def markdown(
    rows: list[dict[str, Any]], figs: dict[str, Any], wall_s: float, quick: bool, task: str, load: float | None
) -> str:
    info = machine_info()
    load_text = f"load average {load:.1f} at the end" if load is not None else "load average not recorded"
    lines = [
        f"# Frontier benchmark{' (quick)' if quick else ''}",
        "",
        f"task `{task}`, {WORKERS} workers, simulator real numerics; target = exact "
        f"floor + {TARGET_NATS} nats on the global model's held-out loss; bytes both directions as the PS counted "
        f"them. Generated by `python benchmarks/frontier.py{' --quick' if quick else ''}` in {wall_s / 60:.1f} min "
        f"on {describe_machine(info)}, {load_text}.",
        "",
        "| method | profile | workers | final loss | excess | time to target (virtual s) | bytes to target | "
        "total bytes | utilisation |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['profile']} | {r['workers']} | {r['final_loss']:.4f} | {r['excess']:.4f} | "
            f"{_fmt(r['time_to_target_s'], '{:.0f}')} | {_fmt(r['bytes_to_target'], '{:.3e}')} | "
            f"{_fmt(r['wire_bytes'], '{:.3e}')} | {_fmt(r['compute_utilisation'], '{:.3f}')} |"
        )
    met = figs.get("targets_met", {})
    lines += [
        "",
        "| figure | value | from | target | met |",
        "|---|---:|---|---|---|",
        f"| bytes_ratio (sync bytes to target / best's) | {_fmt(figs.get('bytes_ratio'), '{:.0f}')} | "
        f"{figs.get('best_method', '-')} | ≥ {TARGET_BYTES_RATIO:.0f} at loss_ratio ≤ {TARGET_LOSS_RATIO} | "
        f"{met.get('bytes_ratio')} |",
        f"| loss_ratio (best's final loss / sync's, equal compute) | {_fmt(figs.get('loss_ratio'), '{:.4f}')} | "
        f"{figs.get('best_method', '-')} | ≤ {TARGET_LOSS_RATIO} | - |",
        f"| time_ratio_cellular | {_fmt(figs.get('time_ratio_cellular'), '{:.1f}')} | "
        f"{figs.get('time_ratio_method', '-')} | ≥ {TARGET_TIME_RATIO} | {met.get('time_ratio_cellular')} |",
        f"| utilization_intercontinental | {_fmt(figs.get('utilization_intercontinental'), '{:.3f}')} | "
        f"{figs.get('utilization_method', '-')} | ≥ {TARGET_UTILISATION} | {met.get('utilization_intercontinental')} |",
        f"| buffered_async_loss_ratio (vs sync, equal samples) | "
        f"{_fmt(figs.get('buffered_async_loss_ratio'), '{:.4f}')} | buffered_async | ≤ {TARGET_BUFFERED_LOSS} | "
        f"{met.get('buffered_async_loss_ratio')} |",
        f"| single_worker_excess_ratio (task sanity) | {_fmt(figs.get('single_worker_excess_ratio'), '{:.2f}')} | "
        f"sync, 1 vs {WORKERS} workers | ≥ 1.05 | {met.get('single_worker_excess_ratio')} |",
        "",
    ]
    return "\n".join(lines)


def cells(quick: bool) -> list[Cell]:
    decisive = [
        Cell("sync", "cellular"),
        Cell("diloco+int4", "cellular"),
        Cell("streaming_diloco+int4", "intercontinental"),
        Cell("buffered_async", "good"),
        Cell("sync", "good", workers=1),
    ]
    if quick:
        return decisive
    more = [Cell(m, "cellular") for m in ("diloco", "sparseloco", "streaming_diloco+int4")]
    return decisive[:2] + more + decisive[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"the decisive cells, {QUICK_STEPS} steps per worker")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--task", type=Path, default=TASK, help="the task's config file (model and training)")
    ap.add_argument("--steps", type=int, default=None, help="per-worker inner steps (default: by --quick)")
    ap.add_argument("--only", nargs="*", help="methods to run (default: every cell of the mode)")
    args = ap.parse_args()
    load_config(args.task)  # the task file parses, or this stops here with the reason
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    todo = [c for c in cells(args.quick) if not args.only or c.method in args.only]
    started = time.monotonic()
    rows = []
    for i, cell in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cell.method} × {cell.profile} × {cell.workers} workers ...", flush=True)
        row = run_cell(cell, steps, args.task)
        print(
            f"    final loss {row['final_loss']:.4f} (excess {row['excess']:.4f}), target at "
            f"{_fmt(row['time_to_target_s'], '{:.0f}')} s / {_fmt(row['bytes_to_target'], '{:.3e}')} B, "
            f"utilisation {_fmt(row['compute_utilisation'], '{:.3f}')}, {row['wall_s']} s wall",
            flush=True,
        )
        rows.append(row)
    wall = time.monotonic() - started
    figs = plain(figures(rows))
    stem = "frontier_quick" if args.quick else "frontier"
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    data = {"quick": args.quick, "steps_per_worker": steps, "wall_s": round(wall, 1), "machine": machine_info(),
            "load_average_end": load, "figures": figs, "cells": rows}
    (args.out / f"{stem}.json").write_text(json.dumps(plain(data), indent=2) + "\n")
    task = str(args.task.resolve().relative_to(ROOT)) if args.task.resolve().is_relative_to(ROOT) else str(args.task)
    (args.out / f"{stem}.md").write_text(markdown(rows, figs, wall, args.quick, task, load))
    print(json.dumps(figs))


if __name__ == "__main__":
    main()
