"""Codecs on real training: held-out loss and update bytes per codec, under sync and DiLoCo, in one process.

The tiny model of `tests/integration/test_strategies_compression.py` (1 layer, 32 wide, 13,792 parameters)
trains on the built-in corpus with 2 workers through the real worker pipeline and PS rules
(`sim.numerics.simulate_training`), once per (strategy, codec) cell, same seed and samples for every cell.
Update bytes are the payload bytes the PS received (gradients or pseudo-gradients, index bytes included).
One seed per cell: differences of a few thousandths of a nat are noise.

Strategies: `sync`; `diloco` as configured by default (H = 20, outer Nesterov momentum 0.9, outer lr 0.7);
`diloco-no-momentum` (outer momentum 0, outer lr 1), the setting SparseLoCo uses, where the error-feedback
accumulator takes the place of the outer momentum.

    python benchmarks/training_codecs.py [--steps 300] [--out results]

Writes results/training_codecs.json and results/training_codecs.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.config import parse_config
from dist_llm_train.sim.numerics import simulate_training

ROOT = Path(__file__).resolve().parent.parent
QUICK_ARGS = ["--steps", "40"]

MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 2}
TRAINING = {"batch_size": 8, "seq_length": 16, "num_samples": 4000, "eval_batches": 16, "num_workers": 2}
STRATEGIES: dict[str, dict[str, Any]] = {
    "sync": {"name": "sync"},
    "diloco": {"name": "diloco"},
    "diloco-no-momentum": {"name": "diloco", "outer_momentum": 0.0, "outer_lr": 1.0},
}
CODECS: dict[str, dict[str, Any]] = {
    "none": {"name": "none"},
    "int8": {"name": "int8"},
    "int4": {"name": "int4"},
    "int2": {"name": "int2"},
    "int2 (no EF)": {"name": "int2", "error_feedback": False},
    "topk 1%": {"name": "topk", "ratio": 0.01},
    "sparseloco 1%": {"name": "sparseloco", "ratio": 0.01},
    "sparseloco 3%": {"name": "sparseloco", "ratio": 0.03},
    "sparseloco 1% (no EF)": {"name": "sparseloco", "ratio": 0.01, "error_feedback": False},
}


def train(strategy: dict[str, Any], codec: dict[str, Any], steps: int) -> dict[str, Any]:
    cfg = parse_config({"model": MODEL, "training": {**TRAINING, "steps": steps, "strategy": strategy, "codec": codec}})
    t0 = time.perf_counter()
    result, sources = simulate_training(cfg)
    loss = sources[0].trainer.evaluate(np.array(result.params), cfg.training.eval_batches)
    assert result.stats is not None
    counters = result.stats.counters
    update_bytes = counters.get("bytes_received_gradient", 0) + counters.get("bytes_received_pseudo_gradient", 0)
    return {
        "held_out_loss": round(float(loss), 4),
        "update_bytes": int(update_bytes),
        "params": len(result.params),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def measure(steps: int) -> dict[str, Any]:
    rows = []
    for strategy_name, strategy in STRATEGIES.items():
        for codec_name, codec in CODECS.items():
            row = {"strategy": strategy_name, "codec": codec_name, **train(strategy, codec, steps)}
            print(row, flush=True)
            rows.append(row)
    for row in rows:  # bytes relative to the uncompressed run of the same strategy
        plain = next(r for r in rows if r["strategy"] == row["strategy"] and r["codec"] == "none")
        row["compression_vs_none"] = round(plain["update_bytes"] / row["update_bytes"], 2)
    return {"steps": steps, "model": MODEL, "training": TRAINING, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Codecs on real training (held-out loss, update bytes)",
        "",
        f"Tiny model ({result['rows'][0]['params']:,} parameters), 2 workers, {result['steps']} steps each, "
        "one seed; `python benchmarks/training_codecs.py`. EF = error feedback (on by default for int4, int2, "
        "topk, sparseloco). diloco-no-momentum: outer momentum 0, outer lr 1 (SparseLoCo's setting).",
        "",
        "| strategy | codec | held-out loss | update bytes | fewer bytes than none |",
        "|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['strategy']} | {r['codec']} | {r['held_out_loss']:.4f} | {r['update_bytes']:,} | "
            f"{r['compression_vs_none']}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    result = measure(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_codecs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "training_codecs.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
