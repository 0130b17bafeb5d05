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

Figures are printed (`pytest -s`) and recorded in docs/simulation.md ("Validation").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dist_llm_train.sim.validation import validate_run

pytestmark = pytest.mark.timeout(300)
TOLERANCE = 0.15

# Two workers in the default suite (~45 s): with three, five processes share two cores and on `good` (0.13 s
# rounds, 100 Mbit/s through one Python relay process) CPU contention the simulator does not model shows up.
CASES = [
    pytest.param("cellular", 2, 20, id="cellular-2w"),
    pytest.param("good", 2, 20, id="good-2w"),
    pytest.param("cellular", 3, 20, id="cellular-3w", marks=pytest.mark.slow),
    pytest.param("good", 3, 20, id="good-3w", marks=pytest.mark.slow),
]


def run_embedded(tmp_path: Path, profile: str, workers: int, steps: int) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm_train", "run", "--profile", profile, "--workers", str(workers),
         "--steps", str(steps), "--json", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=270,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] >= steps and summary["dead_workers"] == [] and summary["mode"] == "sync"
    return Path(summary["run_dir"])


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
