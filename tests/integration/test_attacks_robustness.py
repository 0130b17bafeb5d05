"""Byzantine attacks against aggregation rules, on real training in process.

Robust rules must stay within 10 % of the clean final loss where the literature says they
hold (sign flip, Gaussian noise and large-ε IPM are outliers that Krum, median, trimmed mean
and Bulyan remove), and `mean` must degrade. ALIE (Baruch et al. 2019) and small-ε IPM (Xie
et al. 2019) were designed to beat these rules: those cells are measured and recorded
(`record_property`, printed with -s), not asserted, so a break shows up instead of hiding.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import pytest

from dist_llm_train.config import parse_config
from dist_llm_train.sim.numerics import simulate_training

pytestmark = pytest.mark.timeout(900)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}
BASE = {"batch_size": 8, "seq_length": 16, "num_samples": 4000, "eval_batches": 16}
ATTACKS: dict[str, tuple[str, dict[str, float]]] = {
    "sign_flip": ("sign_flip", {"scale": 10.0}),
    "gaussian": ("gaussian", {"sigma": 1.0}),
    "ipm_strong": ("ipm", {"epsilon": 10.0}),
    "alie": ("alie", {}),  # z = the paper's z_max for (n, f)
    "ipm_weak": ("ipm", {"epsilon": 0.1}),
}
HOLDS = {"sign_flip", "gaussian", "ipm_strong"}  # outliers: every robust rule removes them
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")


def min_n(rule: str, f: int) -> int:
    return {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(rule, 2 * f + 1)


@functools.cache
def final_loss(n: int, steps: int, rule: str = "mean", f: int = 0, attack: str | None = None) -> float:
    keys: dict[str, Any] = {**BASE, "num_workers": n, "steps": steps, "aggregation_rule": rule}
    if f:
        keys["byzantine_f"] = f
    if attack is not None:
        name, params = ATTACKS[attack]
        keys |= {"attack": name, "attack_params": params, "attackers": f}
    cfg = parse_config({"model": TINY, "training": keys})
    result, sources = simulate_training(cfg)
    return sources[0].trainer.evaluate(np.array(result.params), cfg.training.eval_batches)


def check_cell(n: int, steps: int, rule: str, f: int, attack: str, record: Any) -> None:
    clean = final_loss(n, steps)
    loss = final_loss(n, steps, rule, f, attack)
    change = loss / clean - 1
    cell = {
        "n": n,
        "f": f,
        "rule": rule,
        "attack": attack,
        "clean": round(clean, 4),
        "loss": round(loss, 4),
        "change": round(change, 4),
    }
    record(f"{rule}/{attack}/n{n}/f{f}", json.dumps(cell))
    print(json.dumps(cell))
    if rule == "mean":
        if attack in HOLDS:
            assert change > 0.15, cell  # mean has no defence: it degrades
    elif attack in HOLDS:
        assert abs(change) <= 0.10, cell
    else:
        assert np.isfinite(loss)  # a known break: recorded above, not asserted either way


FAST_STEPS = 60
FAST_CELLS = [
    ("mean", 2, "sign_flip"),
    ("mean", 2, "gaussian"),
    ("median", 2, "sign_flip"),
    ("trimmed_mean", 2, "gaussian"),
    ("krum", 2, "ipm_strong"),
    ("multi_krum", 2, "sign_flip"),
    ("bulyan", 1, "gaussian"),
    ("krum", 2, "ipm_weak"),  # Xie et al.: small-ε IPM beats Krum (recorded)
]


@pytest.mark.parametrize("rule,f,attack", FAST_CELLS)
def test_rule_under_attack_n7(rule: str, f: int, attack: str, record_property: Any) -> None:
    check_cell(7, FAST_STEPS, rule, f, attack, record_property)


SLOW_CELLS = [
    (n, f, rule, attack)
    for n in (7, 9, 11)
    for f in (1, 2)
    for rule in ("mean", *ROBUST)
    for attack in ATTACKS
    if n >= min_n(rule, f)
]


@pytest.mark.slow
@pytest.mark.parametrize("n,f,rule,attack", SLOW_CELLS)
def test_rule_under_attack_matrix(n: int, f: int, rule: str, attack: str, record_property: Any) -> None:
    check_cell(n, 100, rule, f, attack, record_property)
