"""Pre-aggregation wrappers: transform a round's updates, then hand them to any aggregation rule.

Both shrink the spread the honest updates show the inner rule, which is what lets attacks hide inside it on
non-IID data:

* `Bucketing(inner, s)` — Karimireddy, He and Jaggi, ICLR 2022 ("Byzantine-robust learning on heterogeneous
  datasets via bucketing"): shuffle the n updates, split them into ceil(n/s) buckets of s, average each
  bucket and run the inner rule on the bucket means. f attackers spoil at most f buckets, so the inner rule
  must tolerate f bad inputs among ceil(n/s) — the paper's condition δ·s ≤ δ_max, checked here as the inner
  rule's own precondition on the bucket count.
* `NearestNeighborMixing(inner, f)` — Allouah et al., AISTATS 2023 ("Fixing by mixing"): replace every
  update by the mean of its n - f nearest neighbours (itself included), then run the inner rule. Needs
  n >= 2f + 1 besides the inner rule's own condition.

Bucketing's shuffle is drawn from a keyed hash of the round's updates (their bytes, in a canonical order):
the same set of updates gives the same buckets in any arrival order — the rule stays a function of the set —
while without the key (a secret drawn from OS entropy unless `seed` fixes it for experiments) no worker can
predict, let alone steer, which bucket it lands in.

numpy only.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from abc import abstractmethod

import numpy as np

from dist_llm_train.core.aggregation import Aggregator, _int_param, _rank, pairwise_sq_dists


class Preaggregator(Aggregator):
    """A wrapper around any rule: `_mix` maps the n updates to the rows the inner rule sees."""

    def __init__(self, inner: Aggregator) -> None:
        self.inner = inner
        self.transforms_single = inner.transforms_single

    suffix = ""

    @property
    def name(self) -> str:  # type: ignore[override]  # a wrapper is named after what it wraps
        return f"{self.inner.name}+{self.suffix}"

    def rows_seen(self, n: int) -> int:
        """How many rows the inner rule receives from n updates."""
        return n

    def min_inputs(self) -> int:
        return self.inner.min_inputs()

    def counts(self) -> dict[str, int]:
        return self.inner.counts()

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        self.inner.load_state_dict(arrays)

    def innermost(self) -> Aggregator:
        inner = self.inner
        return inner.innermost() if isinstance(inner, Preaggregator) else inner

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return self.inner.aggregate(self._mix(x))

    @abstractmethod
    def _mix(self, x: np.ndarray) -> np.ndarray:
        """The rows the inner rule sees instead of `x` (bucket means, or nearest-neighbour means)."""


class Bucketing(Preaggregator):
    """Average random buckets of `s` updates, then aggregate the ceil(n/s) bucket means with `inner`."""

    suffix = "bucketing"

    def __init__(self, inner: Aggregator, s: int, seed: int | None = None) -> None:
        super().__init__(inner)
        self.s = _int_param("bucketing s (bucket size)", s, 2)
        if seed is not None:
            seed = _int_param("bucketing seed", seed, 0)
        self._key = secrets.token_bytes(32) if seed is None else hashlib.blake2b(str(seed).encode()).digest()[:32]

    def describe(self) -> str:
        return f"bucketing(s={self.s}) -> {self.inner.describe()}"

    def rows_seen(self, n: int) -> int:
        return math.ceil(n / self.s)

    def min_inputs(self) -> int:
        # ceil(n/s) >= m  <=>  n >= (m - 1)·s + 1
        return (self.inner.min_inputs() - 1) * self.s + 1

    def requirement(self) -> str:
        return (
            f"n >= {self.min_inputs()}: ceil(n/{self.s}) buckets must meet {self.inner.name}'s "
            f"{self.inner.requirement()}"
        )

    def permutation(self, x: np.ndarray) -> np.ndarray:
        """The shuffled order of x's rows: a canonical (content) order, permuted by a keyed hash of the content."""
        digests = [hashlib.blake2b(row.tobytes(), key=self._key, digest_size=16).digest() for row in x]
        canonical = sorted(range(len(x)), key=lambda i: digests[i])
        round_hash = hashlib.blake2b(b"".join(digests[i] for i in canonical), key=self._key, digest_size=16)
        rng = np.random.default_rng(int.from_bytes(round_hash.digest(), "little"))
        return np.asarray(canonical, dtype=np.int64)[rng.permutation(len(x))]

    def _mix(self, x: np.ndarray) -> np.ndarray:
        order = self.permutation(x)
        buckets = [order[i : i + self.s] for i in range(0, len(order), self.s)]
        return np.stack([x[b].mean(axis=0, dtype=np.float64) for b in buckets]).astype(np.float32)


class NearestNeighborMixing(Preaggregator):
    """Replace each update by the mean of its n - f nearest updates (itself included), then aggregate."""

    suffix = "nnm"

    def __init__(self, inner: Aggregator, f: int) -> None:
        super().__init__(inner)
        self.f = _int_param("nnm f", f, 0)

    def describe(self) -> str:
        return f"nnm(f={self.f}) -> {self.inner.describe()}"

    def min_inputs(self) -> int:
        return max(2 * self.f + 1, self.inner.min_inputs())

    def requirement(self) -> str:
        return (
            f"n >= {self.min_inputs()}: NNM's n >= 2f+1 = {2 * self.f + 1} (f={self.f}) and "
            f"{self.inner.name}'s {self.inner.requirement()}"
        )

    def _mix(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        k = n - self.f
        dists = pairwise_sq_dists(x)
        out = np.empty(x.shape, dtype=np.float32)
        for i in range(n):  # bounded: n rows; ties at the k-th distance are broken by the rows' bytes
            nearest = _rank(dists[i], x)[:k]
            out[i] = x[nearest].mean(axis=0, dtype=np.float64)
        return out


def wrap(rule: Aggregator, *, bucket_size: int | None = None, bucket_seed: int | None = None,
         nnm_f: int | None = None) -> Aggregator:
    """`rule` behind the configured wrappers: updates are bucketed first, the bucket means mixed by NNM, the
    result aggregated by `rule` (Allouah et al. apply NNM directly before the rule; bucketing goes outside)."""
    if nnm_f is not None:
        rule = NearestNeighborMixing(rule, nnm_f)
    if bucket_size is not None:
        rule = Bucketing(rule, bucket_size, bucket_seed)
    elif bucket_seed is not None:
        raise ValueError("bucket_seed needs bucket_size")
    return rule
