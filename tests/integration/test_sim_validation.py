"""Issue 7: for small N on the same profile, the simulated round time is within 15 % of the measured one.

A real embedded job (`dist-llm-train run --profile P`: controller, PS and workers as processes, every link
shaped by the userspace relays) is run first; then the simulator is given the same job from its run folder
(`sim.validation`): the same config (model size so payload, codec, strategy, workers), the profile file the
shaper applied, the relays' semantics (`transport.shaper: userspace`, each worker's PS path shaped on its
own) and the compute times the workers measured (`compute.kind: empirical`), so the comparison is about the
network and round model only. The measured figure is `run-experiments`' own (`measure_rounds`); the simulated
one is the mean over 2,000 virtual rounds.

The tolerance has teeth: the same run simulated on the other profile, or with kernel semantics (one shared
PS egress queue, TCP-style loss recovery), lands far outside it.

Issue 11 adds real numerics: two cells (cellular × sync, good × DiLoCo) are also simulated with the model
training on the virtual clock, and time to target and final eval loss must agree as well (round 10 %, time to
target 15 %, final loss 2 %; `sim.validation.TOLERANCES`). The full table is `benchmarks/sim_validation.py`.

Figures are printed (`pytest -s`) and recorded in docs/simulation.md ("Validation").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_llm_train.experiments.grid import Target
from dist_llm_train.sim.validation import validate_run, validate_trained

pytestmark = pytest.mark.timeout(300)
TOLERANCE = 0.15

# Two workers in the default suite (~45 s): with three, five processes share two cores and on `good` (0.13 s
# rounds, 100 Mbit/s through one Python relay process) CPU contention the simulator does not model shows up.
SYNC_TARGET = Target(floor_plus=0.25)  # reached after ~15 s of a 40-round cellular run
DILOCO_TARGET = Target(floor_plus=0.10)  # as benchmarks/sim_validation.py: reached mid-run, not in round 2
CASES = [
    pytest.param("cellular", 2, 40, id="cellular-2w"),
    pytest.param("good", 2, 20, id="good-2w"),
    pytest.param("cellular", 3, 20, id="cellular-3w", marks=pytest.mark.slow),
    pytest.param("good", 3, 20, id="good-3w", marks=pytest.mark.slow),
]


def run_embedded(tmp_path: Path, profile: str, workers: int, steps: int, *config: str, mode: str = "sync") -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "run", "--profile", profile, "--workers", str(workers),
         "--steps", str(steps), "--json", "--runs-dir", str(tmp_path / "runs"), *config],
        capture_output=True,
        text=True,
        timeout=270,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dead_workers"] == [] and summary["mode"] == mode
    return Path(summary["run_dir"])


def assert_trained_within_tolerances(run_dir: Path, scratch: Path, target: Target) -> None:
    v = validate_trained(run_dir, scratch, target=target)
    print(json.dumps(v.as_dict()))
    assert v.measured["time_to_target_s"] is not None, "the real run must reach the target for this check"
    assert v.misses() == [], v.as_dict()


@pytest.mark.parametrize(("profile", "workers", "steps"), CASES)
def test_simulated_round_time_is_within_15_percent_of_measured(tmp_path, profile, workers, steps):
    run_dir = run_embedded(tmp_path, profile, workers, steps)
    v = validate_run(run_dir)
    print(json.dumps(v.as_dict()))
    assert v.shaper == "userspace" and v.profile == profile and v.workers == workers
    assert v.measured_versions >= steps - 2 and v.simulated_rounds > 1000
    assert abs(v.relative_error) <= TOLERANCE, v.as_dict()

    other = "good" if profile == "cellular" else "cellular"
    wrong_profile = validate_run(run_dir, rounds=300, profile=other)
    assert abs(wrong_profile.relative_error) > 3 * TOLERANCE, wrong_profile.as_dict()
    if profile == "cellular":  # at 10 Mbit/s the shaper's semantics decide the round time
        kernel = validate_run(run_dir, rounds=300, **{"transport.shaper": "kernel",
                                                      "transport.shared_ps_egress": True})
        assert kernel.relative_error > 2 * TOLERANCE, kernel.as_dict()
    if (profile, workers) == ("cellular", 2):  # one of the two trained validation cells
        assert_trained_within_tolerances(run_dir, tmp_path / "sim", SYNC_TARGET)


def test_diloco_on_good_trains_like_the_real_run(tmp_path: Path) -> None:
    """The other trained cell: DiLoCo (H = 5) on `good`, two workers, 20 versions."""
    cfg = tmp_path / "diloco.yaml"
    cfg.write_text(yaml.safe_dump({"training": {"strategy": {"name": "diloco", "local_steps": 5}}}))
    run_dir = run_embedded(tmp_path, "good", 2, 100, "--config", str(cfg), mode="diloco")
    assert_trained_within_tolerances(run_dir, tmp_path / "sim", DILOCO_TARGET)
