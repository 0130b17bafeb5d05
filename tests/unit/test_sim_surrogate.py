"""The loss surrogate (`sim.surrogate`): fitted from trained simulations, predictive on a held-out one, and
always labelled — a timing-only run never reports it as its own loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.sim.request import SimRequest, run_request
from dist_llm_train.sim.surrogate import SurrogateError, apply, fit_from_folders, read_trained_run

pytestmark = pytest.mark.timeout(300)


def _trained(tmp: Path, **overrides: object) -> Path:
    data = run_request(SimRequest(overrides={"profile": "good", **overrides}, train=True), tmp)
    return Path(data["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("trained")
    return {
        "sync": _trained(tmp, workers=3, rounds=50),
        "async": _trained(tmp, workers=3, rounds=150, mode="async", max_staleness=5),
        "held_out": _trained(tmp, workers=2, rounds=80),
    }


def test_fit_predicts_a_held_out_trained_run(runs: dict[str, Path]) -> None:
    surrogate = fit_from_folders([runs["sync"], runs["async"]])
    assert surrogate.alpha > 0 and surrogate.beta_fitted  # two staleness levels: β identifiable
    held = read_trained_run(runs["held_out"])
    predicted = surrogate.predict(held.samples, held.staleness)
    # The held-out run's windowed training loss, at a quarter, half and the end of its samples.
    for i in (held.samples.size // 4, held.samples.size // 2, held.samples.size - 1):
        assert abs(predicted[i] - held.loss[i]) < 0.12, (i, predicted[i], held.loss[i])
    only_sync = fit_from_folders([runs["sync"]])
    assert not only_sync.beta_fitted and only_sync.beta == 0.0


def test_timing_only_run_reports_the_surrogate_labelled_never_as_its_loss(runs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    request = SimRequest(overrides={"workers": 200, "rounds": 30, "profile": "cellular"},
                         surrogate_from=(runs["sync"], runs["async"]))
    data = run_request(request, tmp_path)
    assert data["final_loss"] is None and data["simulation"]["numerics"] == "free"
    sg = data["surrogate"]
    assert "nothing was trained" in sg["label"] and sg["final_loss"] > sg["model"]["floor"]
    assert any("critical batch size" in w for w in sg["warnings"])  # 200 × 16 samples a version vs 3 × 16
    md = (Path(data["run_dir"]) / "summary.md").read_text()
    assert "Loss surrogate (nothing was trained in this run)" in md and "**Warning:**" in md


def test_apply_matches_the_curve_at_each_version() -> None:
    from dist_llm_train.sim.surrogate import Surrogate

    s = Surrogate(floor=1.0, a=10.0, alpha=0.5, s0=0.0, beta=0.0, beta_fitted=False, rms_log_error=0.0,
                  fitted_from=[], max_samples_per_version=64)
    out = apply(s, [1.0, 2.0, 3.0], [4, 4, 4], 16, 0.0, target_loss=1.0 + 10.0 / np.sqrt(128))
    assert out["final_loss"] == pytest.approx(1.0 + 10.0 / np.sqrt(192))
    assert out["time_to_target_s"] == 2.0 and out["versions_to_target"] == 2 and out["warnings"] == []


def test_bad_inputs_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    free = run_request(SimRequest(overrides={"workers": 3, "rounds": 20}), tmp_path)
    with pytest.raises(SurrogateError, match="not a trained simulation"):
        fit_from_folders([Path(free["run_dir"])])
    with pytest.raises(SurrogateError, match="not a simulation run folder"):
        fit_from_folders([tmp_path / "missing"])
    from dist_llm_train.sim.config import SimConfigError

    with pytest.raises(SimConfigError, match="timing-only"):
        run_request(SimRequest(train=True, surrogate_from=(runs["sync"],)), None)
