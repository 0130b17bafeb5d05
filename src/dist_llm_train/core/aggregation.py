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
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


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
    # False: a lone update comes back unchanged, so callers may skip the call. A wrapper that
    # transforms every input (central DP clips and adds noise) sets it.
    transforms_single: ClassVar[bool] = False

    def min_inputs(self) -> int:
        """The fewest updates this rule is defined for."""
        return 1

    def counts(self) -> dict[str, int]:
        """Running event counts a rule keeps (e.g. central DP's releases), for the PS's counters."""
        return {}

    def requirement(self) -> str:
        return f"n >= {self.min_inputs()}"

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
    """Coordinate-wise mean without the floor(beta·n) largest and smallest values (Yin et al., 2018)."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 0.5:
            raise ValueError(
                f"trimmed_mean beta (fraction cut from each side) must be in [0, 0.5), got {beta!r}"
            )
        self.beta = float(beta)

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        k = int(np.floor(self.beta * n + 1e-9))  # beta = f/n must cut exactly f despite float rounding
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


AGGREGATORS: dict[str, type[Aggregator]] = {
    a.name: a for a in (Mean, Median, TrimmedMean, Krum, MultiKrum, Bulyan)
}


DEFAULT_TRIM_RATIO = 0.3  # trimmed_mean's beta when neither trim_ratio nor f is given (the seed's default)


class AggregationConfig(BaseModel):
    """How the PS combines a round of updates (`training.aggregation`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rule: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"] = Field(
        "mean", description="The aggregation rule"
    )
    f: int | None = Field(None, ge=0, description="Byzantine workers tolerated (krum, multi_krum, bulyan; "
                          "trimmed_mean trims f/n when trim_ratio is unset)")
    trim_ratio: float | None = Field(None, ge=0, lt=0.5, description="trimmed_mean's beta")
    m: int | None = Field(None, ge=1, description="multi_krum: updates averaged")

    def params(self, num_workers: int) -> dict[str, float]:
        """The rule's constructor parameters for a job of `num_workers`."""
        if self.rule == "trimmed_mean":
            if self.trim_ratio is not None:
                return {"beta": self.trim_ratio}
            return {"beta": self.f / num_workers if self.f is not None else DEFAULT_TRIM_RATIO}
        params: dict[str, float] = {}
        if self.rule in ("krum", "multi_krum", "bulyan") and self.f is not None:
            params["f"] = float(self.f)
        if self.rule == "multi_krum" and self.m is not None:
            params["m"] = float(self.m)
        return params


def get_aggregator(name: str, **params: Any) -> Aggregator:
    """The rule called `name` built with `params`; ValueError for an unknown name or parameter."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregation rule {name!r}; choose one of {sorted(AGGREGATORS)}")
    try:
        return AGGREGATORS[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for aggregation rule {name!r}: {params} ({err})") from None


def validate_aggregator(name: str, n: int, **params: Any) -> Aggregator:
    """Build the rule and check it is defined for n workers; the error states the rule and the numbers."""
    agg = get_aggregator(name, **params)
    if n < agg.min_inputs():
        raise ValueError(f"aggregation rule {name!r} needs {agg.requirement()} workers, got n={n}")
    if isinstance(agg, MultiKrum) and agg.m is not None and agg.m > n - agg.f:
        raise ValueError(f"multi_krum needs m <= n - f = {n - agg.f}, got m={agg.m} (n={n}, f={agg.f})")
    return agg
