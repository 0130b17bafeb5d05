"""Which aggregation rule survives which Byzantine attack: the robustness table, on the simulator's real numerics.

Every cell trains the real model with the real worker pipelines (strategy, attack, codec with error feedback)
pushing into the real PS job (aggregation rule and its wrappers, server optimizer) on the simulator's virtual
clock (`sim.training.simulate_trained`). The grid is `experiments/robustness.yaml`: rules (mean, median,
trimmed mean, Krum, multi-Krum, Bulyan, centered clipping, each plain, with bucketing and with NNM) x attacks
(none, sign-flip, gaussian, ALIE, IPM small and large ε, mimic, drift) x IID / Dirichlet(0.5) data at n = 11,
plus an n sweep (7, 15) and an update-type sweep (int8, top-k + error feedback, DiLoCo) on subsets, with
f = floor((n - 1) / 4) attackers. Per cell: the final held-out loss, its ratio to the clean run (no attack) of
the same rule and setting, and to the clean run of the plain mean. A cell more than 5 % above its own clean
run is marked; per attack and data split the report names the rules that stay within 5 %.

    python benchmarks/robustness.py [--jobs 2] [--out results]   # every block: 434 runs, 60 min measured on
                                                                  # the shared 2-core machine (~13 min idle)
    python benchmarks/robustness.py --quick                       # the quick block: 12 runs, 0.8 min (CI)
    python benchmarks/robustness.py --report-only results/robustness.json   # rebuild the report, no training

Writes results/robustness.json and results/robustness.md (--quick: robustness_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from dist_llm_train.experiments.machine import describe_machine, machine_info

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "experiments" / "robustness.yaml"
QUICK_ARGS = ["--quick"]
QUICK_TIMEOUT_S = 600
TOLERANCE = 1.05  # a cell more than 5 % above its reference loss is marked
EXCESS_TOLERANCE = 1.25  # the stricter view: loss above the floor at most 25 % above the clean run's


@dataclass(frozen=True)
class Cell:
    block: str
    rule: str
    wrapper: str
    attack: str
    data: str
    workers: int
    update: str

    @property
    def variant(self) -> str:
        return self.rule if self.wrapper == "plain" else f"{self.rule}+{self.wrapper}"

    @property
    def setting(self) -> tuple[str, int, str]:
        return (self.data, self.workers, self.update)


def byzantine_f(n: int) -> int:
    return (n - 1) // 4


def cells_of(block: dict[str, Any]) -> list[Cell]:
    return [
        Cell(block["name"], rule, wrapper, attack, data, n, update)
        for n in block["workers"]
        for update in block["update_types"]
        for data in block["data"]
        for rule in block["rules"]
        for wrapper in block["wrappers"]
        for attack in block["attacks"]
    ]


def config_dict(grid: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """The run's config: the task, then the data split, the update type, the rule for f and the attack."""
    n, f = cell.workers, byzantine_f(cell.workers)
    training: dict[str, Any] = {
        **grid["task"]["training"],
        **grid["data"][cell.data],
        **grid["update_types"][cell.update],
        "num_workers": n,
        "steps": grid["steps"],
        "aggregation": {**grid["rules"][cell.rule], **grid["wrappers"][cell.wrapper], "f": f},
    }
    attack = grid["attacks"][cell.attack]
    if attack is not None:
        training["attack"] = {**attack, "attackers": f}
    return {"model": grid["task"]["model"], "training": training}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per cell: --jobs cells run side by side


def run_cell(grid: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """Train one cell; a configuration the project refuses (a precondition) is recorded with its message."""
    from dist_llm_train.config import parse_config
    from dist_llm_train.sim.config import SimConfig
    from dist_llm_train.sim.training import simulate_trained

    row: dict[str, Any] = {**asdict(cell), "variant": cell.variant, "f": byzantine_f(cell.workers)}
    try:
        cfg = parse_config(config_dict(grid, cell))
    except ValueError as err:
        return {**row, "status": "refused", "reason": " ".join(str(err).split())[:300]}
    started = time.monotonic()
    sim = SimConfig.from_config(cfg, profile=grid["profile"])
    result = simulate_trained(cfg, sim)
    trained = result.trained
    assert trained is not None
    health = trained.strategy.get("aggregation_health", {})
    return {
        **row,
        "status": "ran",
        "initial_loss": trained.initial_loss,
        "final_loss": trained.final_loss,
        "loss_floor": trained.loss_floor,
        "versions": result.version,
        "fallback_rounds": health.get("fallback_rounds", 0),
        "wall_s": round(time.monotonic() - started, 2),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each run's loss over its own rule's clean run and over the plain mean's clean run, same setting."""
    clean = {
        (r["variant"], r["data"], r["workers"], r["update"]): r["final_loss"]
        for r in rows
        if r["status"] == "ran" and r["attack"] == "none"
    }
    for r in rows:
        if r["status"] != "ran":
            continue
        own = clean.get((r["variant"], r["data"], r["workers"], r["update"]))
        mean = clean.get(("mean", r["data"], r["workers"], r["update"]))
        r["ratio_vs_own_clean"] = None if own is None else r["final_loss"] / own
        r["ratio_vs_clean_mean"] = None if mean is None else r["final_loss"] / mean
        r["within_tolerance"] = r["ratio_vs_own_clean"] is not None and r["ratio_vs_own_clean"] <= TOLERANCE
        # The stricter view: the loss above the task's floor, against the clean run's (what is left to learn).
        floor = r["loss_floor"]
        excess_own = None if own is None or floor is None else own - floor
        r["excess_ratio_vs_own_clean"] = (
            None if excess_own is None or excess_own <= 0 else (r["final_loss"] - floor) / excess_own
        )


def survivors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per block, attack and setting: the rule variants within 5 % of their own clean run (and of clean mean)."""
    out = []
    keys = sorted(
        {(r["block"], r["attack"], r["data"], r["workers"], r["update"]) for r in rows if r["attack"] != "none"}
    )
    for block, attack, data, n, update in keys:
        group = [
            r for r in rows
            if (r["block"], r["attack"], r["data"], r["workers"], r["update"]) == (block, attack, data, n, update)
            and r["status"] == "ran"
        ]
        if not group:  # every rule refused the setting (an attack DiLoCo cannot run): nothing trained, no verdict
            continue
        within = sorted((r for r in group if r["within_tolerance"]), key=lambda r: r["ratio_vs_own_clean"])
        out.append({
            "block": block, "attack": attack, "data": data, "workers": n, "update": update,
            "rules_within_5pct": [r["variant"] for r in within],
            "rules_within_5pct_of_clean_mean": [
                r["variant"] for r in within
                if r["ratio_vs_clean_mean"] is not None and r["ratio_vs_clean_mean"] <= TOLERANCE
            ],
            "best_rule": min(group, key=lambda r: r["ratio_vs_own_clean"] or 9e9)["variant"] if group else None,
            "best_ratio_vs_own_clean": min((r["ratio_vs_own_clean"] or 9e9 for r in group), default=None),
            "meets_target": bool(within),
            "rules_within_25pct_excess": [
                r["variant"] for r in sorted(group, key=lambda r: r["excess_ratio_vs_own_clean"] or 9e9)
                if r["excess_ratio_vs_own_clean"] is not None and r["excess_ratio_vs_own_clean"] <= EXCESS_TOLERANCE
            ],
        })
    return out


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * (ratio - 1):+.1f}%"


def block_tables(rows: list[dict[str, Any]], block: str) -> list[str]:
    """One table per setting of the block: rule variants down, attacks across."""
    lines: list[str] = []
    mine = [r for r in rows if r["block"] == block]
    settings = sorted({(r["data"], r["workers"], r["update"]) for r in mine}, key=lambda s: (s[2], s[1], s[0]))
    attacks = list(dict.fromkeys(r["attack"] for r in mine))
    variants = list(dict.fromkeys(r["variant"] for r in mine))
    for data, n, update in settings:
        lines += [
            f"### {block}: n = {n}, f = {byzantine_f(n)}, {data}, {update}",
            "",
            "Each cell: final eval loss, then its change vs the same rule's clean run / vs clean mean; "
            "**✗** marks > 5 % worse than the rule's own clean run.",
            "",
            "| rule | " + " | ".join(attacks) + " |",
            "|---|" + "---:|" * len(attacks),
        ]
        for v in variants:
            cells = []
            for a in attacks:
                r = next((x for x in mine if (x["variant"], x["attack"], x["data"], x["workers"], x["update"])
                          == (v, a, data, n, update)), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ran":
                    cells.append("refused")
                else:
                    mark = "" if r["within_tolerance"] or a == "none" else " **✗**"
                    if a == "none":
                        extra = f" ({_pct(r['ratio_vs_clean_mean'])} vs mean)"
                    else:
                        extra = f" ({_pct(r['ratio_vs_own_clean'])} / {_pct(r['ratio_vs_clean_mean'])})"
                    cells.append(f"{r['final_loss']:.3f}{extra}{mark}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        refused = {
            r["variant"]: r["reason"] for r in mine
            if r["status"] == "refused" and (r["data"], r["workers"], r["update"]) == (data, n, update)
        }
        if refused:
            lines += ["", "Refused at config time:"]
            lines += [f"- {v}: {reason}" for v, reason in refused.items()]
        lines.append("")
    return lines


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Byzantine robustness table{' (quick)' if meta['quick'] else ''}",
        "",
        f"Generated by `python benchmarks/robustness.py{' --quick' if meta['quick'] else ''}` from "
        f"`experiments/robustness.yaml` in {meta['wall_s'] / 60:.1f} min with {meta['jobs']} processes on "
        f"{meta['machine']} (shared: load average {meta.get('load_average_end', float('nan')):.1f} at the end). "
        f"{meta['ran']} runs trained, {meta['refused']} refused by a precondition.",
        "",
        f"Task: the default Markov corpus (loss floor {meta['loss_floor']:.3f} nats), a 1-layer GPT, "
        f"{meta['steps']} inner steps per worker, sync rounds on the simulator's real numerics; f = ⌊(n−1)/4⌋ "
        "attackers (20 % at n = 11 is f = 2, 18 %), every rule configured for that f. Figure: the global model's "
        "final held-out loss (16 batches, standard error ≈ 0.01 nats), relative to the clean run of the same rule "
        "and to the clean run of the plain mean. One seed per cell.",
        "",
        "Quick block (CI's smoke run of the table): mean and centered clipping, plain and with NNM, against "
        "no attack, ALIE and IPM ε = 10 at n = 11, IID; the full grid is `python benchmarks/robustness.py`."
        if meta["quick"] else
        "Design: the full product is too large for one run, so the grid is three blocks — `main`: every rule "
        "variant × attack × IID / non-IID (Dirichlet α = 0.5) at n = 11 with dense gradients; `n_sweep`: n = 7 "
        "and 15 on mean, median, Krum, Bulyan and centered clipping, IID; `update_types`: int8, top-k (10 %) + "
        "error feedback and DiLoCo pseudo-gradients (H = 5) at n = 11 on mean, median and centered clipping, IID. "
        "Settings every rule refuses (ALIE and drift estimate the honest spread, which a DiLoCo attacker cannot) "
        "are listed as refused and get no verdict.",
        "",
        "## Which rule survives which attack",
        "",
        "Rules within 5 % of their own clean run (best first); in bold those also within 5 % of clean mean.",
        "",
        "The stricter column: rules whose loss above the task's floor stays within 1.25× their clean run's "
        "(on this task the clean excess is ~0.05 nats, so 5 % of the loss is ~2× the whole excess).",
        "",
        "| block | attack | data | n | update | within 5 % of own clean loss | excess within 1.25× | "
        "best (Δ vs own clean) |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for s in summary:
        strict = set(s["rules_within_5pct_of_clean_mean"])
        names = ", ".join(f"**{v}**" if v in strict else v for v in s["rules_within_5pct"]) or "**none**"
        excess = ", ".join(s["rules_within_25pct_excess"]) or "none"
        lines.append(
            f"| {s['block']} | {s['attack']} | {s['data']} | {s['workers']} | {s['update']} | {names} | {excess} | "
            f"{s['best_rule']} ({_pct(s['best_ratio_vs_own_clean'])}) |"
        )
    misses = [s for s in summary if not s["meets_target"]]
    lines += [
        "",
        f"Settings where no rule stays within 5 %: {len(misses)} of {len(summary)}"
        + (": " + "; ".join(f"{s['attack']} ({s['block']}, {s['data']}, n={s['workers']}, {s['update']})"
                            for s in misses) if misses else "."),
        "",
        "## Every cell",
        "",
    ]
    for block in dict.fromkeys(r["block"] for r in rows):
        lines += block_tables(rows, block)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the grid's quick block")
    ap.add_argument("--grid", type=Path, default=GRID)
    ap.add_argument("--jobs", type=int, default=2, help="cells trained side by side (one core each)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                    help="rebuild the markdown and figures from a results JSON this script wrote (no training)")
    args = ap.parse_args()
    if args.report_only is not None:
        saved = json.loads(args.report_only.read_text())
        write(saved["cells"], saved["meta"], args.report_only.with_suffix(""), args.report_only.parent)
        return
    grid = yaml.safe_load(args.grid.read_text())
    blocks = [grid["quick"]] if args.quick else grid["blocks"]
    cells = list(dict.fromkeys(c for b in blocks for c in cells_of(b)))
    started = time.monotonic()
    print(f"{len(cells)} cells, {args.jobs} processes", flush=True)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = [pool.submit(run_cell, grid, c) for c in cells]
        for i, fut in enumerate(futures, 1):
            row = fut.result()
            rows.append(row)
            loss = f"{row['final_loss']:.4f}" if row["status"] == "ran" else row["status"]
            print(f"[{i}/{len(cells)}] {row['block']} {row['variant']} {row['attack']} {row['data']} "
                  f"n={row['workers']} {row['update']}: {loss}", flush=True)
    ran = [r for r in rows if r["status"] == "ran"]
    meta = {
        "quick": args.quick,
        "jobs": args.jobs,
        "steps": grid["steps"],
        "wall_s": time.monotonic() - started,
        "machine": describe_machine(machine_info()),
        "load_average_end": os.getloadavg()[0],
        "ran": len(ran),
        "refused": len(rows) - len(ran),
        "loss_floor": next((r["loss_floor"] for r in ran if r["loss_floor"] is not None), float("nan")),
        "tolerance": TOLERANCE,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write(rows, meta, Path("robustness_quick" if args.quick else "robustness"), args.out)


def write(rows: list[dict[str, Any]], meta: dict[str, Any], stem: Path, out: Path) -> None:
    """Ratios, verdicts and figures from the cells; results/<stem>.json and .md."""
    add_ratios(rows)
    summary = survivors(rows)
    figures = {
        "settings": len(summary),
        "settings_with_a_survivor": sum(s["meets_target"] for s in summary),
        "every_attack_meets_target": all(s["meets_target"] for s in summary),
    }
    (out / f"{stem.name}.json").write_text(json.dumps(
        {"meta": meta, "figures": figures, "survivors": summary, "cells": rows}, indent=1, default=float
    ))
    (out / f"{stem.name}.md").write_text(markdown(rows, summary, meta))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
