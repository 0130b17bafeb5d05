"""The strategy extensions a job carries in `JobSpec.options`, parsed and checked in one place.

Options travel as strings (proto field 11 is `map<string, string>`) so a new strategy knob
never needs a wire change. Every key is known here: a misspelt option is refused at InitJob
instead of being silently ignored for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_llm_train.paramserver import validation as v
from dist_llm_train.paramserver.optim import option_value
from dist_llm_train.paramserver.staleness import STALENESS_SCALING, StalenessPolicy
from dist_llm_train.paramserver.types import JobSpec
from dist_llm_train.training.dp import CentralDP, DPSettings

OPTIMIZER_OPTIONS = ("nesterov", "adam_beta2", "adam_eps")
STALENESS_OPTIONS = ("staleness_scaling", "min_staleness", "max_staleness_multiplier")
DP_OPTIONS = ("dp_noise_multiplier", "dp_clip", "dp_delta", "dp_seed")
KNOWN_OPTIONS = frozenset(OPTIMIZER_OPTIONS + STALENESS_OPTIONS + DP_OPTIONS)


@dataclass
class JobOptions:
    staleness_scaling: str
    min_staleness: int
    max_staleness_multiplier: float
    dp: DPSettings | None
    dp_seed: int | None  # None: OS entropy (production); a seed only for reproducible tests

    def policy(self, spec: JobSpec) -> StalenessPolicy:
        return StalenessPolicy(spec, self.min_staleness, self.max_staleness_multiplier)

    def central_dp(self) -> CentralDP | None:
        return None if self.dp is None else CentralDP(self.dp, self.dp_seed)


def parse_options(spec: JobSpec) -> JobOptions:
    """Parse `spec.options`; PSError(INVALID_ARGUMENT) naming the key for anything unknown or out of range."""
    opts = spec.options
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        raise v.invalid(f"spec.options has unknown keys {unknown}; known: {sorted(KNOWN_OPTIONS)}")
    scaling = opts.get("staleness_scaling", "none")
    if scaling not in STALENESS_SCALING:
        raise v.invalid(
            f"spec.options['staleness_scaling'] must be one of {STALENESS_SCALING}, got {scaling!r}"
        )
    min_staleness = option_value(opts, "min_staleness", spec.max_staleness, int)
    multiplier = option_value(opts, "max_staleness_multiplier", 10.0, float)
    if min_staleness < 0 or multiplier < 1:
        raise v.invalid("spec.options: min_staleness must be >= 0 and max_staleness_multiplier >= 1")
    dp: DPSettings | None = None
    if "dp_noise_multiplier" in opts or "dp_clip" in opts:
        if spec.aggregation != "mean":
            raise v.invalid(
                "central DP calibrates its noise to the mean of clipped updates; "
                f"aggregation {spec.aggregation!r} "
                "has a different sensitivity (use local DP with robust rules)"
            )
        try:
            dp = DPSettings(
                noise_multiplier=option_value(opts, "dp_noise_multiplier", 0.0, float),
                clip=option_value(opts, "dp_clip", 0.0, float),
                mode="central",
                delta=option_value(opts, "dp_delta", 1e-5, float),
            )
        except ValueError as err:
            raise v.invalid(f"spec.options: {err}") from None
    return JobOptions(scaling, min_staleness, multiplier, dp, option_value(opts, "dp_seed", None, int))
