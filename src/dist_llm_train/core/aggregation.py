"""Rules that combine n worker updates (rows of an (n, d) array) into one update.

One small base class; each rule only does its maths (the shape of Flower's
`flwr/server/strategy/` files). Byzantine-robust rules state how many faulty workers `f`
they tolerate and how many updates that needs; `validate_aggregator` checks it when a job
is configured, and `aggregate` checks it again because a sync round closed by a
straggler timeout can have fewer updates than planned.

numpy only: the parameter server imports this module.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


def _int_param(name: str, value: Any, minimum: int) -> int:
    """Config carries numbers as floats (1.0); accept integral values, reject the rest."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def pairwise_sq_dists(x: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows via |a|² + |b|² - 2ab (one matrix product)."""
    x64 = x.astype(np.float64, copy=False)
    sq = np.einsum("ij,ij->i", x64, x64)
    d = sq[:, None] + sq[None, :] - 2.0 * (x64 @ x64.T)
    d = 0.5 * (d + d.T)  # exactly symmetric, so mutual nearest neighbours get bit-identical scores
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, 0.0)


def _scores_from_dists(d: np.ndarray, f: int) -> np.ndarray:
    """Krum scores from a squared-distance matrix (its diagonal is ignored)."""
    n = d.shape[0]
    if n == 1:
        return np.zeros(1)
    k = min(max(1, n - f - 2), n - 1)
    masked = d + np.diag(np.full(n, np.inf))
    # A full sort (not a partition): the k nearest are summed in ascending order, so rows with the
    # same multiset of distances get bit-identical scores whatever the input order.
    return np.sort(masked, axis=1)[:, :k].sum(axis=1)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """Each row's sum of squared distances to its n - f - 2 nearest other rows (Blanchard et al., 2017).

    At least one neighbour is always used, so a degenerate n - f - 2 = 0 (inside Bulyan's
    shrinking sets) still ranks rows by closeness instead of tying them all at zero.
    """
    return _scores_from_dists(pairwise_sq_dists(x), f)


def _rank(scores: np.ndarray, x: np.ndarray, rows: list[int] | None = None) -> list[int]:
    """Indices by ascending score; equal scores ordered by the rows' bytes, so arrival order never matters.

    `scores[i]` belongs to row `rows[i]` of `x` (all rows when None). Only tied rows are read and
    serialised, which keeps ranking O(n log n) instead of O(n d)."""
    order = np.argsort(scores, kind="stable")
    out: list[int] = []
    i = 0
    while i < len(order):  # bounded: i advances by at least one each pass
        j = i + 1
        while j < len(order) and scores[order[j]] == scores[order[i]]:
            j += 1
        group = [int(g) for g in order[i:j]]
        if len(group) > 1:
            group.sort(key=lambda r: x[r if rows is None else rows[r]].tobytes())
        out.extend(group)
        i = j
    return out


def krum_order(x: np.ndarray, f: int) -> list[int]:
    """Row indices from best (lowest) Krum score to worst.

    Ties (e.g. a mutual-nearest pair when one neighbour counts) are broken by the rows'
    bytes, not their positions, so the rule's output does not depend on arrival order.
    """
    return _rank(krum_scores(x, f), x)


class Aggregator(ABC):
    """Combine updates of shape (n, d) into one of shape (d,)."""

    name: ClassVar[str]
    # False: a lone update comes back unchanged, so callers may skip the call. A rule or wrapper that
    # transforms every input (central DP clips and adds noise; centered clipping moves from its centre) sets it.
    transforms_single: bool = False

    def min_inputs(self) -> int:
        """The fewest updates this rule is defined for."""
        return 1

    def counts(self) -> dict[str, int]:
        """Running event counts a rule keeps (e.g. central DP's releases), for the PS's counters."""
        return {}

    def requirement(self) -> str:
        return f"n >= {self.min_inputs()}"

    def describe(self) -> str:
        """The rule as configured, for logs and reports (a wrapper names what it wraps)."""
        return self.name

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a stateful rule carries from one round to the next (the PS checkpoints it); none by default."""
        return {}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore `state_dict()`'s arrays; a stateless rule refuses any."""
        if arrays:
            raise ValueError(f"{self.name} keeps no state, got {sorted(arrays)}")

    def aggregate(self, updates: np.ndarray) -> np.ndarray:
        x = np.asarray(updates)
        if x.ndim != 2:
            raise ValueError(f"{self.name} takes updates of shape (n, d), got {x.shape}")
        if x.shape[0] < self.min_inputs():
            raise ValueError(f"{self.name} needs {self.requirement()} updates, got n={x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError(f"{self.name}: updates contain NaN or Inf")
        # Rules compute in float32: a wider input must still be finite after the cast (1e39 is a finite
        # float64 and +inf as a float32).
        with np.errstate(over="ignore"):
            x32 = x.astype(np.float32, copy=False)
        if x32 is not x and not np.isfinite(x32).all():
            raise ValueError(f"{self.name}: updates overflow float32 (|value| > {np.finfo(np.float32).max:.3e})")
        return np.asarray(self._aggregate(x32), dtype=np.float32)

    @abstractmethod
    def _aggregate(self, x: np.ndarray) -> np.ndarray: ...


class Mean(Aggregator):
    """FedAvg / synchronous SGD: the plain average. Not robust to a single bad update."""

    name = "mean"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return x.mean(axis=0, dtype=np.float64)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., 2018): tolerates < n/2 bad values per coordinate."""

    name = "median"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return np.median(x, axis=0)


class TrimmedMean(Aggregator):
    """Coordinate-wise mean without the k largest and smallest values (Yin et al., 2018).

    Configured by a fraction `beta` (k = floor(beta·n)) or by a count `f` (k = f whatever n). A job that
    names f trims by count: a round closed short by a straggler timeout (n' < n updates) still cuts f values
    from each side, where a fraction f/n would cut only floor(f·n'/n) < f. With `f` it needs n >= 2f + 1.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float | None = None, f: int | None = None) -> None:
        if beta is not None and f is not None:
            raise ValueError("trimmed_mean takes beta (a fraction) or f (a count), not both")
        self.f = None if f is None else _int_param("trimmed_mean f", f, 0)
        if beta is None:
            beta = 0.1 if f is None else 0.0
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ValueError(
                f"trimmed_mean beta (fraction cut from each side) must be in [0, 0.5), got {beta!r}"
            )
        self.beta = float(beta)

    def min_inputs(self) -> int:
        return 1 if self.f is None else 2 * self.f + 1

    def requirement(self) -> str:
        return f"n >= {self.min_inputs()}" if self.f is None else f"n >= 2f+1 = {self.min_inputs()} (f={self.f})"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        # beta = f/n must cut exactly f despite float rounding
        k = self.f if self.f is not None else int(np.floor(self.beta * n + 1e-9))
        return np.sort(x, axis=0)[k : n - k].mean(axis=0, dtype=np.float64)


class Krum(Aggregator):
    """The single update closest to its n - f - 2 nearest neighbours; needs n >= 2f + 3."""

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        self.f = _int_param("krum f", f, 0)

    def min_inputs(self) -> int:
        return 2 * self.f + 3

    def requirement(self) -> str:
        return f"n >= 2f+3 = {self.min_inputs()} (f={self.f})"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return x[krum_order(x, self.f)[0]].copy()


class MultiKrum(Krum):
    """Average of the m best-scored updates (m defaults to n - f); m = 1 is Krum, m = n is the mean."""

    name = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else _int_param("multi_krum m", m, 1)

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        m = n - self.f if self.m is None else self.m
        if m > n - self.f:
            raise ValueError(f"multi_krum m={m} exceeds n - f = {n - self.f}")
        best = krum_order(x, self.f)[:m]
        return x[best].mean(axis=0, dtype=np.float64)


class Bulyan(Aggregator):
    """Krum-select θ = n - 2f updates, then per coordinate average the β = θ - 2f closest to the median.

    El Mhamdi et al., 2018: needs n >= 4f + 3. Stops attacks that hide in a few coordinates,
    which Krum alone (a whole-vector distance) lets through.
    """

    name = "bulyan"

    def __init__(self, f: int = 1) -> None:
        self.f = _int_param("bulyan f", f, 0)

    def min_inputs(self) -> int:
        return 4 * self.f + 3

    def requirement(self) -> str:
        return f"n >= 4f+3 = {self.min_inputs()} (f={self.f})"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        theta = n - 2 * self.f
        dists = pairwise_sq_dists(x)  # once: each selection step only takes a sub-matrix of it
        remaining = list(range(n))
        selected: list[int] = []
        for _ in range(theta):  # bounded: theta <= n
            sub = dists[np.ix_(remaining, remaining)]
            pick = remaining[_rank(_scores_from_dists(sub, self.f), x, remaining)[0]]
            selected.append(pick)
            remaining.remove(pick)
        return _closest_to_median_mean(x[selected].astype(np.float64), theta - 2 * self.f)


def _closest_to_median_mean(s: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the `beta` values closest to the median (ties: the smaller value).

    On a line the values closest to a point are taken outward from it, so after one sort along
    the rows a two-pointer walk picks them: `beta` vectorised steps over all coordinates at once,
    each taking the nearer of the two frontier values (the lower one on a tie, as a sort by
    (distance, value) would). O(rows log rows · d) for the sort, then O(beta · d).
    """
    theta, d = s.shape
    v = np.sort(s, axis=0)
    mid = theta // 2
    med = v[mid] if theta % 2 else 0.5 * (v[mid - 1] + v[mid])
    right = (v < med).sum(axis=0)  # first index at or above the median, per coordinate
    left = right - 1
    cols = np.arange(d)
    total = np.zeros(d)
    for _ in range(beta):  # bounded: beta <= rows
        lv = v[np.maximum(left, 0), cols]
        rv = v[np.minimum(right, theta - 1), cols]
        take_left = (left >= 0) & ((right >= theta) | (med - lv <= rv - med))
        total += np.where(take_left, lv, rv)
        left -= take_left
        right += ~take_left
    return total / beta


class CenteredClipping(Aggregator):
    """Centered clipping (Karimireddy, He and Jaggi, ICML 2021, "Learning from History for Byzantine Robust
    Optimization"): starting from the previous round's aggregate v, repeat L times

        v <- v + (1/n) * sum_i clip(x_i - v, tau),   clip(z, tau) = z * min(1, tau / ||z||).

    A Byzantine update moves v by at most tau/n per iteration whatever its size, and because v carries over
    from round to round, a small bias repeated every round (a time-coupled attack) is clipped each time
    instead of averaged in. The paper pairs it with worker momentum (`AggregationConfig.worker_momentum`),
    which shrinks the honest updates' spread so that a small tau keeps them whole.

    `tau` fixed, or None: each iteration uses the median of the distances ||x_i - v|| (an honest majority
    decides the radius; an explicit tau is the paper's form). The centre v is state: the PS checkpoints it
    (`state_dict`). An update of another length (a Streaming DiLoCo fragment) starts from zero.
    """

    name = "centered_clipping"
    transforms_single = True  # v + clip(x - v) is not x

    def __init__(self, tau: float | None = None, iterations: int = 1) -> None:
        if tau is not None:
            ok = isinstance(tau, int | float) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
            if not ok:
                raise ValueError(f"centered_clipping tau must be a finite number > 0, got {tau!r}")
        self.tau = None if tau is None else float(tau)
        self.iterations = _int_param("centered_clipping iterations", iterations, 1)
        self.center: np.ndarray | None = None

    def describe(self) -> str:
        tau = "median distance" if self.tau is None else f"{self.tau:g}"
        return f"{self.name}(tau={tau}, L={self.iterations})"

    def state_dict(self) -> dict[str, np.ndarray]:
        return {} if self.center is None else {"center": self.center.copy()}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        unknown = sorted(set(arrays) - {"center"})
        if unknown:
            raise ValueError(f"centered_clipping keeps only 'center', got {unknown}")
        center = arrays.get("center")
        if center is not None and (center.ndim != 1 or not np.isfinite(center).all()):
            raise ValueError("centered_clipping centre must be a finite 1-D vector")
        self.center = None if center is None else np.array(center, dtype=np.float64)

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        d = x.shape[1]
        v = self.center.copy() if self.center is not None and self.center.shape == (d,) else np.zeros(d)
        for _ in range(self.iterations):  # bounded: L iterations
            diffs = x64 - v
            norms = np.sqrt(np.einsum("ij,ij->i", diffs, diffs))
            tau = self.tau if self.tau is not None else float(np.median(norms))
            far = norms > tau  # clip(z, tau) = z·min(1, tau/||z||): only updates farther than tau are scaled
            scale = np.ones_like(norms)
            scale[far] = tau / norms[far]
            v = v + (diffs * scale[:, None]).mean(axis=0)
        self.center = v
        return v


AGGREGATORS: dict[str, type[Aggregator]] = {
    a.name: a for a in (Mean, Median, TrimmedMean, Krum, MultiKrum, Bulyan, CenteredClipping)
}


FALLBACK_RULE = "median"
"""The parameter server's rule for a round its configured rule is not defined for: robust, defined for any n >= 1."""

DEFAULT_TRIM_RATIO = 0.3  # trimmed_mean's beta when neither trim_ratio nor f is given (the seed's default)


WRAPPER_PARAMS = ("bucket_size", "bucket_seed", "nnm_f")
"""Keys of a job's aggregation parameters that configure the pre-aggregation wrappers, not the rule itself."""


class AggregationConfig(BaseModel):
    """How the PS combines a round of updates (`training.aggregation`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clipping"] = Field(
        "mean", description="The aggregation rule"
    )
    f: int | None = Field(None, ge=0, description="Byzantine workers tolerated (krum, multi_krum, bulyan, nnm; "
                          "trimmed_mean cuts f from each side when trim_ratio is unset)")
    trim_ratio: float | None = Field(None, ge=0, lt=0.5, description="trimmed_mean's beta")
    m: int | None = Field(None, ge=1, description="multi_krum: updates averaged")
    tau: float | None = Field(None, gt=0, description="centered_clipping: clipping radius (unset: the median "
                              "distance of the round's updates from the centre)")
    iterations: int = Field(1, ge=1, le=100, description="centered_clipping: clipping iterations L per round")
    bucketing: int | None = Field(None, ge=2, description="Wrap the rule in bucketing with buckets of this size s")
    bucket_seed: int | None = Field(None, ge=0, description="Fix bucketing's shuffle key (experiments only; unset, "
                                    "the PS draws a secret key so workers cannot predict their bucket)")
    nnm: bool = Field(False, description="Wrap the rule in nearest-neighbour mixing (needs f)")
    worker_momentum: float = Field(0.0, ge=0, lt=1, description="Workers send the momentum "
                                   "m <- (1 - b)·g + b·m of their gradients instead of g (Karimireddy et al. 2021)")

    @model_validator(mode="after")
    def _parts_fit(self) -> AggregationConfig:
        if self.nnm and self.f is None:
            raise ValueError("aggregation.nnm mixes each update with its n - f nearest: it needs aggregation.f")
        if self.bucket_seed is not None and self.bucketing is None:
            raise ValueError("aggregation.bucket_seed needs aggregation.bucketing")
        if self.rule != "centered_clipping" and (self.tau is not None or self.iterations != 1):
            raise ValueError(f"tau and iterations are centered_clipping's; rule is {self.rule!r}")
        return self

    def params(self, num_workers: int) -> dict[str, float]:
        """The rule's constructor parameters for a job of `num_workers`, plus the wrappers' (`WRAPPER_PARAMS`)."""
        params: dict[str, float] = {}
        if self.rule == "trimmed_mean":
            if self.trim_ratio is not None:
                params["beta"] = self.trim_ratio
            elif self.f is not None:
                params["f"] = float(self.f)  # a count: a short round still cuts f from each side
            else:
                params["beta"] = DEFAULT_TRIM_RATIO
        if self.rule in ("krum", "multi_krum", "bulyan") and self.f is not None:
            params["f"] = float(self.f)
        if self.rule == "multi_krum" and self.m is not None:
            params["m"] = float(self.m)
        if self.rule == "centered_clipping":
            if self.tau is not None:
                params["tau"] = self.tau
            params["iterations"] = float(self.iterations)
        if self.nnm and self.f is not None:
            params["nnm_f"] = float(self.f)
        if self.bucketing is not None:
            params["bucket_size"] = float(self.bucketing)
        if self.bucket_seed is not None:
            params["bucket_seed"] = float(self.bucket_seed)
        return params

    @property
    def label(self) -> str:
        """The rule and its wrappers in one word, for tables: e.g. krum+nnm, median+bucketing2."""
        parts: list[str] = [self.rule]
        if self.nnm:
            parts.append("nnm")
        if self.bucketing is not None:
            parts.append(f"bucketing{self.bucketing}")
        return "+".join(parts)


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """The rule called `name` built with `params`, behind the wrappers `WRAPPER_PARAMS` ask for
    (`core.preaggregation`); ValueError for an unknown name or parameter."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(AGGREGATORS)}")
    wrapping = {k: params.pop(k) for k in WRAPPER_PARAMS if k in params}
    try:
        rule = AGGREGATORS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for aggregation rule {name!r}: {params} ({err})") from None
    if not wrapping:
        return rule
    from dist_llm_train.core.preaggregation import wrap  # it builds on this module's base class

    return wrap(
        rule,
        bucket_size=wrapping.get("bucket_size"),
        bucket_seed=wrapping.get("bucket_seed"),
        nnm_f=wrapping.get("nnm_f"),
    )


def validate_aggregator(name: str, n: int, **params: Any) -> Aggregator:
    """Build the rule and check it is defined for n workers; the error states the rule and the numbers."""
    agg = get_aggregator(name, **params)
    if n < agg.min_inputs():
        raise ValueError(f"aggregation rule {agg.name!r} needs {agg.requirement()} workers, got n={n}")
    core, rows = agg, n
    while hasattr(core, "inner"):  # a wrapper: what its inner rule sees (bucket means, mixed updates)
        rows = core.rows_seen(rows)  # type: ignore[attr-defined]
        core = core.inner  # type: ignore[attr-defined]
    if isinstance(core, MultiKrum) and core.m is not None and core.m > rows - core.f:
        raise ValueError(f"multi_krum needs m <= n - f = {rows - core.f}, got m={core.m} (n={rows}, f={core.f})")
    return agg


def aggregation_health(counters: Mapping[str, int]) -> dict[str, int | str | bool]:
    """What `/status` and the run report say about rounds the rule did not run as configured, from the PS's
    counters (`paramserver.job.JobState.aggregate` keeps them).

    `short_rounds`: rounds closed with fewer updates than members (a straggler timeout, a member leaving);
    `fallback_rounds`: those among them the rule's precondition did not hold for, aggregated by the
    coordinate-wise median instead (`fallback_rule`); `degraded` is True once any round fell back."""
    fallbacks = int(counters.get(f"aggregation_fallback_{FALLBACK_RULE}", 0))
    return {
        "short_rounds": int(counters.get("aggregation_rounds_short", 0)),
        "last_short_version": int(counters.get("aggregation_last_short_version", 0)),
        "last_short_updates": int(counters.get("aggregation_last_short_updates", 0)),
        "fallback_rounds": fallbacks,
        "fallback_rule": FALLBACK_RULE,
        "last_fallback_version": int(counters.get("aggregation_last_fallback_version", 0)),
        "last_fallback_updates": int(counters.get("aggregation_last_fallback_updates", 0)),
        "degraded": fallbacks > 0,
    }
