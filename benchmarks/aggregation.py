"""Aggregation rules: time vs number of updates n and vector length d, with fitted scaling exponents.

For each rule, one sweep over n at fixed d and one over d at fixed n; each point is the
median of `--repeats` timings of `aggregate` on random (n, d) float32 updates. A least-
squares line through (log size, log time) gives the exponent. Asymptotically every rule is
linear in d; in n, mean/median/trimmed mean are O(n d), Krum O(n^2 d) (pairwise distances as
one matrix product) and Bulyan O(n^2 d + n^3) (n - 2f Krum selections on sub-matrices of one
distance matrix); the fitted exponents show how much of that the measured range sees. Small
sizes are dominated by fixed numpy overheads, so exponents are fitted on the upper half of
each sweep.

    python benchmarks/aggregation.py [--repeats 5] [--out results]

Writes results/aggregation.json and results/aggregation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.aggregation import get_aggregator

ROOT = Path(__file__).resolve().parent.parent
RULES: dict[str, dict[str, float]] = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {"f": 2},
    "multi_krum": {"f": 2},
    "bulyan": {"f": 2},
}
NS = (11, 16, 24, 32, 48, 64)  # bulyan f=2 needs n >= 11
DS = (10_000, 30_000, 100_000, 300_000, 1_000_000)
FIXED_D = 100_000
FIXED_N = 16


def time_rule(rule: str, n: int, d: int, repeats: int, rng: np.random.Generator) -> float:
    agg = get_aggregator(rule, **RULES[rule])
    x = rng.normal(size=(n, d)).astype(np.float32)
    agg.aggregate(x)  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        agg.aggregate(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def exponent(sizes: list[int], seconds: list[float]) -> float:
    half = len(sizes) // 2
    slope, _ = np.polyfit(np.log(sizes[half:]), np.log(seconds[half:]), 1)
    return float(slope)


def measure(repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows = []
    for rule in RULES:
        by_n = [time_rule(rule, n, FIXED_D, repeats, rng) for n in NS]
        by_d = [time_rule(rule, FIXED_N, d, repeats, rng) for d in DS]
        rows.append(
            {
                "rule": rule,
                "params": RULES[rule],
                "ms_by_n": {str(n): round(s * 1e3, 3) for n, s in zip(NS, by_n, strict=True)},
                "ms_by_d": {str(d): round(s * 1e3, 3) for d, s in zip(DS, by_d, strict=True)},
                "exponent_n": round(exponent(list(NS), by_n), 2),
                "exponent_d": round(exponent(list(DS), by_d), 2),
            }
        )
    return {"fixed_d": FIXED_D, "fixed_n": FIXED_N, "ns": NS, "ds": DS, "repeats": repeats, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    ns, ds = result["ns"], result["ds"]
    lines = [
        "# Aggregation rules: time vs n and d",
        "",
        f"Median of {result['repeats']} runs per point; random float32 updates.",
        f"Machine: {result['machine']}.",
        "Exponents are least-squares slopes of log time vs log size over the upper half of each sweep.",
        "",
        f"## time (ms) vs n, d = {result['fixed_d']:,}",
        "",
        "| rule | " + " | ".join(f"n={n}" for n in ns) + " | exponent in n |",
        "|---|" + "---:|" * (len(ns) + 1),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rule']} | "
            + " | ".join(str(r["ms_by_n"][str(n)]) for n in ns)
            + f" | {r['exponent_n']} |"
        )
    lines += [
        "",
        f"## time (ms) vs d, n = {result['fixed_n']}",
        "",
        "| rule | " + " | ".join(f"d={d:,}" for d in ds) + " | exponent in d |",
        "|---|" + "---:|" * (len(ds) + 1),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rule']} | "
            + " | ".join(str(r["ms_by_d"][str(d)]) for d in ds)
            + f" | {r['exponent_d']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    result = measure(args.repeats)
    result["machine"] = (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "aggregation.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
