"""Sync round time measured against the link-physics bound (compute + bytes / rate + RTT of the profile).

Embedded rows are real runs (controller, PS and workers as processes). Loopback is unshaped, so its bound uses
the `lan` profile's figures as a stand-in; a shaped profile gets an embedded row only once the launcher can
apply it (`RunOptions.profile`), otherwise it is listed as skipped rather than measured unshaped under its
name. Simulator rows (`--sim`, on by default) run the same grid in virtual time on every profile and are
labelled as simulated. The issue's target: sync round time on `cellular` <= 1.15 x the bound.

    python benchmarks/round_time.py                  # 3 workers, 60 steps; loopback + cellular, good
    python benchmarks/round_time.py --quick          # 2 workers, 30 steps; loopback + cellular (CI)

Writes results/round_time.json and results/round_time.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_llm_train.experiments.backends import BackendUnavailable, launcher_takes_profile
from dist_llm_train.experiments.grid import parse_grid
from dist_llm_train.experiments.machine import describe_machine, machine_info
from dist_llm_train.experiments.runner import run_grid

ROOT = Path(__file__).resolve().parent.parent
TARGET_PROFILE = "cellular"
TARGET_RATIO = 1.15
QUICK_ARGS = ["--quick"]


def _grid(name: str, profiles: list[str], workers: int, steps: int, repeats: int) -> Any:
    return parse_grid({
        "name": name, "steps": steps, "repeats": repeats, "target": {"floor_plus": 0.5},
        "axes": {"profile": profiles, "strategy": ["sync"], "workers": [workers]},
        "timeout_s": 900,
    })


def _rows(result_rows: list[dict[str, Any]], backend: str) -> list[dict[str, Any]]:
    out = []
    for r in result_rows:
        ratio = r.get("measured_over_bound")
        is_target = r.get("profile") == TARGET_PROFILE
        out.append({
            "backend": backend, "profile": r.get("profile"), "workers": r.get("workers"),
            "repeat": r.get("repeat"),
            "status": r.get("status"), "error": r.get("error"), "bound_profile": r.get("bound_profile"),
            "ps_egress": r.get("ps_egress"),
            "round_measured_s": r.get("round_measured_s"), "round_bound_s": r.get("round_bound_s"),
            "measured_over_bound": ratio, "target_ratio": TARGET_RATIO if is_target else None,
            "meets_target": (ratio <= TARGET_RATIO) if is_target and ratio is not None else None,
        })
    return out


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{float(v) * 1e3:.1f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Sync round time vs the link-physics bound",
        "",
        f"{result['workers']} workers, {result['steps']} steps, GPT on the Markov corpus; {result['when']}; "
        f"{result['machine_text']}.",
        "Bound = measured compute + bytes / link rate + RTT of the profile (docs/experiments.md). Unshaped "
        "rows use the `lan` figures as a stand-in. `sim` rows are simulated (virtual clock), not measured.",
        "",
        "| backend | profile | bound from | PS egress | round measured (ms) | bound (ms) | measured / bound "
        "| target |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        ratio = "n/a" if r["measured_over_bound"] is None else f"{r['measured_over_bound']:.3f}"
        target = "" if r["target_ratio"] is None else (
            f"<= {r['target_ratio']}: {'met' if r['meets_target'] else 'missed'}")
        if r["status"] != "ok":
            ratio, target = f"{r['status']}: {r['error']}", ""
        measured, bound = _ms(r["round_measured_s"]), _ms(r["round_bound_s"])
        lines.append(f"| {r['backend']} | {r['profile']} | {r['bound_profile'] or 'n/a'} | "
                     f"{r['ps_egress']} | {measured} | {bound} | {ratio} | {target} |")
    for s in result["skipped"]:
        lines.append(f"| embedded | {s['profile']} | | | | | skipped: {s['reason']} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profiles", default="cellular,good", help="shaped profiles (loopback always runs)")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulator rows")
    ap.add_argument("--quick", action="store_true", help="2 workers, 30 steps, cellular only")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--keep-runs", type=Path, default=None, help="keep run folders here (default: temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.workers, args.steps, args.profiles = 2, 30, TARGET_PROFILE
    shaped = [p for p in args.profiles.split(",") if p and p != "none"]
    embedded_profiles = ["none"] + (shaped if launcher_takes_profile() else [])
    skipped = [] if launcher_takes_profile() else [
        {"profile": p, "reason": "the embedded launcher cannot shape links yet (RunOptions.profile)"}
        for p in shaped]

    with tempfile.TemporaryDirectory(prefix="round_time-") as tmp:
        base = args.keep_runs or Path(tmp)
        rows = _rows(run_grid(_grid("round_time", embedded_profiles, args.workers, args.steps, args.repeats),
                              base / "embedded", backend="embedded").rows, "embedded")
        if not args.no_sim:
            try:
                sim = run_grid(_grid("round_time_sim", ["none", *shaped], args.workers, args.steps, 1),
                               base / "sim", backend="sim")
                rows += _rows(sim.rows, "sim")
            except BackendUnavailable as err:
                skipped.append({"profile": "all (sim)", "reason": str(err)})
    info = machine_info()
    result = {"benchmark": "round_time", "workers": args.workers, "steps": args.steps,
              "repeats": args.repeats, "target": {"profile": TARGET_PROFILE, "ratio": TARGET_RATIO},
              "rows": rows, "skipped": skipped, "machine": info, "machine_text": describe_machine(info),
              "when": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round_time.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (args.out / "round_time.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
